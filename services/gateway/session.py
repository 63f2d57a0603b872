"""One device's session: the listen state machine and its utterances.

Audio is addressed in samples from the first frame of the session (audio
time). In ``auto`` and ``realtime`` mode each listen period is a VAD stream
whose origin is the buffer offset at ``listen start``, so VAD events point
straight into the buffer. In ``manual`` mode the utterance is everything
between ``listen start`` and ``listen stop``.

Results are computed concurrently but delivered to the device in utterance
order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.common.audio import SAMPLE_RATE, loudest_frame_dbfs, ms_to_samples
from services.gateway import metrics
from services.gateway.audio_buffer import UtteranceBuffer
from services.gateway.errors import GOING_RESTART, INVALID_PAYLOAD, ConnectionRejected
from services.gateway.framing import PayloadType, encode_frame
from services.gateway.hub import GatewayContext
from services.gateway.messages import LISTEN_MODES, LISTEN_STATES
from services.gateway.recognition import Utterance, recognize
from services.gateway.vad_client import VadStreamClient
from services.protos import vad_pb2

log = logging.getLogger(__name__)

# Audio replayed to a new VAD replica goes in device-sized (60 ms) frames.
REPLAY_FRAME_SAMPLES = SAMPLE_RATE * 60 // 1000
# Without a known speech start, replay this much so a start the lost replica
# had not yet reported is found again.
REPLAY_LOOKBACK = 2 * SAMPLE_RATE
# A refused VAD stream is re-opened at once, then after pauses doubling from
# 0.25 s to 2 s: a replica at its stream limit would otherwise be asked again
# in a tight loop. Refusals further apart than this start the count afresh.
REFUSAL_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0)
REFUSAL_RESET_S = 10.0


@dataclass(frozen=True)
class DeviceLink:
    """How a session reaches its device (the WebSocket)."""

    send_text: Callable[[str], Awaitable[None]]
    send_bytes: Callable[[bytes], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]
    protocol_version: int


@dataclass
class _VadStream:
    client: VadStreamClient
    speech_start: int | None = None
    stopped_at: int | None = None


class DeviceSession:
    def __init__(
        self,
        ctx: GatewayContext,
        link: DeviceLink,
        *,
        session_id: str,
        device_id: str,
        client_id: str,
    ) -> None:
        self.ctx = ctx
        self.session_id = session_id
        self.device_id = device_id
        self.client_id = client_id
        self._link = link
        settings = ctx.settings
        self._max_utterance = ms_to_samples(int(settings.max_utterance_s * 1000))
        # Room for the longest utterance plus what VAD looks back before a start.
        self._buffer = UtteranceBuffer(self._max_utterance + 2 * SAMPLE_RATE)
        self.mode: str | None = None
        # VAD streams still open for this session. A stopped listen period's
        # stream stays here until VAD confirms it closed, so its last END is
        # not lost when a new period has already begun.
        self._streams: dict[str, _VadStream] = {}
        self._stream_id: str | None = None
        # Replays after a VAD replica loss never reach back past this point,
        # so no finished utterance is recognised twice.
        self._replay_floor = 0
        self._stream_count = 0
        self._frame_seq = 0
        self._manual_start: int | None = None
        self._utterance_seq = 0
        self._inflight: set[asyncio.Task[None]] = set()
        self._last_delivery: asyncio.Future[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._refusals = 0
        self._last_refusal = 0.0
        self._vad_retry: asyncio.TimerHandle | None = None

    # -- device messages -------------------------------------------------

    async def handle_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "listen":
            await self._handle_listen(message)
        elif kind == "abort":
            self._record({"last_abort": str(message.get("reason", ""))})
        elif kind == "hello":
            log.info("session %s: repeated hello ignored", self.session_id)
        else:
            # mcp and anything newer firmware sends: tolerated, not ours to act on.
            log.debug("session %s: message type %r ignored", self.session_id, kind)

    async def _handle_listen(self, message: dict[str, Any]) -> None:
        state = message.get("state")
        if state not in LISTEN_STATES:
            raise ConnectionRejected(
                INVALID_PAYLOAD, f"listen state must be one of {LISTEN_STATES}"
            )
        if state == "start":
            mode = message.get("mode", "auto")
            if mode not in LISTEN_MODES:
                raise ConnectionRejected(
                    INVALID_PAYLOAD, f"listen mode must be one of {LISTEN_MODES}"
                )
            self._start_listening(mode)
        elif state == "stop":
            self._stop_listening()
        else:
            self._record({"last_wake_word": str(message.get("text", ""))})

    def _start_listening(self, mode: str) -> None:
        self._stop_listening()
        self.mode = mode
        self._replay_floor = self._buffer.end
        if mode == "manual":
            self._manual_start = self._buffer.end
        else:
            self._open_vad_stream()
        self._record({"mode": mode, "listening": "1"})

    def _stop_listening(self) -> None:
        self._cancel_vad_retry()
        if self.mode == "manual" and self._manual_start is not None:
            self._finish_utterance(self._manual_start, self._buffer.end, "listen_stop")
        self._manual_start = None
        if self._stream_id is not None:
            # Speech in progress ends at the last frame: VAD answers with an end event.
            stream = self._streams[self._stream_id]
            stream.client.close(self._stream_id, flush=True)
            stream.stopped_at = self._buffer.end
            self._stream_id = None
        if self.mode is not None:
            self._record({"listening": "0"})
        self.mode = None

    def _open_vad_stream(
        self, replay_from: int | None = None, avoid: VadStreamClient | None = None
    ) -> None:
        client = self.ctx.vad.pick(self.session_id, avoid=avoid)
        self._stream_count += 1
        self._stream_id = stream_id = f"{self.session_id}/{self._stream_count}"
        self._frame_seq = 0
        self._streams[stream_id] = _VadStream(client)
        self.ctx.hub.bind_stream(stream_id, self)
        origin = self._buffer.end if replay_from is None else max(replay_from, self._buffer.start)
        client.open(stream_id, start_sample=origin, silence_ms=self.ctx.settings.vad_silence_ms)
        step = REPLAY_FRAME_SAMPLES * 2
        replay = self._buffer.slice(origin, self._buffer.end)
        for offset in range(0, len(replay), step):
            self._frame_seq += 1
            client.send(stream_id, self._frame_seq, replay[offset : offset + step])

    def _forget_stream(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)
        self.ctx.hub.unbind_stream(stream_id)
        if stream_id == self._stream_id:
            self._stream_id = None

    def on_vad_lost(self, client: VadStreamClient) -> None:
        """A VAD replica is gone: re-pin to another and replay the unfinished utterance."""
        current = self._streams.get(self._stream_id) if self._stream_id else None
        for stream_id, stream in list(self._streams.items()):
            if stream.client is not client:
                continue
            if stream is not current and stream.speech_start is not None:
                # A stopped listen period whose end never came: it ended at the stop.
                end = stream.stopped_at if stream.stopped_at is not None else self._buffer.end
                self._finish_utterance(stream.speech_start, end, "vad_lost")
            self._forget_stream(stream_id)
        if current is not None and current.client is client:
            metrics.VAD_REPLAYS.inc()
            replay_from = current.speech_start
            if replay_from is None:
                # Speech may have begun without its start reaching us yet.
                replay_from = max(self._replay_floor, self._buffer.end - REPLAY_LOOKBACK)
            self._open_vad_stream(replay_from=replay_from, avoid=client)

    # -- audio -----------------------------------------------------------

    def handle_audio(self, pcm: bytes) -> None:
        metrics.FRAMES.inc()
        self._buffer.append(pcm)
        if self._stream_id is not None:
            self._frame_seq += 1
            stream = self._streams[self._stream_id]
            stream.client.send(self._stream_id, self._frame_seq, pcm)
            start = stream.speech_start
            if start is not None and self._too_long(start):
                stream.speech_start = self._buffer.end
                self._finish_utterance(start, self._buffer.end, "max_length")
        elif self._manual_start is not None and self._too_long(self._manual_start):
            start, self._manual_start = self._manual_start, self._buffer.end
            self._finish_utterance(start, self._buffer.end, "max_length")

    def _too_long(self, start: int) -> bool:
        """Utterances are bounded: past the limit, cut and go on as a new one."""
        if self._buffer.end - start < self._max_utterance:
            return False
        metrics.UTTERANCES.labels("truncated").inc()
        return True

    def on_vad_event(self, event: vad_pb2.SpeechEvent) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        kind = event.kind
        if kind == vad_pb2.SpeechEvent.SPEECH_START:
            stream.speech_start = ms_to_samples(event.offset_ms)
        elif kind == vad_pb2.SpeechEvent.SPEECH_END:
            start, stream.speech_start = stream.speech_start, None
            if start is not None:
                self._finish_utterance(start, ms_to_samples(event.offset_ms), "vad")
        elif kind == vad_pb2.SpeechEvent.STREAM_CLOSED:
            self._forget_stream(event.stream_id)
        elif kind == vad_pb2.SpeechEvent.STREAM_ERROR:
            log.warning("session %s: VAD refused stream: %s", self.session_id, event.detail)
            current = event.stream_id == self._stream_id
            replay_from = stream.speech_start
            self._forget_stream(event.stream_id)
            if current:
                self._reopen_after_refusal(replay_from, stream.client)

    def _reopen_after_refusal(self, replay_from: int | None, refused_by: VadStreamClient) -> None:
        now = time.monotonic()
        if now - self._last_refusal > REFUSAL_RESET_S:
            self._refusals = 0
        self._last_refusal = now
        delay = REFUSAL_BACKOFF_S[min(self._refusals, len(REFUSAL_BACKOFF_S) - 1)]
        self._refusals += 1
        # Audio that arrives during the pause is replayed to the new stream.
        origin = self._buffer.end if replay_from is None else replay_from

        def reopen() -> None:
            self._vad_retry = None
            if self._stream_id is None and self.mode not in (None, "manual"):
                self._open_vad_stream(replay_from=origin, avoid=refused_by)

        if delay == 0:
            reopen()
        else:
            self._vad_retry = asyncio.get_running_loop().call_later(delay, reopen)

    def _cancel_vad_retry(self) -> None:
        if self._vad_retry is not None:
            self._vad_retry.cancel()
            self._vad_retry = None

    # -- utterances --------------------------------------------------------

    def _finish_utterance(self, start: int, end: int, cause: str) -> None:
        decided_at = time.monotonic()
        # The silence window after an end is silence by definition (that is how
        # the end was decided): a replay starting there cannot cut a word in two.
        silence = ms_to_samples(self.ctx.settings.vad_silence_ms)
        self._replay_floor = max(self._replay_floor, min(end + silence, self._buffer.end))
        pcm = self._buffer.slice(start, end)
        self._buffer.discard_before(min(end, self._buffer.end))
        if len(pcm) // 2 < ms_to_samples(self.ctx.settings.min_utterance_ms):
            metrics.UTTERANCES.labels("too_short").inc()
            return
        if loudest_frame_dbfs(pcm) < self.ctx.settings.min_speech_dbfs:
            # Near-digital silence (a muted or noise-suppressed microphone) can
            # still trip the VAD, and Whisper answers silence with "you".
            metrics.UTTERANCES.labels("silent").inc()
            return
        if len(self._inflight) >= self.ctx.settings.max_inflight_utterances:
            metrics.UTTERANCES.labels("dropped_backlog").inc()
            log.warning("session %s: too many utterances awaiting results", self.session_id)
            return
        self._utterance_seq += 1
        utterance = Utterance(self._utterance_seq, pcm, start, end, cause, decided_at)
        previous = self._last_delivery
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_delivery = delivered
        task = asyncio.create_task(recognize(self, utterance, previous, delivered))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    # -- to the device -----------------------------------------------------

    async def send_json(self, message: dict[str, Any]) -> bool:
        """Send a message; False when the device has gone (the caller keeps the result)."""
        try:
            await self._link.send_text(json.dumps(message, ensure_ascii=False))
        except Exception as exc:
            log.info("session %s: message not delivered: %s", self.session_id, exc)
            return False
        return True

    async def deliver_reply(self, data: bytes) -> str:
        """Forward a backend message: JSON as a text frame, anything else as Opus audio."""
        if data[:1] == b"{":
            try:
                message = json.loads(data)
            except ValueError:
                return "dropped"
            message["session_id"] = self.session_id
            return "json" if await self.send_json(message) else "dropped"
        try:
            version = self._link.protocol_version
            await self._link.send_bytes(encode_frame(version, data, PayloadType.OPUS))
        except Exception:
            return "dropped"
        return "audio"

    async def deliver_undelivered(self) -> None:
        """Results computed for this device while it was away, oldest first."""
        for message in await self.ctx.store.take_undelivered(self.device_id):
            message.setdefault("original_session_id", message.get("session_id"))
            message["session_id"] = self.session_id
            message["redelivered"] = True
            if not await self.send_json(message):
                await self.ctx.store.save_undelivered(self.device_id, message)

    # -- lifecycle -------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop listening: speech in progress ends now and is still recognised."""
        self._stop_listening()

    async def wait_idle(self, timeout: float) -> None:
        """Until every utterance has its result and every VAD stream is closed (bounded)."""
        deadline = time.monotonic() + timeout
        while (self._inflight or self._streams) and time.monotonic() < deadline:
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=deadline - time.monotonic())
            else:
                await asyncio.sleep(0.02)

    def record_connected(
        self, client_id: str, protocol_version: int, hello: dict[str, Any]
    ) -> None:
        self._record(
            {
                "session_id": self.session_id,
                "device_id": self.device_id,
                "client_id": client_id,
                "gateway_id": self.ctx.settings.gateway_id,
                "protocol_version": str(protocol_version),
                "audio_params": hello.get("audio_params", {}),
                "features": hello.get("features", {}),
                "connected_at": str(time.time()),
            }
        )

    def _record(self, fields: dict[str, Any]) -> None:
        task = asyncio.create_task(
            self.ctx.store.save_session(self.session_id, self.device_id, fields)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close_for_restart(self) -> None:
        """Close the device socket with 1012 (service restart): devices reconnect."""
        await self._link.close(GOING_RESTART, "gateway restarting, please reconnect")

    async def close(self) -> None:
        self._cancel_vad_retry()
        for stream_id, stream in list(self._streams.items()):
            stream.client.close(stream_id, flush=False)
            self._forget_stream(stream_id)
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.ctx.settings.asr_timeout_s * 2)
        await self.ctx.store.save_session(
            self.session_id, self.device_id, {"disconnected_at": str(time.time())}
        )


def new_session_id() -> str:
    return uuid.uuid4().hex
