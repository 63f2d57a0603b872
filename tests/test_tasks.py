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


async def test_a_task_that_will_not_unwind_is_left_after_the_limit() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():  # ignores cancellation, as a stuck library call can
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, limit_s=0.1), 5)
    assert not task.done()
    release.set()
    await asyncio.wait_for(task, 5)
