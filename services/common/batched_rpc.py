"""The shape every batched unary RPC shares: validate, queue, answer or refuse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from services.common.audio import SAMPLE_RATE, pcm16_to_float
from services.common.batching import Batched, DeadlineExpiredError, DynamicBatcher, QueueFullError
from services.common.grpc_service import run_grpc_service, status_for
from services.common.settings import BatchedServiceSettings

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


def decode_utterance(pcm: bytes, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Validate an utterance sent over gRPC and return float samples."""
    if sample_rate not in (0, SAMPLE_RATE):
        raise ValueError(f"sample_rate must be {SAMPLE_RATE} (got {sample_rate})")
    audio = pcm16_to_float(pcm)
    if audio.size == 0:
        raise ValueError("empty audio")
    if audio.size > max_seconds * SAMPLE_RATE:
        raise ValueError(f"utterance of {audio.size / SAMPLE_RATE:.1f} s exceeds {max_seconds} s")
    return audio


async def decode_or_abort(
    pcm: bytes, sample_rate: int, max_seconds: float, context: grpc.aio.ServicerContext
) -> np.ndarray:
    """``decode_utterance``, or end the call with INVALID_ARGUMENT saying why."""
    try:
        return decode_utterance(pcm, sample_rate, max_seconds)
    except ValueError as exc:
        await context.abort(status_for(exc), str(exc))
    raise AssertionError("context.abort always raises")


# Call metadata marking a request as low priority (``DynamicBatcher``): the
# gateway sends it with partial re-recognitions of speech still being spoken.
PRIORITY_KEY = "sf-priority"
LOW_PRIORITY = "low"


def low_priority(context: grpc.aio.ServicerContext) -> bool:
    metadata = context.invocation_metadata() or ()
    return any(key == PRIORITY_KEY and value == LOW_PRIORITY for key, value in metadata)


async def submit_or_abort(
    batcher: DynamicBatcher[RequestT, ResultT],
    request: RequestT,
    context: grpc.aio.ServicerContext,
) -> Batched[ResultT]:
    remaining = context.time_remaining()
    try:
        return await batcher.submit(request, timeout=remaining, low_priority=low_priority(context))
    except (QueueFullError, DeadlineExpiredError) as exc:
        await context.abort(status_for(exc), str(exc))
    except Exception as exc:
        await context.abort(status_for(exc), f"{type(exc).__name__}: {exc}")
    raise AssertionError("context.abort always raises")


async def serve_batched(
    name: str,
    settings: BatchedServiceSettings,
    batcher: DynamicBatcher[Any, Any],
    register: Callable[[grpc.aio.Server], None],
) -> None:
    """Run a batched service: the batcher consumes while the server is up, then drains."""

    async def start() -> None:
        batcher.start()

    async def stop() -> None:
        # A second before the server's own cut-off, so what is still queued is
        # refused UNAVAILABLE (retried elsewhere) rather than cancelled with it.
        await batcher.stop(max(0.0, settings.shutdown_grace_s - 1.0))

    # Liveness: the model call now running has not hung (see DynamicBatcher.stuck).
    await run_grpc_service(name, settings, register, start, stop, alive=lambda: not batcher.stuck())
