"""A whole recording to timed text: cut by the VAD service, segments recognised in parallel.

Every segment is its own request to the ASR service as soon as the VAD has
cut it, so a long file becomes many short requests that the service batches
with everyone else's, never one huge one. At most ``PARALLEL`` of one
recording's segments are in flight at a time, so one upload cannot fill the
service's queue by itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from services.common.audio import SAMPLE_RATE
from services.gateway import metrics as gateway_metrics
from services.gateway.compat.segmenter import LiveSegmenters, VadSegmenter
from services.gateway.context import GatewayContext
from services.gateway.utterances import Utterance
from services.protos import asr_pb2

PARALLEL = 8


@dataclass(frozen=True)
class Piece:
    start_s: float
    end_s: float
    text: str
    language: str


async def transcribe_pcm(
    ctx: GatewayContext, registry: LiveSegmenters, pcm: bytes, language: str
) -> list[Piece]:
    """The recording's speech segments with their text, in order (empty ones left out).

    Raises what the VAD or ASR call raised (``VadUnavailable``, a gRPC error)."""
    settings = ctx.settings
    name = f"file-{uuid.uuid4().hex[:12]}"
    room = asyncio.Semaphore(PARALLEL)
    tasks: list[asyncio.Task[tuple[Utterance, asr_pb2.RecognizeResponse]]] = []

    async def recognise(utterance: Utterance) -> tuple[Utterance, asr_pb2.RecognizeResponse]:
        async with room:
            started = time.monotonic()
            try:
                asr = await ctx.compute.recognize(
                    utterance.pcm,
                    language,
                    settings.asr_use_itn,
                    f"{name}-{utterance.seq}",
                    settings.asr_timeout_s,
                )
            finally:
                gateway_metrics.COMPUTE_SECONDS.labels("asr").observe(time.monotonic() - started)
            return utterance, asr

    def on_segment(utterance: Utterance) -> None:
        tasks.append(asyncio.create_task(recognise(utterance)))

    segmenter = VadSegmenter(ctx, registry, name, on_segment)
    segmenter.start()
    try:
        await segmenter.feed(pcm)
        await segmenter.finish(settings.vad_progress_timeout_s)
        done = await asyncio.gather(*tasks)
    finally:
        segmenter.close()
        for task in tasks:
            task.cancel()
    return [
        Piece(u.start / SAMPLE_RATE, u.end / SAMPLE_RATE, asr.text.strip(), asr.language)
        for u, asr in done
        if asr.text.strip()
    ]
