"""The ASR gRPC service: utterances from every caller share batched model calls."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from services.asr.config import AsrSettings
from services.asr.engine import AsrEngine, AsrRequest, Transcript
from services.common.audio import SAMPLE_RATE
from services.common.batched_rpc import decode_or_abort, serve_batched, submit_or_abort
from services.common.batching import DynamicBatcher
from services.common.config import load_settings
from services.common.grpc_service import configure_logging
from services.common.inference import InferenceThread
from services.protos import asr_pb2, asr_pb2_grpc


def build_engine(settings: AsrSettings) -> AsrEngine:
    if settings.engine == "whisper":
        from services.asr.whisper import WhisperEngine

        return WhisperEngine(
            settings.whisper_path(),
            device=settings.device,
            cpu_threads=settings.cpu_threads,
            detect_among=settings.whisper_detect_among(),
        )
    from services.asr.sensevoice import SenseVoiceEngine

    return SenseVoiceEngine(settings.sensevoice_model, device=settings.device)


class AsrServicer(asr_pb2_grpc.AsrServicer):
    def __init__(
        self, engine_name: str, batcher: DynamicBatcher[AsrRequest, Transcript], max_s: float
    ) -> None:
        self._engine_name = engine_name
        self._batcher = batcher
        self._max_s = max_s

    async def Recognize(
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        audio = await decode_or_abort(request.pcm, request.sample_rate, self._max_s, context)
        job = AsrRequest(audio=audio, language=request.language or "auto", use_itn=request.use_itn)
        done = await submit_or_abort(self._batcher, job, context)
        result = done.value
        return asr_pb2.RecognizeResponse(
            text=result.text,
            language=result.language,
            emotion=result.emotion,
            event=result.event,
            raw_text=result.raw_text,
            audio_seconds=audio.size / SAMPLE_RATE,
            queue_ms=done.queue_ms,
            model_ms=done.model_ms,
            batch_size=done.batch_size,
            engine=self._engine_name,
        )


def main() -> None:
    settings = load_settings(AsrSettings)
    configure_logging(settings.log_level)
    inference = InferenceThread("asr")
    engine = inference.call(build_engine, settings)
    # Warm-up: the first call allocates buffers and compiles kernels.
    inference.call(engine.transcribe, [AsrRequest(audio=np.zeros(SAMPLE_RATE, np.float32))])
    batcher: DynamicBatcher[AsrRequest, Transcript] = DynamicBatcher(
        "asr",
        engine.transcribe,
        inference,
        settings.batch_limits(),
        audio_seconds=lambda r: r.audio.size / SAMPLE_RATE,
        group=lambda r: (r.language, r.use_itn),
    )
    servicer = AsrServicer(engine.name, batcher, settings.max_utterance_s)
    asyncio.run(
        serve_batched(
            "speechfront.asr.v1.Asr",
            settings,
            batcher,
            lambda server: asr_pb2_grpc.add_AsrServicer_to_server(servicer, server),
        )
    )
