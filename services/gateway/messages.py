"""Device text messages: parsing, validation and the server's replies."""

from __future__ import annotations

import json
from typing import Any

from services.gateway.errors import INVALID_PAYLOAD, ConnectionRejected

MAX_TEXT_BYTES = 64 * 1024
LISTEN_MODES = ("auto", "manual", "realtime")
LISTEN_STATES = ("start", "stop", "detect")


def parse_message(text: str) -> dict[str, Any]:
    if len(text) > MAX_TEXT_BYTES:
        raise ConnectionRejected(INVALID_PAYLOAD, f"text message over {MAX_TEXT_BYTES} bytes")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConnectionRejected(INVALID_PAYLOAD, f"text frame is not JSON: {exc.msg}") from None
    if not isinstance(message, dict):
        raise ConnectionRejected(
            INVALID_PAYLOAD, f"message must be a JSON object (got {type(message).__name__})"
        )
    if not isinstance(message.get("type"), str):
        raise ConnectionRejected(INVALID_PAYLOAD, 'message has no string "type"')
    return message


def hello_reply(session_id: str, sample_rate: int, frame_duration_ms: int) -> dict[str, Any]:
    return {
        "type": "hello",
        "transport": "websocket",
        "session_id": session_id,
        "audio_params": {
            "format": "opus",
            "sample_rate": sample_rate,
            "channels": 1,
            "frame_duration": frame_duration_ms,
        },
    }


def declared_frame_duration(hello: dict[str, Any]) -> int | None:
    """The uplink packet duration a hello promises, when it says one."""
    params = hello.get("audio_params")
    if not isinstance(params, dict):
        return None
    if params.get("format", "opus") != "opus":
        raise ConnectionRejected(INVALID_PAYLOAD, "only Opus uplink audio is supported")
    duration = params.get("frame_duration")
    if duration is None:
        return None
    if not isinstance(duration, int) or duration not in (10, 20, 40, 60, 80, 100, 120):
        raise ConnectionRejected(INVALID_PAYLOAD, f"unsupported frame_duration {duration!r}")
    return duration
