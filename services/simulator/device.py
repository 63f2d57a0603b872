"""A simulated xiaozhi device: the protocol as firmware speaks it, real Opus, real-time pace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import opuslib
import websockets
from websockets.asyncio.client import ClientConnection

from services.common.audio import SAMPLE_RATE, float_to_pcm16
from services.gateway.framing import PayloadType, encode_frame
from services.simulator.speech import silence, trim_silence

FRAME_MS = 60
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000


@dataclass
class SttResult:
    message: dict[str, Any]
    received_at: float
    # From the last voiced frame leaving the device to this message arriving.
    latency_s: float | None = None

    @property
    def text(self) -> str:
        return str(self.message.get("text", ""))


@dataclass
class DeviceConfig:
    url: str
    device_id: str = field(default_factory=lambda: "sim:" + uuid.uuid4().hex[:12])
    client_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    token: str | None = None
    protocol_version: int = 3
    # 1.0 is real time; larger sends faster (VAD works in audio time either way).
    speed: float = 1.0
    # Fields that replace the hello's defaults (e.g. other audio_params).
    hello_extra: dict[str, Any] = field(default_factory=dict)


class SimulatedDevice:
    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.session_id = ""
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # Binary frames from the server (TTS audio), as received.
        self.audio_frames: list[bytes] = []
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._encoder = opuslib.Encoder(SAMPLE_RATE, 1, opuslib.APPLICATION_VOIP)
        self.close_code: int | None = None
        self.close_reason: str = ""
        self.closed = asyncio.Event()

    # -- connection ------------------------------------------------------

    async def connect(self, send_hello: bool = True) -> None:
        headers = {
            "Protocol-Version": str(self.config.protocol_version),
            "Device-Id": self.config.device_id,
            "Client-Id": self.config.client_id,
        }
        if self.config.token is not None:
            headers["Authorization"] = f"Bearer {self.config.token}"
        self._ws = await websockets.connect(
            self.config.url, additional_headers=headers, max_size=1 << 22, open_timeout=10
        )
        self._reader = asyncio.create_task(self._read())
        if send_hello:
            await self.hello()

    async def hello(self) -> None:
        """Send the device's hello and take the session id from the reply."""
        await self.send_json(
            {
                "type": "hello",
                "version": self.config.protocol_version,
                "features": {"mcp": True},
                "transport": "websocket",
                "audio_params": {
                    "format": "opus",
                    "sample_rate": SAMPLE_RATE,
                    "channels": 1,
                    "frame_duration": FRAME_MS,
                },
                **self.config.hello_extra,
            }
        )
        hello = await self.expect("hello", timeout=10)
        self.session_id = str(hello["session_id"])

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)

    async def __aenter__(self) -> SimulatedDevice:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                if isinstance(raw, str):
                    message = json.loads(raw)
                    message["_received_at"] = time.monotonic()
                    await self.messages.put(message)
                else:
                    self.audio_frames.append(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._ws.close_code is not None:
                self.close_code = self._ws.close_code
                self.close_reason = self._ws.close_reason or ""
            self.closed.set()

    async def wait_closed(self, timeout: float = 10) -> tuple[int | None, str]:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code, self.close_reason

    # -- messages --------------------------------------------------------

    async def send_json(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        assert self._ws is not None
        await self._ws.send(data)

    async def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next message of ``kind``; others that arrive first are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind!r} message within {timeout} s")
            get = asyncio.ensure_future(self.messages.get())
            closed = asyncio.ensure_future(self.closed.wait())
            done, _ = await asyncio.wait(
                {get, closed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            closed.cancel()
            if get not in done:
                get.cancel()
                if self.closed.is_set() and self.messages.empty():
                    raise ConnectionError(
                        f"closed ({self.close_code} {self.close_reason}) while waiting for {kind}"
                    )
                continue
            message = get.result()
            if message.get("type") == kind:
                return message

    async def listen(self, state: str, mode: str | None = None, **extra: Any) -> None:
        message: dict[str, Any] = {"session_id": self.session_id, "type": "listen", "state": state}
        if mode is not None:
            message["mode"] = mode
        message.update(extra)
        await self.send_json(message)

    # -- audio -----------------------------------------------------------

    def encode(self, samples: np.ndarray) -> list[bytes]:
        """Opus packets of 60 ms (the last one zero-padded)."""
        pad = (-samples.size) % FRAME_SAMPLES
        padded = np.concatenate([samples, np.zeros(pad, dtype=np.float32)]) if pad else samples
        pcm = float_to_pcm16(padded)
        step = FRAME_SAMPLES * 2
        return [
            self._encoder.encode(pcm[i : i + step], FRAME_SAMPLES) for i in range(0, len(pcm), step)
        ]

    async def stream(
        self, samples: np.ndarray, marks: dict[int, str] | None = None
    ) -> dict[str, float]:
        """Send audio as paced Opus frames.

        ``marks`` names sample offsets; the send time of the frame holding
        each is returned (used to time the last voiced frame of an utterance).
        """
        frame_marks = {offset // FRAME_SAMPLES: name for offset, name in (marks or {}).items()}
        return await self.stream_packets(self.encode(samples), frame_marks)

    async def send_packet(self, packet: bytes) -> None:
        """One Opus packet in this device's framing, unpaced."""
        assert self._ws is not None
        await self._ws.send(encode_frame(self.config.protocol_version, packet, PayloadType.OPUS))

    async def stream_packets(
        self, packets: list[bytes], marks: dict[int, str] | None = None
    ) -> dict[str, float]:
        """Send already-encoded packets at the configured pace; ``marks`` by packet index."""
        assert self._ws is not None
        frame_s = FRAME_MS / 1000 / self.config.speed
        started = time.monotonic()
        sent_at: dict[str, float] = {}
        marks = marks or {}
        for index, packet in enumerate(packets):
            delay = started + index * frame_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = encode_frame(
                self.config.protocol_version, packet, PayloadType.OPUS, index * FRAME_MS
            )
            await self._ws.send(frame)
            if index in marks:
                sent_at[marks[index]] = time.monotonic()
        return sent_at

    # -- scenarios ---------------------------------------------------------

    async def speak_auto(
        self,
        utterances: list[np.ndarray],
        gap_s: float = 1.2,
        tail_s: float = 1.5,
        timeout: float = 30.0,
        mode: str = "auto",
        lead_s: float = 0.3,
    ) -> list[SttResult]:
        """Utterances separated by silence in one listen period; the VAD cuts them."""
        parts: list[np.ndarray] = [silence(lead_s)]
        marks: dict[int, str] = {}
        offset = parts[0].size
        for i, utterance in enumerate(utterances):
            speech = trim_silence(utterance)
            parts.append(speech)
            marks[offset + speech.size - 1] = str(i)
            offset += speech.size
            gap = silence(gap_s if i < len(utterances) - 1 else tail_s)
            parts.append(gap)
            offset += gap.size
        await self.listen("start", mode)
        sent_at = await self.stream(np.concatenate(parts), marks)
        results = await self._collect(len(utterances), sent_at, timeout)
        await self.listen("stop")
        return results

    async def speak_manual(
        self, utterances: list[np.ndarray], timeout: float = 30.0
    ) -> list[SttResult]:
        """One listen start/stop pair per utterance; the device decides where it ends."""
        results: list[SttResult] = []
        for utterance in utterances:
            speech = trim_silence(utterance)
            await self.listen("start", "manual")
            sent_at = await self.stream(
                np.concatenate([speech, silence(0.2)]), {speech.size - 1: "0"}
            )
            await self.listen("stop")
            results.extend(await self._collect(1, sent_at, timeout))
        return results

    async def _collect(
        self, count: int, sent_at: dict[str, float], timeout: float
    ) -> list[SttResult]:
        results: list[SttResult] = []
        deadline = time.monotonic() + timeout
        while len(results) < count:
            message = await self.expect("stt", timeout=max(0.0, deadline - time.monotonic()))
            received = float(message.pop("_received_at"))
            voiced_end = sent_at.get(str(len(results)))
            latency = None if voiced_end is None else received - voiced_end
            results.append(SttResult(message, received, latency))
        return results
