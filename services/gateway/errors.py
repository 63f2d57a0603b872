"""Errors that end one device connection, each with the WebSocket close code it maps to."""

from __future__ import annotations

# RFC 6455 close codes used by the gateway.
POLICY_VIOLATION = 1008  # auth failed, protocol order broken
UNSUPPORTED_DATA = 1003  # a message kind this endpoint does not take
INVALID_PAYLOAD = 1007  # malformed JSON, framing or audio
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013  # overloaded; reconnect later
GOING_AWAY = 1001
GOING_RESTART = 1012  # service restart: reconnect (to another gateway)
INTERNAL_ERROR = 1011


# Metric labels by close code: bounded, unlike the reason text.
CLOSE_LABELS = {
    POLICY_VIOLATION: "policy_violation",
    UNSUPPORTED_DATA: "unsupported_data",
    INVALID_PAYLOAD: "invalid_payload",
    MESSAGE_TOO_BIG: "message_too_big",
    TRY_AGAIN_LATER: "overloaded",
    GOING_AWAY: "going_away",
    INTERNAL_ERROR: "internal_error",
}


class ConnectionRejected(Exception):
    """The connection must close with ``code``; ``reason`` goes to the device."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        # The close frame's reason is limited to 123 bytes.
        self.reason = reason.encode()[:123].decode(errors="ignore")

    @property
    def label(self) -> str:
        return CLOSE_LABELS.get(self.code, "other")


class BadFrame(ConnectionRejected):
    def __init__(self, reason: str) -> None:
        super().__init__(INVALID_PAYLOAD, reason)
