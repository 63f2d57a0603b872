"""Replicas of a stateless compute service (asr, speaker), each watched on its own.

One channel per replica address. The addresses are a static list
(``host:port,host:port``, optionally ``ipv4:``/``ipv6:`` prefixed) or are
resolved from ``dns:///name:port`` every ``refresh_s``, and at once (at most
every ``min_refresh_s``) when a replica fails UNAVAILABLE: a pod going away
says so, and its replacement or a scale-out's new pods are found within
seconds. A new replica joins the rotation at its first SERVING health
check; no connection needs to age out for it to get calls. Each replica is
in rotation or not:

- the gRPC health service of every replica is asked every
  ``probe_interval_s`` with a short timeout; an answer other than SERVING
  in time takes the replica out of rotation, SERVING puts it back;
- an attempt that goes unanswered for its budget, or fails with
  UNAVAILABLE, takes its replica out of rotation at once and probes it now,
  so a replica that stalled gets no further calls until it answers health.

A call picks replicas round-robin among those in rotation (all of them if
none is). Its first attempt has a budget derived from recent service times
(``HedgeBudget``); when that passes unanswered, a hedge goes to another
replica and the first answer wins. An attempt that fails because its replica
went away (UNAVAILABLE, CANCELLED by a server shutting down, INTERNAL, UNKNOWN)
or refused for overload
(RESOURCE_EXHAUSTED) is retried at once on another replica. At most
``max_attempts`` in all, never past the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from services.common.grpc_client import close_channel, open_channel
from services.common.tasks import cancel_and_wait
from services.gateway.hedge_budget import HedgeBudget, PoolOptions
from services.gateway.targets import parse_target, resolve

log = logging.getLogger(__name__)

RETRIES = Counter(
    "speechfront_gateway_compute_retries_total",
    "Compute attempts started again at once after one failed (its replica went away, or "
    "refused for overload), by service.",
    ["service"],
)
HEDGES = Counter(
    "speechfront_gateway_compute_hedges_total",
    "Compute calls that went unanswered for their budget and were also sent to another "
    "replica, by service.",
    ["service"],
)
EJECTIONS = Counter(
    "speechfront_gateway_compute_ejections_total",
    "Compute replicas taken out of rotation (stalled, failed or failed their health check), "
    "by service.",
    ["service"],
)
HEALTHY = Gauge(
    "speechfront_gateway_compute_replicas_healthy",
    "Compute replicas in rotation (answering health checks), by service.",
    ["service"],
)

StubT = TypeVar("StubT")
T = TypeVar("T")
# invoke(stub, timeout_s, wait_for_ready) -> the call
Invoke = Callable[[StubT, float, bool], Awaitable[T]]
Resolver = Callable[[str], list[str]]

# CANCELLED here is never the caller's own: an attempt the pool cancels is not
# looked at again. It is a replica's server cancelling the call as it shuts
# down, or a channel closed under it.
_GONE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)
_RETRY_ELSEWHERE = (*_GONE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class Replica(Generic[StubT]):
    address: str
    channel: grpc.aio.Channel
    stub: StubT
    health: health_pb2_grpc.HealthStub
    healthy: bool = False
    changed_at: float = field(default_factory=time.monotonic)
    probe: asyncio.Task[None] | None = None


@dataclass
class _Attempt(Generic[StubT]):
    replica: Replica[StubT]
    started: float


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _failure(task: asyncio.Task[T]) -> BaseException | None:
    """The attempt's error (a cancelled attempt counts as CANCELLED), or None."""
    if task.cancelled():
        return _error(grpc.StatusCode.CANCELLED, "attempt cancelled")
    return task.exception()


class ReplicaPool(Generic[StubT]):
    """The replicas of one service; ``call`` routes one request over them.

    Background work (health probes, DNS refresh) starts with ``start()`` or on
    the first call, whichever comes first; ``close()`` stops it.
    """

    def __init__(
        self,
        service: str,
        target: str,
        stub_factory: Callable[[grpc.aio.Channel], StubT],
        health_service: str = "",
        options: PoolOptions | None = None,
        resolver: Resolver = resolve,
    ) -> None:
        self.service = service
        self.options = options or PoolOptions()
        self.budget = HedgeBudget.from_options(self.options)
        self._health_service = health_service
        self._stub_factory = stub_factory
        self._resolver = resolver
        self._replicas: dict[str, Replica[StubT]] = {}
        self._turn = itertools.count()
        self._prober: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._resolved = asyncio.Event()
        self._refresh_soon = asyncio.Event()
        addresses, self._dns_name = parse_target(target)
        for address in addresses:
            self._add(address)
        HEALTHY.labels(service).set(0)

    # -- state ------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return list(self._replicas)

    def replica(self, address: str) -> Replica[StubT]:
        return self._replicas[address]

    @property
    def healthy_count(self) -> int:
        return sum(1 for r in self._replicas.values() if r.healthy)

    def _add(self, address: str) -> Replica[StubT]:
        channel = open_channel(address)
        replica = Replica(
            address, channel, self._stub_factory(channel), health_pb2_grpc.HealthStub(channel)
        )
        self._replicas[address] = replica
        return replica

    def _set_healthy(self, replica: Replica[StubT], healthy: bool, why: str) -> None:
        if replica.healthy == healthy:
            return
        replica.healthy = healthy
        replica.changed_at = time.monotonic()
        if healthy:
            log.info("%s replica %s is in rotation (%s)", self.service, replica.address, why)
        else:
            EJECTIONS.labels(self.service).inc()
            log.warning("%s replica %s out of rotation: %s", self.service, replica.address, why)
        HEALTHY.labels(self.service).set(self.healthy_count)

    def mark_suspect(self, replica: Replica[StubT], why: str) -> None:
        """Out of rotation now; back once its health check answers SERVING."""
        self._set_healthy(replica, False, why)
        self._probe_now(replica)

    def refresh_soon(self) -> None:
        """Resolve the DNS name again now (rate-limited), not at the next period."""
        self._refresh_soon.set()

    def pick(self, exclude: Iterable[Replica[StubT]] = ()) -> Replica[StubT] | None:
        """Next replica in rotation not in ``exclude``; any such one if none is in rotation."""
        skip = {id(r) for r in exclude}
        candidates = [r for r in self._replicas.values() if id(r) not in skip]
        healthy = [r for r in candidates if r.healthy]
        if healthy:
            candidates = healthy
        elif self.healthy_count:
            return None  # the only healthy ones are excluded: do not fall back to sick ones
        if not candidates:
            return None
        return candidates[next(self._turn) % len(candidates)]

    # -- background -------------------------------------------------------

    def start(self) -> None:
        """Start probing (and resolving); needs a running event loop. Idempotent."""
        if self._prober is not None:
            return
        self._prober = asyncio.create_task(self._probe_forever(), name=f"{self.service}-health")
        if self._dns_name is not None:
            self._refresher = asyncio.create_task(
                self._refresh_forever(), name=f"{self.service}-dns"
            )
        else:
            self._resolved.set()

    async def close(self) -> None:
        await cancel_and_wait(self._prober)
        await cancel_and_wait(self._refresher)
        self._prober = self._refresher = None
        for replica in self._replicas.values():
            await cancel_and_wait(replica.probe)
        await asyncio.gather(*(close_channel(r.channel) for r in self._replicas.values()))
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._replicas.clear()

    def _probe_now(self, replica: Replica[StubT]) -> None:
        if self._prober is None or (replica.probe is not None and not replica.probe.done()):
            return
        replica.probe = asyncio.create_task(self._probe(replica), name=f"{self.service}-probe")

    def _reconnect_if_backing_off(self, replica: Replica[StubT]) -> None:
        """A fresh channel for a replica out of rotation whose channel waits out a
        reconnect back-off (up to seconds after failures): a replica that comes
        back, or starts for the first time at a known address, is reached at
        its next probe. Calls still on the old channel finish on it."""
        if replica.healthy:
            return
        state = replica.channel.get_state(try_to_connect=False)
        if state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return
        old = replica.channel
        replica.channel = open_channel(replica.address)
        replica.stub = self._stub_factory(replica.channel)
        replica.health = health_pb2_grpc.HealthStub(replica.channel)
        task = asyncio.create_task(close_channel(old, self.options.close_grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _probe(self, replica: Replica[StubT]) -> None:
        self._reconnect_if_backing_off(replica)
        while True:
            began = time.monotonic()
            serving, why = await self._check(replica)
            if serving and not replica.healthy and replica.changed_at > began:
                continue  # taken out while this check was under way: its answer is stale
            self._set_healthy(replica, serving, why)
            return

    async def _check(self, replica: Replica[StubT]) -> tuple[bool, str]:
        request = health_pb2.HealthCheckRequest(service=self._health_service)
        try:
            response = await replica.health.Check(
                request, timeout=self.options.probe_timeout_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            return False, f"health check: {exc.code().name}"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return response.status == health_pb2.HealthCheckResponse.SERVING, f"health check: {status}"

    async def _probe_forever(self) -> None:
        while True:
            for replica in list(self._replicas.values()):
                self._probe_now(replica)
            await asyncio.sleep(self.options.probe_interval_s)

    async def _refresh_forever(self) -> None:
        assert self._dns_name is not None
        loop = asyncio.get_running_loop()
        while True:
            self._refresh_soon.clear()
            try:
                found = await loop.run_in_executor(None, self._resolver, self._dns_name)
            except OSError as exc:
                log.warning("resolving %s failed: %s", self._dns_name, exc)
            else:
                self._apply(found)
            pause = min(self.options.min_refresh_s, self.options.refresh_s)
            await asyncio.sleep(pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_soon.wait(), self.options.refresh_s - pause)

    def _apply(self, found: list[str]) -> None:
        for address in found:
            if address not in self._replicas:
                log.info("%s replica %s appeared", self.service, address)
                self._probe_now(self._add(address))
        for address in [a for a in self._replicas if a not in found]:
            log.info("%s replica %s is gone", self.service, address)
            replica = self._replicas.pop(address)
            if replica.probe is not None:
                replica.probe.cancel()
            task = asyncio.create_task(close_channel(replica.channel, self.options.close_grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        HEALTHY.labels(self.service).set(self.healthy_count)
        if self._replicas:
            self._resolved.set()

    # -- calls ------------------------------------------------------------

    async def call(self, invoke: Invoke[StubT, T], timeout: float, work: float = 1.0) -> T:
        """``invoke`` on one replica after another until one answers (see the module doc)."""
        self.start()
        opts = self.options
        started = time.monotonic()
        deadline = started + timeout
        if not self._resolved.is_set():
            try:
                await asyncio.wait_for(self._resolved.wait(), timeout)
            except TimeoutError:
                raise _error(
                    grpc.StatusCode.UNAVAILABLE, f"no {self.service} replica resolved"
                ) from None
        budget = self.budget.budget(timeout, work)
        running: dict[asyncio.Task[T], _Attempt[StubT]] = {}
        tried: list[Replica[StubT]] = []
        errors: list[grpc.aio.AioRpcError] = []

        async def attempt(replica: Replica[StubT], remaining: float) -> T:
            # A replica is waited for (connecting) only when there is no other to go to.
            return await invoke(replica.stub, remaining, self.healthy_count < 2)

        def launch(replica: Replica[StubT]) -> float:
            now = time.monotonic()
            task = asyncio.create_task(attempt(replica, deadline - now))
            running[task] = _Attempt(replica, now)
            tried.append(replica)
            return now + budget

        first = self.pick()
        if first is None:
            raise _error(grpc.StatusCode.UNAVAILABLE, f"no {self.service} replica known")
        hedge_at = launch(first)
        try:
            while running:
                can_start = len(tried) < opts.max_attempts
                wait = (hedge_at if can_start else deadline + 1.0) - time.monotonic()
                done, _ = await asyncio.wait(
                    running, timeout=max(wait, 0.0), return_when=asyncio.FIRST_COMPLETED
                )
                now = time.monotonic()
                if not done:
                    if now >= deadline:
                        break
                    for stalled in running.values():
                        self.mark_suspect(stalled.replica, f"no answer in {budget:.2f} s")
                    hedge_at = now + budget
                    replica = self.pick(exclude=tried)
                    if replica is not None and deadline - now > opts.min_attempt_s:
                        HEDGES.labels(self.service).inc()
                        hedge_at = launch(replica)
                    continue
                # Answers first: a success wins even if another attempt failed meanwhile.
                for task in sorted(done, key=lambda t: _failure(t) is not None):
                    finished = running.pop(task)
                    exc = _failure(task)
                    if exc is None:
                        self.budget.observe(now - finished.started, work)
                        return task.result()
                    if not isinstance(exc, grpc.aio.AioRpcError):
                        raise exc
                    errors.append(exc)
                    code = exc.code()
                    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        self.mark_suspect(finished.replica, f"call failed: {exc.details()}")
                        self.refresh_soon()
                    retry = self._retry_for(code, errors, tried, bool(running), finished.replica)
                    if retry is not None and deadline - now > opts.min_attempt_s:
                        RETRIES.labels(self.service).inc()
                        hedge_at = launch(retry)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        if errors and not running:
            raise errors[-1]
        raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.service}: deadline exceeded")

    def _retry_for(
        self,
        code: grpc.StatusCode,
        errors: list[grpc.aio.AioRpcError],
        tried: list[Replica[StubT]],
        still_running: bool,
        failed: Replica[StubT],
    ) -> Replica[StubT] | None:
        """Where a failed attempt goes next, if anywhere."""
        if code not in _RETRY_ELSEWHERE or len(tried) >= self.options.max_attempts:
            return None
        faulty = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        if code in faulty and sum(e.code() in faulty for e in errors) > 1:
            return None  # possibly this request's own fault: one more try, not two
        replica = self.pick(exclude=tried)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Overloaded: never the same replica again; another only if it is in rotation.
            return replica if replica is not None and replica.healthy else None
        if replica is not None or still_running:
            return replica
        # No other replica to go to: the one that failed, once more (it may be restarting).
        return failed if sum(r is failed for r in tried) == 1 else None
