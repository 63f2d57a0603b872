"""What every service shares: configuration, audio helpers, batching, gRPC and metrics plumbing."""
