"""Calls to the stateless compute services (asr, speaker): deadlines and one retry.

Each target may list several replicas; the channel balances calls round-robin
over them. A call that fails because its replica went away (UNAVAILABLE, or a
connection dropped mid-call) is retried once within the same overall
deadline; the balancer has by then marked the lost replica down, so the retry
lands on another one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
from prometheus_client import Counter

from services.common.audio import SAMPLE_RATE
from services.common.grpc_client import open_channel
from services.protos import asr_pb2, asr_pb2_grpc, speaker_pb2, speaker_pb2_grpc

RETRIES = Counter(
    "speechfront_gateway_compute_retries_total",
    "Compute calls retried on another replica after a replica failure, by service.",
    ["service"],
)

T = TypeVar("T")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@dataclass(frozen=True)
class Embedding:
    model: str
    vector: np.ndarray


async def with_one_retry(service: str, timeout: float, call: Callable[[float], Awaitable[T]]) -> T:
    """Run ``call(remaining_timeout)``; once more if its replica failed and time is left."""
    deadline = time.monotonic() + timeout
    try:
        return await call(timeout)
    except grpc.aio.AioRpcError as exc:
        remaining = deadline - time.monotonic()
        if exc.code() not in _RETRYABLE or remaining <= 0.05:
            raise
        RETRIES.labels(service).inc()
        return await call(remaining)


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

        async def call(remaining: float) -> asr_pb2.RecognizeResponse:
            response: asr_pb2.RecognizeResponse = await self._asr.Recognize(
                request, timeout=remaining, wait_for_ready=True
            )
            return response

        return await with_one_retry("asr", timeout, call)

    async def embed(self, pcm: bytes, request_id: str, timeout: float) -> Embedding:
        request = speaker_pb2.EmbedRequest(pcm=pcm, sample_rate=SAMPLE_RATE, request_id=request_id)

        async def call(remaining: float) -> speaker_pb2.EmbedResponse:
            response: speaker_pb2.EmbedResponse = await self._speaker.Embed(
                request, timeout=remaining, wait_for_ready=True
            )
            return response

        response = await with_one_retry("speaker", timeout, call)
        return Embedding(response.model, np.asarray(response.embedding, dtype=np.float32))
