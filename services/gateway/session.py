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
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from services.common.audio import SAMPLE_RATE, ms_to_samples, samples_to_ms
from services.gateway import metrics
from services.gateway.audio_buffer import UtteranceBuffer
from services.gateway.compute import ComputeClients
from services.gateway.config import GatewaySettings
from services.gateway.errors import INVALID_PAYLOAD, ConnectionRejected
from services.gateway.messages import LISTEN_MODES, LISTEN_STATES
from services.gateway.store import SessionStore
from services.gateway.vad_client import VadStreamClient
from services.gateway.vad_router import VadRouter
from services.protos import asr_pb2, vad_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
# Audio replayed to a new VAD replica goes in device-sized (60 ms) frames.
REPLAY_FRAME_SAMPLES = SAMPLE_RATE * 60 // 1000
# Without a known speech start, replay this much so a start the lost replica
# had not yet reported is found again.
REPLAY_LOOKBACK = 2 * SAMPLE_RATE

SendJson = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class GatewayContext:
    """What every session of a gateway shares."""

    settings: GatewaySettings
    store: SessionStore
    compute: ComputeClients
    vad: VadRouter
    hub: SessionHub


class SessionHub:
    """Live sessions of this gateway, and the routing of VAD events to them."""

    def __init__(self) -> None:
        self.sessions: dict[str, DeviceSession] = {}
        self._by_stream: dict[str, DeviceSession] = {}

    def add(self, session: DeviceSession) -> None:
        self.sessions[session.session_id] = session
        metrics.SESSIONS.set(len(self.sessions))

    def remove(self, session: DeviceSession) -> None:
        self.sessions.pop(session.session_id, None)
        metrics.SESSIONS.set(len(self.sessions))

    def bind_stream(self, stream_id: str, session: DeviceSession) -> None:
        self._by_stream[stream_id] = session

    def unbind_stream(self, stream_id: str) -> None:
        self._by_stream.pop(stream_id, None)

    def on_vad_event(self, event: vad_pb2.SpeechEvent) -> None:
        session = self._by_stream.get(event.stream_id)
        if session is not None:
            session.on_vad_event(event)

    def on_vad_lost(self, client: VadStreamClient) -> None:
        for session in list(self.sessions.values()):
            session.on_vad_lost(client)


@dataclass
class _VadStream:
    client: VadStreamClient
    speech_start: int | None = None
    stopped_at: int | None = None


class DeviceSession:
    def __init__(
        self,
        ctx: GatewayContext,
        send_json: SendJson,
        *,
        session_id: str,
        device_id: str,
        client_id: str,
    ) -> None:
        self.ctx = ctx
        self.session_id = session_id
        self.device_id = device_id
        self.client_id = client_id
        self._send_json = send_json
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
                self._open_vad_stream(replay_from=replay_from)

    # -- utterances --------------------------------------------------------

    def _finish_utterance(self, start: int, end: int, cause: str) -> None:
        decided_at = time.monotonic()
        self._replay_floor = max(self._replay_floor, end)
        pcm = self._buffer.slice(start, end)
        self._buffer.discard_before(min(end, self._buffer.end))
        if len(pcm) // 2 < ms_to_samples(self.ctx.settings.min_utterance_ms):
            metrics.UTTERANCES.labels("too_short").inc()
            return
        if len(self._inflight) >= self.ctx.settings.max_inflight_utterances:
            metrics.UTTERANCES.labels("dropped_backlog").inc()
            log.warning("session %s: too many utterances awaiting results", self.session_id)
            return
        self._utterance_seq += 1
        previous = self._last_delivery
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_delivery = delivered
        task = asyncio.create_task(
            self._recognize(
                self._utterance_seq, pcm, start, end, cause, decided_at, previous, delivered
            )
        )
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _recognize(
        self,
        seq: int,
        pcm: bytes,
        start: int,
        end: int,
        cause: str,
        decided_at: float,
        previous: asyncio.Future[None] | None,
        delivered: asyncio.Future[None],
    ) -> None:
        utterance_id = f"{self.session_id}-{seq}"
        try:
            asr: asr_pb2.RecognizeResponse | BaseException
            speaker: dict[str, Any] | BaseException | None
            asr, speaker = await asyncio.gather(
                self._timed("asr", self._transcribe(pcm, utterance_id)),
                self._timed("speaker", self._identify(pcm, utterance_id)),
                return_exceptions=True,
            )
            if previous is not None:
                await previous
            if isinstance(asr, BaseException):
                await self._report_failure(utterance_id, asr)
                return
            if isinstance(speaker, BaseException):
                log.warning("utterance %s: speaker check failed: %s", utterance_id, speaker)
                speaker = None
            processing_ms = (time.monotonic() - decided_at) * 1000
            message = {
                "session_id": self.session_id,
                "type": "stt",
                "text": asr.text,
                "utterance_id": utterance_id,
                "seq": seq,
                "language": asr.language,
                "emotion": asr.emotion,
                "event": asr.event,
                "speaker": speaker,
                "timing": {
                    "start_ms": samples_to_ms(start),
                    "end_ms": samples_to_ms(end),
                    "audio_ms": samples_to_ms(len(pcm) // 2),
                    "processing_ms": round(processing_ms, 1),
                    "asr_queue_ms": round(asr.queue_ms, 1),
                    "asr_model_ms": round(asr.model_ms, 1),
                    "asr_batch": asr.batch_size,
                    "end_cause": cause,
                },
            }
            await self._deliver(message)
            metrics.PROCESSING_SECONDS.observe(time.monotonic() - decided_at)
            metrics.UTTERANCES.labels("ok").inc()
            await self.ctx.store.save_session(
                self.session_id,
                self.device_id,
                {
                    "last_utterance_id": utterance_id,
                    "last_text": asr.text,
                    "last_result": message,
                    "utterances": str(seq),
                },
            )
        finally:
            delivered.set_result(None)

    async def _report_failure(self, utterance_id: str, error: BaseException) -> None:
        """Tell the device its utterance was not recognised, rather than stay silent."""
        code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
        overloaded = code in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        reason = "overloaded" if overloaded else "asr_error"
        metrics.UTTERANCES.labels(reason).inc()
        log.warning("utterance %s: recognition failed: %s", utterance_id, error)
        await self._deliver(
            {
                "session_id": self.session_id,
                "type": "alert",
                "status": "error",
                "message": "speech service busy, please try again"
                if overloaded
                else "speech recognition failed",
                "emotion": "sad",
                "utterance_id": utterance_id,
                "reason": reason,
            }
        )

    async def _transcribe(self, pcm: bytes, utterance_id: str) -> asr_pb2.RecognizeResponse:
        settings = self.ctx.settings
        return await self.ctx.compute.recognize(
            pcm, settings.asr_language, settings.asr_use_itn, utterance_id, settings.asr_timeout_s
        )

    async def _identify(self, pcm: bytes, utterance_id: str) -> dict[str, Any] | None:
        """Best enrolled voiceprint of this device above the threshold, if any."""
        prints = await self.ctx.store.voiceprints(self.device_id)
        if not prints:
            return None
        embedding = await self.ctx.compute.embed(
            pcm, utterance_id, self.ctx.settings.speaker_timeout_s
        )
        candidates = [p for p in prints if p.model == embedding.model]
        if not candidates:
            metrics.SPEAKER_MATCHES.labels("no_comparable_voiceprint").inc()
            return None
        scores = np.stack([p.embedding for p in candidates]) @ embedding.vector
        best = int(np.argmax(scores))
        if scores[best] < self.ctx.settings.speaker_threshold:
            metrics.SPEAKER_MATCHES.labels("unknown").inc()
            return None
        metrics.SPEAKER_MATCHES.labels("matched").inc()
        return {
            "speaker_id": candidates[best].speaker_id,
            "name": candidates[best].name,
            "score": round(float(scores[best]), 4),
        }

    @staticmethod
    async def _timed(service: str, awaitable: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await awaitable
        finally:
            metrics.COMPUTE_SECONDS.labels(service).observe(time.monotonic() - started)

    async def _deliver(self, message: dict[str, Any]) -> None:
        try:
            await self._send_json(message)
        except Exception as exc:
            # The device left; the result stays in Redis with the session record.
            log.info("session %s: result not delivered: %s", self.session_id, exc)

    # -- lifecycle -------------------------------------------------------

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

    async def close(self) -> None:
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
