"""Partials are low-priority work in the shared batcher: finals never wait behind them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from services.common.batching import BatchLimits, DynamicBatcher, QueueFullError
from services.common.inference import InferenceThread


@dataclass(frozen=True)
class Job:
    name: str


class SlowModel:
    """A batch function taking a fixed time per call; records each call's jobs."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls: list[list[str]] = []

    def __call__(self, batch: Sequence[Job]) -> list[str]:
        self.calls.append([job.name for job in batch])
        time.sleep(self.delay_s)
        return [job.name for job in batch]


def batcher(model: SlowModel) -> DynamicBatcher[Job, str]:
    made: DynamicBatcher[Job, str] = DynamicBatcher(
        "priority-test",
        model,
        InferenceThread("priority-test"),
        BatchLimits(max_batch=4, max_wait_ms=20),
        audio_seconds=lambda _: 1.0,
    )
    made.start()
    return made


async def test_a_partial_is_refused_while_a_final_waits() -> None:
    model = SlowModel(0.2)
    shared = batcher(model)
    running = asyncio.create_task(shared.submit(Job("final-1")))
    await asyncio.sleep(0.05)  # final-1 is in the model
    waiting = asyncio.create_task(shared.submit(Job("final-2")))
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):
        await shared.submit(Job("partial"), low_priority=True)
    await asyncio.gather(running, waiting)


async def test_finals_go_before_partials_that_queued_earlier() -> None:
    model = SlowModel(0.1)
    shared = batcher(model)
    first = asyncio.create_task(shared.submit(Job("final-1")))
    await asyncio.sleep(0.03)  # final-1 is in the model; the queue is empty
    partial = asyncio.create_task(shared.submit(Job("partial"), low_priority=True))
    await asyncio.sleep(0.01)
    final = asyncio.create_task(shared.submit(Job("final-2")))
    await asyncio.gather(first, partial, final)
    assert model.calls == [["final-1"], ["final-2"], ["partial"]]


async def test_a_partial_never_shares_a_model_call_with_a_final() -> None:
    model = SlowModel(0.05)
    shared = batcher(model)
    partial = asyncio.create_task(shared.submit(Job("partial"), low_priority=True))
    final = asyncio.create_task(shared.submit(Job("final")))
    await asyncio.gather(partial, final)
    assert sorted(model.calls) == [["final"], ["partial"]]


async def test_queued_partials_do_not_count_in_a_finals_expected_wait() -> None:
    model = SlowModel(0.05)
    shared = batcher(model)
    await shared.submit(Job("warm"))  # the batcher learns its call time
    partials = [
        asyncio.create_task(shared.submit(Job(f"p{i}"), low_priority=True)) for i in range(4)
    ]
    await asyncio.sleep(0)
    # Four partials queued, yet a final with a tight deadline is taken.
    assert (await shared.submit(Job("final"), timeout=0.5)).value == "final"
    await asyncio.gather(*partials, return_exceptions=True)
