"""A FunASR input's config message and the connection's text messages."""

from __future__ import annotations

import json
import logging
from typing import Any

from services.gateway.compat.funasr_input import InputConfig
from services.gateway.errors import INVALID_PAYLOAD, UNSUPPORTED_DATA, ConnectionRejected

log = logging.getLogger(__name__)

MODES = ("offline", "online", "2pass")
AUDIO_RATES = range(8000, 48001)
DEFAULT_CHUNK = 10  # 60 ms units between partials (FunASR's chunk_size middle value)
MAX_JSON_DEPTH = 8


def parse_config(message: dict[str, Any], tags: bool, language: str, itn: bool) -> InputConfig:
    """An input's settings from its first message; unknown fields are ignored."""
    mode = message.get("mode")
    if mode not in MODES:
        raise ConnectionRejected(UNSUPPORTED_DATA, f"unsupported mode {mode!r}: use {MODES}")
    chunk = message.get("chunk_size")
    middle = DEFAULT_CHUNK
    if isinstance(chunk, list) and len(chunk) == 3 and all(type(c) is int for c in chunk):
        middle = max(1, min(100, chunk[1]))
    rate = message.get("audio_fs", 16000)
    if type(rate) is not int or rate not in AUDIO_RATES:
        raise ConnectionRejected(INVALID_PAYLOAD, f"unsupported audio_fs {rate!r}")
    wav_format = str(message.get("wav_format", "pcm") or "pcm").lower()
    if message.get("hotwords"):
        log.info("funasr: hotwords are not supported by the ASR engines here; ignored")
    use_itn = message.get("itn", message.get("svs_itn", itn))
    lang = message.get("svs_lang", language)
    return InputConfig(
        mode=mode,
        wav_name=str(message.get("wav_name", "demo"))[:256],
        stride=middle * 60 * 16,
        audio_fs=rate,
        container=wav_format != "pcm",
        itn=bool(use_itn),
        language=lang if isinstance(lang, str) and lang else language,
        tags=tags,
    )


def _depth(value: Any, limit: int) -> bool:
    if limit <= 0:
        return False
    if isinstance(value, dict):
        return all(_depth(v, limit - 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth(v, limit - 1) for v in value)
    return True


def parse_text(text: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise ConnectionRejected(INVALID_PAYLOAD, "text message is not JSON") from None
    if not isinstance(message, dict) or not _depth(message, MAX_JSON_DEPTH):
        raise ConnectionRejected(INVALID_PAYLOAD, "text message must be a flat JSON object")
    return message
