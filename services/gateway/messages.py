"""Device text messages: parsing, validation and the server's replies."""

from __future__ import annotations

import json
import re
from typing import Any

from services.gateway.errors import INVALID_PAYLOAD, ConnectionRejected

MAX_TEXT_BYTES = 64 * 1024
# Device messages nest a few levels (an MCP payload perhaps ten).
MAX_JSON_DEPTH = 32
LISTEN_MODES = ("auto", "manual", "realtime")
LISTEN_STATES = ("start", "stop", "detect")
# "auto" or a language tag: "zh", "en", "zh-CN", "yue".
_LANGUAGE_TAG = re.compile(r"^[a-z]{2,3}([-_][a-z0-9]{1,8}){0,3}$")


def parse_message(text: str | bytes) -> dict[str, Any]:
    """A device's JSON message: a text frame, or the payload of a JSON binary frame.

    Anything malformed (too long, not UTF-8, not JSON, nested too deeply, not
    an object with a string "type") is the device's mistake: it raises
    ``ConnectionRejected`` with 1007 and a reason, never another exception.
    """
    if len(text) > MAX_TEXT_BYTES:
        raise ConnectionRejected(INVALID_PAYLOAD, f"text message over {MAX_TEXT_BYTES} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ConnectionRejected(INVALID_PAYLOAD, "JSON message is not valid UTF-8") from None
    too_deep = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConnectionRejected(INVALID_PAYLOAD, f"text frame is not JSON: {exc.msg}") from None
    except RecursionError:
        raise ConnectionRejected(INVALID_PAYLOAD, too_deep) from None
    # Counting brackets is cheap and rules out deep nesting for nearly every message.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(message, MAX_JSON_DEPTH):
        raise ConnectionRejected(INVALID_PAYLOAD, too_deep)
    if not isinstance(message, dict):
        raise ConnectionRejected(
            INVALID_PAYLOAD, f"message must be a JSON object (got {type(message).__name__})"
        )
    if not isinstance(message.get("type"), str):
        raise ConnectionRejected(INVALID_PAYLOAD, 'message has no string "type"')
    return message


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects in a parsed JSON value nest more than ``limit`` levels."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


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


def declared_language(hello: dict[str, Any]) -> str | None:
    """The language a device says it speaks (our extension to hello): "auto" or a code.

    A tag is reduced to its primary subtag ("zh-CN" -> "zh"), the codes the
    engines know, so that utterances in one language share batches. "auto"
    asks for detection. A device without the field, or with something
    that is no language tag, gets the deployment's ``asr_language``: the
    firmware does not send it, so a bad value is ignored rather than fatal.
    """
    language = hello.get("language")
    if not isinstance(language, str) or len(language) > 35:
        return None
    language = language.strip().lower()
    if language != "auto" and not _LANGUAGE_TAG.match(language):
        return None
    return re.split(r"[-_]", language, maxsplit=1)[0]
