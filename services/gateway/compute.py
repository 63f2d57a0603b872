"""Calls to the stateless compute services (asr, speaker), with deadlines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.audio import SAMPLE_RATE
from services.common.grpc_client import open_channel
from services.protos import asr_pb2, asr_pb2_grpc, speaker_pb2, speaker_pb2_grpc


@dataclass(frozen=True)
class Embedding:
    model: str
    vector: np.ndarray


class ComputeClients:
    def __init__(self, asr_target: str, speaker_target: str) -> None:
        self._asr_channel = open_channel(asr_target)
        self._speaker_channel = open_channel(speaker_target)
        self._asr = asr_pb2_grpc.AsrStub(self._asr_channel)
        self._speaker = speaker_pb2_grpc.SpeakerStub(self._speaker_channel)

    async def close(self) -> None:
        await self._asr_channel.close()
        await self._speaker_channel.close()

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
        response: asr_pb2.RecognizeResponse = await self._asr.Recognize(
            request, timeout=timeout, wait_for_ready=True
        )
        return response

    async def embed(self, pcm: bytes, request_id: str, timeout: float) -> Embedding:
        request = speaker_pb2.EmbedRequest(pcm=pcm, sample_rate=SAMPLE_RATE, request_id=request_id)
        response: speaker_pb2.EmbedResponse = await self._speaker.Embed(
            request, timeout=timeout, wait_for_ready=True
        )
        return Embedding(response.model, np.asarray(response.embedding, dtype=np.float32))
