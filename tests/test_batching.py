"""DynamicBatcher: many callers share one model call on the inference thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from services.common.batching import (
    BatchLimits,
    DeadlineExpiredError,
    DynamicBatcher,
    QueueFullError,
)
from services.common.inference import InferenceThread


@dataclass(frozen=True)
class Job:
    value: int
    seconds: float = 1.0
    group: str = "a"


class RecordingModel:
    """A batch function that records each call; stands in only for model arithmetic."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[Job]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def __call__(self, batch: Sequence[Job]) -> list[int]:
        self.calls.append(list(batch))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        return [job.value * 2 for job in batch]


def make_batcher(model: RecordingModel, **limits: float) -> DynamicBatcher[Job, int]:
    batcher: DynamicBatcher[Job, int] = DynamicBatcher(
        "test",
        model,
        InferenceThread("test"),
        BatchLimits(**limits),  # type: ignore[arg-type]
        audio_seconds=lambda job: job.seconds,
        group=lambda job: job.group,
    )
    batcher.start()
    return batcher


async def test_concurrent_requests_share_one_model_call() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_batch=8, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.submit(Job(i)) for i in range(8)))
    await batcher.stop()
    assert [r.value for r in results] == [i * 2 for i in range(8)]
    assert len(model.calls) == 1
    assert all(r.batch_size == 8 for r in results)


async def test_model_runs_on_the_inference_thread_not_the_loop() -> None:
    model = RecordingModel()
    batcher = make_batcher(model)
    await batcher.submit(Job(1))
    await batcher.stop()
    assert model.threads == {"test-inference_0"}


async def test_batch_is_cut_at_max_batch() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_batch=3, max_wait_ms=50)
    await asyncio.gather(*(batcher.submit(Job(i)) for i in range(7)))
    await batcher.stop()
    assert [len(call) for call in model.calls] == [3, 3, 1]


async def test_batch_is_cut_at_audio_seconds_cap() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_batch=10, max_audio_seconds=5, max_wait_ms=50)
    await asyncio.gather(*(batcher.submit(Job(i, seconds=2)) for i in range(4)))
    await batcher.stop()
    assert [len(call) for call in model.calls] == [2, 2]


async def test_requests_of_different_groups_never_share_a_call() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_batch=8, max_wait_ms=50)
    jobs = [Job(i, group="en" if i % 2 else "zh") for i in range(6)]
    await asyncio.gather(*(batcher.submit(job) for job in jobs))
    await batcher.stop()
    assert sorted(len(call) for call in model.calls) == [3, 3]
    assert all(len({job.group for job in call}) == 1 for call in model.calls)


async def test_batch_is_sorted_by_length() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_batch=4, max_wait_ms=50)
    await asyncio.gather(*(batcher.submit(Job(i, seconds=s)) for i, s in enumerate([3, 1, 2])))
    await batcher.stop()
    assert [job.seconds for job in model.calls[0]] == [1, 2, 3]


async def test_full_queue_refuses_at_once() -> None:
    model = RecordingModel(delay_s=0.3)
    batcher = make_batcher(model, max_batch=1, max_queue=2, max_wait_ms=0)
    first = asyncio.ensure_future(batcher.submit(Job(0)))
    await asyncio.sleep(0.05)  # let the consumer take it; the queue is then empty
    queued = [asyncio.ensure_future(batcher.submit(Job(i))) for i in (1, 2)]
    await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(QueueFullError):
        await batcher.submit(Job(3))
    assert time.monotonic() - started < 0.05
    await asyncio.gather(first, *queued)
    await batcher.stop()


async def test_request_whose_deadline_passed_never_reaches_the_model() -> None:
    model = RecordingModel(delay_s=0.3)
    batcher = make_batcher(model, max_batch=1, max_wait_ms=0)
    blocker = asyncio.ensure_future(batcher.submit(Job(0)))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExpiredError):
        await batcher.submit(Job(99), timeout=0.1)
    await blocker
    await batcher.stop()
    assert all(job.value != 99 for call in model.calls for job in call)


async def test_model_error_fails_only_that_batch() -> None:
    calls = 0

    def flaky(batch: Sequence[Job]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return [job.value for job in batch]

    batcher: DynamicBatcher[Job, int] = DynamicBatcher(
        "test", flaky, InferenceThread("flaky"), BatchLimits(max_wait_ms=0),
        audio_seconds=lambda job: job.seconds,
    )  # fmt: skip
    batcher.start()
    with pytest.raises(RuntimeError, match="boom"):
        await batcher.submit(Job(1))
    assert (await batcher.submit(Job(2))).value == 2
    await batcher.stop()


async def test_request_the_queue_cannot_serve_in_time_is_refused_at_once() -> None:
    model = RecordingModel(delay_s=0.2)
    batcher = make_batcher(model, max_batch=1, max_wait_ms=0)
    await batcher.submit(Job(0))  # teaches the batcher that a batch takes ~0.2 s
    backlog = [asyncio.ensure_future(batcher.submit(Job(i))) for i in range(1, 5)]
    await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(QueueFullError, match="expected wait"):
        await batcher.submit(Job(99), timeout=0.5)
    assert time.monotonic() - started < 0.05
    # The same request with time enough for the backlog is admitted and served.
    assert (await batcher.submit(Job(7), timeout=5.0)).value == 14
    await asyncio.gather(*backlog)
    await batcher.stop()
    assert all(job.value != 99 for call in model.calls for job in call)


async def test_request_that_would_finish_after_its_deadline_never_reaches_the_model() -> None:
    model = RecordingModel(delay_s=0.1)
    batcher = make_batcher(model, max_batch=1, max_wait_ms=0)
    await batcher.submit(Job(0))  # batches look like 0.1 s
    model.delay_s = 0.6  # then the model slows down
    blocker = asyncio.ensure_future(batcher.submit(Job(1)))
    await asyncio.sleep(0.05)
    # Admitted on the old estimate (0.2 s expected); when its turn comes at
    # ~0.6 s only ~0.1 s of its deadline is left, less than a batch takes.
    late = asyncio.ensure_future(batcher.submit(Job(99), timeout=0.65))
    with pytest.raises(DeadlineExpiredError):
        await late
    await blocker
    await batcher.stop()
    assert all(job.value != 99 for call in model.calls for job in call)
