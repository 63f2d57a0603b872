"""A batched service is alive while its model calls come back, not merely while its loop answers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

from services.common.batching import BatchLimits, DynamicBatcher
from services.common.inference import InferenceThread


async def test_a_model_call_that_does_not_come_back_is_stuck_and_one_that_does_is_not() -> None:
    release = threading.Event()

    def run(batch: Sequence[int]) -> list[int]:
        release.wait(10)
        return list(batch)

    inference = InferenceThread("liveness-test")
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        "liveness-test", run, inference, BatchLimits(max_wait_ms=0), audio_seconds=lambda _: 1.0
    )
    batcher.start()
    try:
        assert not batcher.stuck(floor_s=0.2)
        answer = asyncio.create_task(batcher.submit(7))
        deadline = time.monotonic() + 5
        while not batcher.stuck(floor_s=0.2):
            assert time.monotonic() < deadline, "a hung call was never taken for stuck"
            await asyncio.sleep(0.02)
        assert batcher.call_running_for() >= 0.2
        release.set()
        assert (await answer).value == 7
        assert not batcher.stuck(floor_s=0.2)
        assert batcher.call_running_for() == 0.0
    finally:
        release.set()
        await batcher.stop()
        inference.shutdown()
