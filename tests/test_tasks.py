"""cancel_and_wait: stopping a background task never swallows the stopper's own cancellation."""

from __future__ import annotations

import asyncio

import pytest

from services.common.tasks import cancel_and_wait


async def test_the_cancelled_task_is_waited_for_and_its_cancellation_swallowed() -> None:
    unwound = asyncio.Event()

    async def background() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)
            unwound.set()

    task = asyncio.create_task(background())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert unwound.is_set() and task.cancelled()


async def test_a_caller_cancelled_while_it_waits_stays_cancelled() -> None:
    release = asyncio.Event()

    async def slow_to_unwind() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()

    task = asyncio.create_task(slow_to_unwind())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.01)
    stopper.cancel()  # e.g. a stop() cancelled in its own finally block
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, 5)
    assert stopper.cancelled()
