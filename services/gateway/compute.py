"""Calls to the stateless compute services (asr, speaker): deadlines, hedges and retries.

Each target may list several replicas or name a headless Service; a
``ReplicaPool`` per service holds one channel per replica, keeps the ones
that stall or fail out of rotation until their health check answers again,
hedges an attempt that goes unanswered past its budget on another replica,
and retries one whose replica failed on another, all within the caller's
deadline (see ``services/gateway/replicas.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.audio import SAMPLE_RATE
from services.gateway.hedge_budget import PoolOptions
from services.gateway.replicas import HEDGES, RETRIES, ReplicaPool
from services.protos import asr_pb2, asr_pb2_grpc, speaker_pb2, speaker_pb2_grpc

__all__ = ["HEDGES", "RETRIES", "ComputeClients", "Embedding", "PoolOptions"]

_ASR_HEALTH = asr_pb2.DESCRIPTOR.services_by_name["Asr"].full_name
_SPEAKER_HEALTH = speaker_pb2.DESCRIPTOR.services_by_name["Speaker"].full_name


@dataclass(frozen=True)
class Embedding:
    model: str
    vector: np.ndarray


def _audio_seconds(pcm: bytes) -> float:
    return len(pcm) / (2 * SAMPLE_RATE)


class ComputeClients:
    def __init__(
        self, asr_target: str, speaker_target: str, options: PoolOptions | None = None
    ) -> None:
        self.asr_pool = ReplicaPool("asr", asr_target, asr_pb2_grpc.AsrStub, _ASR_HEALTH, options)
        self.speaker_pool = ReplicaPool(
            "speaker", speaker_target, speaker_pb2_grpc.SpeakerStub, _SPEAKER_HEALTH, options
        )

    def start(self) -> None:
        """Start health probing now (otherwise each pool starts on its first call)."""
        self.asr_pool.start()
        self.speaker_pool.start()

    async def close(self) -> None:
        await self.asr_pool.close()
        await self.speaker_pool.close()

    async def recognize(
        self, pcm: bytes, language: str, use_itn: bool, request_id: str, timeout: float
    ) -> asr_pb2.RecognizeResponse:
        request = asr_pb2.RecognizeRequest(
            pcm=pcm,
            sample_rate=SAMPLE_RATE,
            language=language,
            use_itn=use_itn,
            request_id=request_id,
        )

        async def call(
            stub: asr_pb2_grpc.AsrStub, remaining: float, wait_for_ready: bool
        ) -> asr_pb2.RecognizeResponse:
            response: asr_pb2.RecognizeResponse = await stub.Recognize(
                request, timeout=remaining, wait_for_ready=wait_for_ready
            )
            return response

        return await self.asr_pool.call(call, timeout, _audio_seconds(pcm))

    async def embed(self, pcm: bytes, request_id: str, timeout: float) -> Embedding:
        request = speaker_pb2.EmbedRequest(pcm=pcm, sample_rate=SAMPLE_RATE, request_id=request_id)

        async def call(
            stub: speaker_pb2_grpc.SpeakerStub, remaining: float, wait_for_ready: bool
        ) -> speaker_pb2.EmbedResponse:
            response: speaker_pb2.EmbedResponse = await stub.Embed(
                request, timeout=remaining, wait_for_ready=wait_for_ready
            )
            return response

        response = await self.speaker_pool.call(call, timeout, _audio_seconds(pcm))
        return Embedding(response.model, np.asarray(response.embedding, dtype=np.float32))
