"""Dynamic batching of independent requests onto one inference thread.

Callers submit one request each and await its result. One consumer task takes
the oldest waiting request, gathers more of the same group (requests that can
share a model call) until the batch is full in count or audio seconds or the
collection window closes, drops what expired while waiting, and runs the batch
on the inference thread. The queue is bounded: a full queue refuses at once.

A request whose deadline the queue cannot meet is refused at once too. Under
overload a plain FIFO queue fills with requests that each wait almost their
whole deadline, so most finish just too late and the work is wasted; refusing
by expected wait (batches ahead x recent batch time) keeps the admitted ones
on time and tells the others immediately.

Low-priority requests (``submit(..., low_priority=True)``: partial results
that re-recognise speech still being spoken) only use time the others leave:
one is refused at once while any normal request waits, it never shares a
model call with normal ones, and normal requests go first whatever their
age, so a normal request waits at most for a low-priority batch already
running.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.common import metrics
from services.common.inference import InferenceThread
from services.common.tasks import cancel_and_wait

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


class QueueFullError(Exception):
    """The batcher's queue is at its bound; the caller should back off or go elsewhere."""


class DeadlineExpiredError(Exception):
    """The request's deadline passed before the model could run it."""


class ShuttingDownError(Exception):
    """The batcher is stopping: the request should go to another replica."""


# Weight of the newest batch in the running mean of batch time.
_BATCH_TIME_SMOOTHING = 0.2
# A model call running this many times the usual call time, and at least
# STUCK_FLOOR_S, is taken for a hung inference thread (the liveness check).
STUCK_FACTOR = 20.0
STUCK_FLOOR_S = 60.0


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 16
    max_audio_seconds: float = 120.0
    max_wait_ms: float = 10.0
    max_queue: int = 256


@dataclass
class Batched(Generic[ResultT]):
    """A result with how it was produced, for timing fields and metrics."""

    value: ResultT
    queue_ms: float
    model_ms: float
    batch_size: int


@dataclass
class _Waiting(Generic[RequestT, ResultT]):
    request: RequestT
    group: Hashable
    audio_seconds: float
    deadline: float | None
    future: asyncio.Future[Batched[ResultT]]
    enqueued: float = field(default_factory=time.monotonic)
    low: bool = False


class DynamicBatcher(Generic[RequestT, ResultT]):
    def __init__(
        self,
        service: str,
        run_batch: Callable[[Sequence[RequestT]], Sequence[ResultT]],
        inference: InferenceThread,
        limits: BatchLimits,
        audio_seconds: Callable[[RequestT], float],
        group: Callable[[RequestT], Hashable] = lambda _: None,
    ) -> None:
        self._service = service
        self._run_batch = run_batch
        self._inference = inference
        self._limits = limits
        self._audio_seconds = audio_seconds
        self._group = group
        self._waiting: deque[_Waiting[RequestT, ResultT]] = deque()
        self._arrived = asyncio.Event()
        self._consumer: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_flight = 0
        # When the model call now running started (None between calls).
        self._call_started: float | None = None
        # Smoothed wall time of one model call; None until the first completes.
        self._batch_seconds: float | None = None

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def expected_wait(self) -> float | None:
        """Seconds until a request submitted now would have its result, if known."""
        if self._batch_seconds is None:
            return None
        # Low-priority requests wait behind, not ahead.
        ahead = sum(1 for item in self._waiting if not item.low)
        batches = math.ceil((ahead + 1) / self._limits.max_batch)
        if self._in_flight:
            batches += 1
        return batches * self._batch_seconds

    def start(self) -> None:
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume(), name=f"{self._service}-batcher")

    @property
    def stopping(self) -> bool:
        return self._stopping

    def call_running_for(self) -> float:
        """Seconds the model call now running has taken so far (0 between calls)."""
        started = self._call_started
        return 0.0 if started is None else time.monotonic() - started

    def stuck(self, floor_s: float = STUCK_FLOOR_S) -> bool:
        """The model call has run far longer than calls take (a hung inference thread):
        ``STUCK_FACTOR`` times the usual call time, and at least ``floor_s``."""
        usual = self._batch_seconds or 0.0
        return self.call_running_for() > max(floor_s, STUCK_FACTOR * usual)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Refuse new requests, let queued and running batches finish (bounded),
        then stop consuming; what is still queued at the cut-off fails with
        ``ShuttingDownError`` (UNAVAILABLE: the caller retries elsewhere)."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while (self._waiting or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await cancel_and_wait(self._consumer)
        self._consumer = None
        for item in self._waiting:
            if not item.future.done():
                metrics.REQUESTS.labels(self._service, "rejected").inc()
                item.future.set_exception(ShuttingDownError("server is shutting down"))
        self._waiting.clear()
        metrics.QUEUE_DEPTH.labels(self._service).set(0)

    async def submit(
        self, request: RequestT, timeout: float | None = None, low_priority: bool = False
    ) -> Batched[ResultT]:
        if self._stopping:
            metrics.REQUESTS.labels(self._service, "rejected").inc()
            raise ShuttingDownError(f"{self._service} is shutting down")
        if len(self._waiting) >= self._limits.max_queue:
            metrics.REQUESTS.labels(self._service, "rejected").inc()
            raise QueueFullError(f"{self._service} queue is full ({self._limits.max_queue})")
        if low_priority and (
            self._normal_waiting() or self._low_waiting() >= self._limits.max_batch
        ):
            metrics.REQUESTS.labels(self._service, "rejected").inc()
            raise QueueFullError(f"{self._service} is busy: low-priority request refused")
        expected = self.expected_wait()
        if timeout is not None and expected is not None and expected > timeout:
            metrics.REQUESTS.labels(self._service, "rejected").inc()
            raise QueueFullError(
                f"{self._service} is behind: expected wait {expected:.1f} s exceeds"
                f" the {timeout:.1f} s deadline"
            )
        loop = asyncio.get_running_loop()
        item: _Waiting[RequestT, ResultT] = _Waiting(
            request=request,
            group=self._group(request),
            audio_seconds=self._audio_seconds(request),
            deadline=None if timeout is None else time.monotonic() + timeout,
            future=loop.create_future(),
            low=low_priority,
        )
        self._waiting.append(item)
        metrics.QUEUE_DEPTH.labels(self._service).set(len(self._waiting))
        self._arrived.set()
        return await item.future

    async def _consume(self) -> None:
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._collect()
            if batch:
                await self._run(batch)

    async def _collect(self) -> list[_Waiting[RequestT, ResultT]]:
        """Take the oldest request's group, waiting up to max_wait_ms for it to fill.

        The oldest normal request comes first; low-priority ones only when no
        normal one waits, and never in the same batch."""
        limits = self._limits
        window_end = self._head().enqueued + limits.max_wait_ms / 1000
        while self._fill_count(self._head()) < limits.max_batch:
            remaining = window_end - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        head = self._head()
        group, low = head.group, head.low
        batch: list[_Waiting[RequestT, ResultT]] = []
        kept: deque[_Waiting[RequestT, ResultT]] = deque()
        seconds = 0.0
        # A request that would get its result only after its deadline is dropped:
        # the caller has given up by then, so the model time would be wasted.
        finish = time.monotonic() + (self._batch_seconds or 0.0)
        while self._waiting:
            item = self._waiting.popleft()
            if item.future.cancelled():
                continue
            if item.deadline is not None and item.deadline <= finish:
                metrics.REQUESTS.labels(self._service, "expired").inc()
                item.future.set_exception(
                    DeadlineExpiredError("deadline passes before the model could finish")
                )
                continue
            fits = (
                item.group == group
                and item.low == low
                and len(batch) < limits.max_batch
                and (not batch or seconds + item.audio_seconds <= limits.max_audio_seconds)
            )
            if fits:
                batch.append(item)
                seconds += item.audio_seconds
            else:
                kept.append(item)
        self._waiting = kept
        metrics.QUEUE_DEPTH.labels(self._service).set(len(self._waiting))
        return batch

    def _head(self) -> _Waiting[RequestT, ResultT]:
        """The request the next batch is built around: the oldest normal one, if any."""
        return next((item for item in self._waiting if not item.low), self._waiting[0])

    def _fill_count(self, head: _Waiting[RequestT, ResultT]) -> int:
        return sum(1 for i in self._waiting if i.group == head.group and i.low == head.low)

    def _normal_waiting(self) -> int:
        return sum(1 for item in self._waiting if not item.low)

    def _low_waiting(self) -> int:
        return len(self._waiting) - self._normal_waiting()

    async def _run(self, batch: list[_Waiting[RequestT, ResultT]]) -> None:
        # Similar lengths side by side keep padding low for engines that pad.
        batch.sort(key=lambda item: item.audio_seconds)
        started = time.monotonic()
        self._in_flight += len(batch)
        self._call_started = started
        try:
            results = await self._inference.run(self._run_batch, [i.request for i in batch])
        except Exception as exc:
            metrics.REQUESTS.labels(self._service, "error").inc(len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._in_flight -= len(batch)
            self._call_started = None
        model_s = time.monotonic() - started
        self._batch_seconds = (
            model_s
            if self._batch_seconds is None
            else self._batch_seconds + _BATCH_TIME_SMOOTHING * (model_s - self._batch_seconds)
        )
        metrics.BATCH_SIZE.labels(self._service).observe(len(batch))
        metrics.BATCH_AUDIO_SECONDS.labels(self._service).observe(
            sum(i.audio_seconds for i in batch)
        )
        metrics.MODEL_SECONDS.labels(self._service).observe(model_s)
        metrics.AUDIO_SECONDS.labels(self._service).inc(sum(i.audio_seconds for i in batch))
        metrics.record_gpu_memory(self._service)
        for item, result in zip(batch, results, strict=True):
            queue_s = started - item.enqueued
            metrics.QUEUE_WAIT_SECONDS.labels(self._service).observe(queue_s)
            metrics.REQUESTS.labels(self._service, "ok").inc()
            if not item.future.done():
                item.future.set_result(Batched(result, queue_s * 1000, model_s * 1000, len(batch)))
