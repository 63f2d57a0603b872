"""Recognising one utterance: asr and speaker in parallel, then hand-off and delivery.

The result is appended to the transcript stream before it is sent, so a
gateway that dies after computing it still leaves it, exactly once per
utterance id, for the dialogue backend. A result whose device has gone is
kept for the device's next connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from services.common.audio import samples_to_ms
from services.gateway import metrics
from services.protos import asr_pb2

if TYPE_CHECKING:
    from services.gateway.session import DeviceSession

log = logging.getLogger(__name__)

T = TypeVar("T")
_OVERLOAD_CODES = (
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


@dataclass(frozen=True)
class Utterance:
    seq: int
    pcm: bytes
    # Absolute sample offsets in the session's audio.
    start: int
    end: int
    # What ended it: vad, listen_stop, max_length, vad_lost.
    cause: str
    decided_at: float

    def id(self, session_id: str) -> str:
        return f"{session_id}-{self.seq}"


async def recognize(
    session: DeviceSession,
    utterance: Utterance,
    previous: asyncio.Future[None] | None,
    delivered: asyncio.Future[None],
) -> None:
    """Compute, record and deliver one result; results leave in utterance order."""
    utterance_id = utterance.id(session.session_id)
    try:
        asr: asr_pb2.RecognizeResponse | BaseException
        speaker: dict[str, Any] | BaseException | None
        asr, speaker = await asyncio.gather(
            _timed("asr", _transcribe(session, utterance.pcm, utterance_id)),
            _timed("speaker", identify(session, utterance.pcm, utterance_id)),
            return_exceptions=True,
        )
        if previous is not None:
            await previous
        if isinstance(asr, BaseException):
            await _report_failure(session, utterance_id, asr)
            return
        if isinstance(speaker, BaseException):
            log.warning("utterance %s: speaker check failed: %s", utterance_id, speaker)
            speaker = None
        if not asr.text.strip():
            # Noise or a cough: nothing to show the user or hand to the backend.
            metrics.UTTERANCES.labels("empty").inc()
            return
        message = _stt_message(session, utterance, utterance_id, asr, speaker)
        store = session.ctx.store
        await store.append_transcript(
            {
                "utterance_id": utterance_id,
                "device_id": session.device_id,
                "session_id": session.session_id,
                "gateway_id": session.ctx.settings.gateway_id,
                "seq": str(utterance.seq),
                "text": asr.text,
                "language": asr.language,
                "emotion": asr.emotion,
                "event": asr.event,
                "speaker": speaker or "",
                "timing": message["timing"],
            }
        )
        if not await session.send_json(message):
            await store.save_undelivered(session.device_id, message)
        metrics.PROCESSING_SECONDS.observe(time.monotonic() - utterance.decided_at)
        metrics.UTTERANCES.labels("ok").inc()
        await store.save_session(
            session.session_id,
            session.device_id,
            {
                "last_utterance_id": utterance_id,
                "last_text": asr.text,
                "last_result": message,
                "utterances": str(utterance.seq),
            },
        )
    finally:
        delivered.set_result(None)


def _stt_message(
    session: DeviceSession,
    utterance: Utterance,
    utterance_id: str,
    asr: asr_pb2.RecognizeResponse,
    speaker: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "type": "stt",
        "text": asr.text,
        "utterance_id": utterance_id,
        "seq": utterance.seq,
        "language": asr.language,
        "emotion": asr.emotion,
        "event": asr.event,
        "speaker": speaker,
        "timing": {
            "start_ms": samples_to_ms(utterance.start),
            "end_ms": samples_to_ms(utterance.end),
            "audio_ms": samples_to_ms(len(utterance.pcm) // 2),
            "processing_ms": round((time.monotonic() - utterance.decided_at) * 1000, 1),
            "asr_queue_ms": round(asr.queue_ms, 1),
            "asr_model_ms": round(asr.model_ms, 1),
            "asr_batch": asr.batch_size,
            "end_cause": utterance.cause,
        },
    }


async def _report_failure(session: DeviceSession, utterance_id: str, error: BaseException) -> None:
    """Tell the device its utterance was not recognised, rather than stay silent."""
    code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
    overloaded = code in _OVERLOAD_CODES
    reason = "overloaded" if overloaded else "asr_error"
    metrics.UTTERANCES.labels(reason).inc()
    log.warning("utterance %s: recognition failed: %s", utterance_id, error)
    await session.send_json(
        {
            "session_id": session.session_id,
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


async def _transcribe(
    session: DeviceSession, pcm: bytes, utterance_id: str
) -> asr_pb2.RecognizeResponse:
    settings = session.ctx.settings
    return await session.ctx.compute.recognize(
        pcm, settings.asr_language, settings.asr_use_itn, utterance_id, settings.asr_timeout_s
    )


async def identify(session: DeviceSession, pcm: bytes, utterance_id: str) -> dict[str, Any] | None:
    """Best enrolled voiceprint of this device above the threshold, if any."""
    ctx = session.ctx
    prints = await ctx.store.voiceprints(session.device_id)
    if not prints:
        return None
    embedding = await ctx.compute.embed(pcm, utterance_id, ctx.settings.speaker_timeout_s)
    candidates = [p for p in prints if p.model == embedding.model]
    if not candidates:
        metrics.SPEAKER_MATCHES.labels("no_comparable_voiceprint").inc()
        return None
    scores = np.stack([p.embedding for p in candidates]) @ embedding.vector
    best = int(np.argmax(scores))
    if scores[best] < ctx.settings.speaker_threshold:
        metrics.SPEAKER_MATCHES.labels("unknown").inc()
        return None
    metrics.SPEAKER_MATCHES.labels("matched").inc()
    return {
        "speaker_id": candidates[best].speaker_id,
        "name": candidates[best].name,
        "score": round(float(scores[best]), 4),
    }


async def _timed(service: str, awaitable: Awaitable[T]) -> T:
    started = time.monotonic()
    try:
        return await awaitable
    finally:
        metrics.COMPUTE_SECONDS.labels(service).observe(time.monotonic() - started)
