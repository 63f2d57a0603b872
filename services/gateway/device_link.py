"""How a session reaches its device: text messages, Opus audio and the close."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.gateway.framing import PayloadType, encode_frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceLink:
    send_text: Callable[[str], Awaitable[None]]
    send_bytes: Callable[[bytes], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]
    protocol_version: int

    async def send_json(self, message: dict[str, Any]) -> bool:
        """Send a message; False when the device has gone (the caller keeps the result)."""
        try:
            await self.send_text(json.dumps(message, ensure_ascii=False))
        except Exception as exc:
            log.info("message to device not delivered: %s", exc)
            return False
        return True

    async def send_opus(self, packet: bytes) -> bool:
        try:
            await self.send_bytes(encode_frame(self.protocol_version, packet, PayloadType.OPUS))
        except Exception:
            return False
        return True
