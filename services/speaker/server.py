"""The speaker-embedding gRPC service, batched across callers like ASR."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from services.common.audio import SAMPLE_RATE
from services.common.batched_rpc import decode_or_abort, serve_batched, submit_or_abort
from services.common.batching import DynamicBatcher
from services.common.config import load_settings
from services.common.grpc_service import configure_logging
from services.common.inference import InferenceThread
from services.protos import speaker_pb2, speaker_pb2_grpc
from services.speaker.config import SpeakerSettings
from services.speaker.engine import SpeakerEngine


def build_engine(settings: SpeakerSettings) -> SpeakerEngine:
    if settings.engine == "dvector":
        from services.speaker.dvector import DVectorEngine

        return DVectorEngine(Path(settings.dvector_weights), device=settings.device)
    from services.speaker.eres2net import ERes2NetV2Engine

    return ERes2NetV2Engine(settings.eres2netv2_model, device=settings.device)


class SpeakerServicer(speaker_pb2_grpc.SpeakerServicer):
    def __init__(
        self, engine_name: str, batcher: DynamicBatcher[np.ndarray, np.ndarray], max_s: float
    ) -> None:
        self._engine_name = engine_name
        self._batcher = batcher
        self._max_s = max_s

    async def Embed(
        self, request: speaker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> speaker_pb2.EmbedResponse:
        audio = await decode_or_abort(request.pcm, request.sample_rate, self._max_s, context)
        done = await submit_or_abort(self._batcher, audio, context)
        return speaker_pb2.EmbedResponse(
            embedding=done.value.tolist(),
            model=self._engine_name,
            audio_seconds=audio.size / SAMPLE_RATE,
            queue_ms=done.queue_ms,
            model_ms=done.model_ms,
            batch_size=done.batch_size,
        )


def main() -> None:
    settings = load_settings(SpeakerSettings)
    configure_logging(settings.log_level)
    inference = InferenceThread("speaker")
    engine = inference.call(build_engine, settings)
    inference.call(engine.embed, [np.zeros(SAMPLE_RATE, np.float32)])

    def embed_rows(batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(engine.embed(batch))

    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
        "speaker",
        embed_rows,
        inference,
        settings.batch_limits(),
        audio_seconds=lambda audio: audio.size / SAMPLE_RATE,
    )
    servicer = SpeakerServicer(engine.name, batcher, settings.max_utterance_s)
    asyncio.run(
        serve_batched(
            "speechfront.speaker.v1.Speaker",
            settings,
            batcher,
            lambda server: speaker_pb2_grpc.add_SpeakerServicer_to_server(servicer, server),
        )
    )
