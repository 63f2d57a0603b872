"""A device simulator: speaks the xiaozhi protocol with real Opus at real-time pace."""
