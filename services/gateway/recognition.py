"""Recognising one utterance: asr and speaker in parallel, then hand-off and delivery.

The result is appended to the transcript stream before it is sent, so a
gateway that dies after computing it still leaves it, exactly once per
utterance id, for the dialogue backend. A result whose device has gone is
kept for the device's next connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from services.common.audio import samples_to_ms
from services.gateway import metrics
from services.gateway.compute import ComputeClients
from services.gateway.config import GatewaySettings
from services.gateway.hub import CONTROL_PREFIX
from services.gateway.store import SessionStore
from services.gateway.utterances import Utterance
from services.protos import asr_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
_OVERLOAD_CODES = (
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)

SendJson = Callable[[dict[str, Any]], Awaitable[bool]]


@dataclass(frozen=True)
class Speaker:
    """Whose utterance it is: the session and device its result belongs to."""

    session_id: str
    device_id: str
    # What the device's hello asked for; "" leaves it to the deployment's setting.
    language: str = ""


@dataclass(frozen=True)
class Recognition:
    utterance: Utterance
    utterance_id: str
    asr: asr_pb2.RecognizeResponse | BaseException
    speaker: dict[str, Any] | None


class Recognizer:
    def __init__(
        self, settings: GatewaySettings, compute: ComputeClients, store: SessionStore
    ) -> None:
        self._settings = settings
        self._compute = compute
        self._store = store

    async def compute(self, who: Speaker, utterance: Utterance) -> Recognition:
        """Text and speaker of one utterance; a failure is kept in the result."""
        utterance_id = utterance.id(who.session_id)
        asr: asr_pb2.RecognizeResponse | BaseException
        speaker: dict[str, Any] | BaseException | None
        asr, speaker = await asyncio.gather(
            _timed("asr", self._transcribe(utterance.pcm, utterance_id, who.language)),
            _timed("speaker", self.identify(who.device_id, utterance.pcm, utterance_id)),
            return_exceptions=True,
        )
        if isinstance(speaker, BaseException):
            log.warning("utterance %s: speaker check failed: %s", utterance_id, speaker)
            speaker = None
        return Recognition(utterance, utterance_id, asr, speaker)

    async def publish(self, who: Speaker, result: Recognition, send: SendJson) -> None:
        """Record a result and deliver it (or keep it for the device's next connection)."""
        asr, utterance, utterance_id = result.asr, result.utterance, result.utterance_id
        if isinstance(asr, BaseException):
            await _report_failure(who, utterance_id, asr, send)
            return
        if not asr.text.strip():
            # Noise or a cough: nothing to show the user or hand to the backend.
            metrics.UTTERANCES.labels("empty").inc()
            return
        message = _stt_message(who, utterance, utterance_id, asr, result.speaker)
        await self._store.append_transcript(
            {
                "utterance_id": utterance_id,
                "device_id": who.device_id,
                "session_id": who.session_id,
                "gateway_id": self._settings.gateway_id,
                "seq": str(utterance.seq),
                "text": asr.text,
                "language": asr.language,
                "emotion": asr.emotion,
                "event": asr.event,
                "speaker": result.speaker or "",
                "timing": message["timing"],
            }
        )
        if not await send(message):
            await self._keep_for_device(who, message)
        metrics.PROCESSING_SECONDS.observe(time.monotonic() - utterance.decided_at)
        metrics.UTTERANCES.labels("ok").inc()
        await self._store.save_session(
            who.session_id,
            who.device_id,
            {
                "last_utterance_id": utterance_id,
                "last_text": asr.text,
                "last_result": message,
                "utterances": str(utterance.seq),
            },
        )

    async def _keep_for_device(self, who: Speaker, message: dict[str, Any]) -> None:
        """The device has left this session: keep the result for it, and tell the
        session it already has elsewhere, which read the kept results when it
        began (a device that was handed off or dropped reconnects at once)."""
        await self._store.save_undelivered(who.device_id, message)
        route = await self._store.device_route(who.device_id)
        current, gateway = route.get("session_id"), route.get("gateway_id")
        if current and gateway and current != who.session_id:
            notice = json.dumps({"redeliver": current})
            await self._store.publish(f"{CONTROL_PREFIX}{gateway}", notice)

    async def _transcribe(
        self, pcm: bytes, utterance_id: str, language: str
    ) -> asr_pb2.RecognizeResponse:
        settings = self._settings
        return await self._compute.recognize(
            pcm,
            language or settings.asr_language,
            settings.asr_use_itn,
            utterance_id,
            settings.asr_timeout_s,
        )

    async def identify(
        self, device_id: str, pcm: bytes, utterance_id: str
    ) -> dict[str, Any] | None:
        """Best enrolled voiceprint of this device above the threshold, if any."""
        prints = await self._store.voiceprints(device_id)
        if not prints:
            return None
        settings = self._settings
        embedding = await self._compute.embed(pcm, utterance_id, settings.speaker_timeout_s)
        candidates = [p for p in prints if p.model == embedding.model]
        if not candidates:
            metrics.SPEAKER_MATCHES.labels("no_comparable_voiceprint").inc()
            return None
        scores = np.stack([p.embedding for p in candidates]) @ embedding.vector
        best = int(np.argmax(scores))
        if scores[best] < settings.speaker_threshold:
            metrics.SPEAKER_MATCHES.labels("unknown").inc()
            return None
        metrics.SPEAKER_MATCHES.labels("matched").inc()
        return {
            "speaker_id": candidates[best].speaker_id,
            "name": candidates[best].name,
            "score": round(float(scores[best]), 4),
        }


def _stt_message(
    who: Speaker,
    utterance: Utterance,
    utterance_id: str,
    asr: asr_pb2.RecognizeResponse,
    speaker: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "session_id": who.session_id,
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


async def _report_failure(
    who: Speaker, utterance_id: str, error: BaseException, send: SendJson
) -> None:
    """Tell the device its utterance was not recognised, rather than stay silent."""
    code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
    overloaded = code in _OVERLOAD_CODES
    reason = "overloaded" if overloaded else "asr_error"
    metrics.UTTERANCES.labels(reason).inc()
    log.warning("utterance %s: recognition failed: %s", utterance_id, error)
    await send(
        {
            "session_id": who.session_id,
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


async def _timed(service: str, awaitable: Awaitable[T]) -> T:
    started = time.monotonic()
    try:
        return await awaitable
    finally:
        metrics.COMPUTE_SECONDS.labels(service).observe(time.monotonic() - started)
