"""A FunASR runtime WebSocket client, speaking the protocol as FunASR's own
clients and xiaozhi-esp32-server's ``fun_server`` provider do (for tests,
benchmarks and trying the endpoint by hand)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from services.common.audio import SAMPLE_RATE


@dataclass
class Received:
    message: dict[str, Any]
    at: float  # time.monotonic() on arrival


@dataclass
class FunasrClient:
    url: str
    key: str | None = None
    # xiaozhi sends "Bearer; <key>", most other clients "Bearer <key>".
    semicolon: bool = True
    received: list[Received] = field(default_factory=list)
    _ws: ClientConnection | None = None
    # Read as they arrive (as FunASR's client does), so arrival times are true.
    _inbox: asyncio.Queue[Received | Exception] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        headers = {}
        if self.key is not None:
            headers["Authorization"] = f"Bearer{';' if self.semicolon else ''} {self.key}"
        self._ws = await websockets.connect(
            self.url,
            additional_headers=headers,
            subprotocols=[Subprotocol("binary")],
            ping_interval=None,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self._inbox.put_nowait(Received(json.loads(raw), time.monotonic()))
            await self.ws.recv()  # raises the closure, with its code and reason
        except Exception as exc:
            self._inbox.put_nowait(exc)

    @property
    def ws(self) -> ClientConnection:
        assert self._ws is not None, "not connected"
        return self._ws

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()

    async def config(self, mode: str, wav_name: str = "demo", **extra: Any) -> None:
        message = {
            "mode": mode,
            "chunk_size": [5, 10, 5],
            "chunk_interval": 10,
            "wav_name": wav_name,
            "is_speaking": True,
            **extra,
        }
        await self.ws.send(json.dumps(message))

    async def end(self, is_end: bool = False) -> None:
        message: dict[str, Any] = {"is_speaking": False}
        if is_end:
            message["is_end"] = True
        await self.ws.send(json.dumps(message))

    async def stream(self, pcm: bytes, chunk_ms: int = 60, pace: float = 1.0) -> float:
        """Send ``pcm`` in chunks at ``pace`` × real time; when the last chunk left."""
        step = SAMPLE_RATE * chunk_ms // 1000 * 2
        started = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), step)):
            await self.ws.send(pcm[offset : offset + step])
            due = started + (i + 1) * chunk_ms / 1000 / pace
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        return time.monotonic()

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, Exception):
            self._inbox.put_nowait(item)  # every later read fails the same way
            raise item
        self.received.append(item)
        return item.message

    async def read_like_xiaozhi(self, timeout: float = 5.0) -> str:
        """xiaozhi's reading: append ``text`` until a message whose ``is_final``
        is true or missing (5 s per message)."""
        text = ""
        while True:
            message = await self.recv(timeout)
            text += message.get("text", "")
            if message.get("is_final", True):
                return text

    async def until_end(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every message up to and including the end-of-input acknowledgement."""
        deadline = time.monotonic() + timeout
        messages = []
        while True:
            message = await self.recv(max(0.1, deadline - time.monotonic()))
            messages.append(message)
            if message.get("is_end"):
                return messages
