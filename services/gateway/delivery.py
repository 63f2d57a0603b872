"""Results computed concurrently, delivered in the order their utterances ended."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class DeliveryQueue:
    """At most ``limit`` utterances in flight; each is delivered after the one before it.

    A failure computing or delivering one result is logged and never holds
    back the ones after it.
    """

    def __init__(self, limit: int, name: str = "") -> None:
        self._limit = limit
        self._name = name
        self._inflight: set[asyncio.Task[None]] = set()
        self._last: asyncio.Future[None] | None = None

    @property
    def full(self) -> bool:
        return len(self._inflight) >= self._limit

    @property
    def pending(self) -> int:
        return len(self._inflight)

    def submit(self, compute: Awaitable[T], deliver: Callable[[T], Awaitable[None]]) -> None:
        """Start ``compute`` now; run ``deliver`` on its result once earlier ones are done."""
        previous = self._last
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last = done
        task = asyncio.create_task(self._run(compute, deliver, previous, done))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run(
        self,
        compute: Awaitable[T],
        deliver: Callable[[T], Awaitable[None]],
        previous: asyncio.Future[None] | None,
        done: asyncio.Future[None],
    ) -> None:
        try:
            result = await compute
            if previous is not None:
                await previous
            await deliver(result)
        except Exception:
            log.exception("%s: delivering a result failed", self._name)
        finally:
            done.set_result(None)

    async def wait_idle(self, timeout: float) -> None:
        """Until every submitted result is delivered (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self._inflight and (remaining := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._inflight), timeout=remaining)
