"""Small asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
from typing import Any


def being_cancelled() -> bool:
    """Whether the running task has a cancellation pending (``Task.cancel`` was called).

    Tells a stop apart from a CancelledError that only ends an inner
    operation (a gRPC call cancelled by a watchdog, a task we cancelled).
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished unwinding.

    The task's own CancelledError is expected and swallowed; the caller's is
    not: a caller cancelled while it waits here goes on being cancelled.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if being_cancelled():
            raise
