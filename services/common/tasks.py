"""Small asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


def being_cancelled() -> bool:
    """Whether the running task has a cancellation pending (``Task.cancel`` was called).

    Tells a stop apart from a CancelledError that only ends an inner
    operation (a gRPC call cancelled by a watchdog, a task we cancelled).
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(task: asyncio.Task[Any] | None, limit_s: float | None = None) -> None:
    """Cancel a background task and wait until it has finished unwinding.

    The task's own CancelledError is expected and swallowed; the caller's is
    not: a caller cancelled while it waits here goes on being cancelled.
    With ``limit_s``, a task still unwinding after that long is left to
    finish on its own (a library call that ignores cancellation, such as
    grpc waiting on a dead peer, must not hold a shutdown forever).
    """
    if task is None:
        return
    task.cancel()
    if limit_s is not None:
        await asyncio.wait({task}, timeout=limit_s)
        if not task.done():
            log.warning("task %s still unwinding after %.0f s; left", task.get_name(), limit_s)
            return
    try:
        await task
    except asyncio.CancelledError:
        if being_cancelled():
            raise
