"""The device-facing gateway: WebSocket protocol, per-session state, fan-out to compute."""
