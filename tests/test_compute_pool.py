"""The gateway's compute pool: hung, refusing and gone replicas, hedge budget, targets.

The gateway side (``ComputeClients``, ``ReplicaPool``) is the real code over
real gRPC on 127.0.0.1. The replicas are ``StubReplica``: a few lines serving
``Asr.Recognize`` and the health service, so a test can make one hang (as a
stopped process would) or refuse on cue; the real asr service is covered by
the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.grpc_service import server_options
from services.common.settings import ServiceSettings
from services.gateway.compute import ComputeClients
from services.gateway.hedge_budget import HedgeBudget, PoolOptions
from services.gateway.replicas import ReplicaPool
from services.gateway.targets import parse_target, resolve
from services.protos import asr_pb2, asr_pb2_grpc

PCM = b"\x00\x00" * 16000  # one second of silence
TIMEOUT = 10.0
OPTIONS = PoolOptions(probe_interval_s=1.0)
FAST_ENOUGH = 0.5  # well under the hedge floor: nobody waited for a budget to pass


class StubReplica(asr_pb2_grpc.AsrServicer, health_pb2_grpc.HealthServicer):
    """A stand-in asr replica at the edge of the test, controlled by it.

    ``freeze()`` makes Recognize and the health check block (a SIGSTOPped
    process: the port accepts, nothing answers) until ``thaw()``;
    ``refuse`` makes Recognize fail with that status at once.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.address = ""
        self.server: grpc.aio.Server | None = None
        self.arrivals: list[float] = []
        self.refuse: grpc.StatusCode | None = None
        self._running = asyncio.Event()
        self._running.set()

    def freeze(self) -> None:
        self._running.clear()

    def thaw(self) -> None:
        self._running.set()

    async def Recognize(
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        self.arrivals.append(time.monotonic())
        if self.refuse is not None:
            await context.abort(self.refuse, f"{self.name} refuses")
        await self._running.wait()
        return asr_pb2.RecognizeResponse(text=self.name, engine="stub")

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await self._running.wait()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@asynccontextmanager
async def stub_replicas(*names: str) -> AsyncIterator[list[StubReplica]]:
    servers: list[grpc.aio.Server] = []
    replicas = []
    try:
        for name in names:
            replica = StubReplica(name)
            server = grpc.aio.server(options=server_options(ServiceSettings.model_construct()))
            asr_pb2_grpc.add_AsrServicer_to_server(replica, server)
            health_pb2_grpc.add_HealthServicer_to_server(replica, server)
            replica.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            replica.server = server
            await server.start()
            servers.append(server)
            replicas.append(replica)
        yield replicas
    finally:
        for replica in replicas:
            replica.thaw()
        await asyncio.gather(*(server.stop(0) for server in servers))


@asynccontextmanager
async def compute_over(*replicas: StubReplica) -> AsyncIterator[ComputeClients]:
    """ComputeClients whose asr target lists these replicas, once all are in rotation."""
    clients = ComputeClients(",".join(r.address for r in replicas), "127.0.0.1:1", OPTIONS)
    clients.start()
    try:
        live = len(replicas)
        await wait_until(lambda: clients.asr_pool.healthy_count == live, 5.0, "replicas healthy")
        yield clients
    finally:
        await clients.close()


async def wait_until(condition: Callable[[], bool], within_s: float, what: str) -> float:
    """Poll ``condition`` until true; the seconds it took. Fails after ``within_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within_s:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def counter(name: str, service: str = "asr") -> float:
    return REGISTRY.get_sample_value(name, {"service": service}) or 0.0


async def recognize(clients: ComputeClients, request_id: str) -> tuple[str, float]:
    started = time.monotonic()
    response = await clients.recognize(PCM, "auto", False, request_id, TIMEOUT)
    return response.text, time.monotonic() - started


# -- a replica that hangs -----------------------------------------------------------


async def test_a_hung_replica_costs_one_hedge_then_gets_no_calls_until_health_answers() -> None:
    async with stub_replicas("a", "b") as (a, b), compute_over(a, b) as clients:
        pool = clients.asr_pool
        for i in range(10):  # recent service times: fast, so the budget is its floor
            await recognize(clients, f"warm-{i}")
        hedges = counter("speechfront_gateway_compute_hedges_total")
        b.freeze()
        frozen_at = time.monotonic()
        b_before = len(b.arrivals)

        outcomes = [await recognize(clients, f"hung-{i}") for i in range(20)]

        texts = [text for text, _ in outcomes]
        latencies = sorted(seconds for _, seconds in outcomes)
        assert texts == ["a"] * 20
        assert latencies[-1] < pool.options.hedge_floor_s + 1.0  # far inside the 10 s deadline
        assert latencies[-2] < FAST_ENOUGH  # only the call that found b hung waited
        assert counter("speechfront_gateway_compute_hedges_total") - hedges == 1
        assert len(b.arrivals) - b_before == 1  # after the stall, no first attempt went to b
        assert not pool.replica(b.address).healthy
        assert pool.replica(b.address).changed_at - frozen_at < pool.options.hedge_floor_s + 0.5

        b.thaw()
        await wait_until(lambda: pool.replica(b.address).healthy, 5.0, "b back in rotation")
        b_before = len(b.arrivals)
        for i in range(4):
            await recognize(clients, f"thawed-{i}")
        assert len(b.arrivals) > b_before


async def test_a_replica_hung_between_calls_is_taken_out_by_its_health_check() -> None:
    async with stub_replicas("a", "b") as (a, b), compute_over(a, b) as clients:
        pool = clients.asr_pool
        b.freeze()
        limit = pool.options.probe_interval_s + pool.options.probe_timeout_s + 0.5
        await wait_until(lambda: not pool.replica(b.address).healthy, limit, "b ejected")
        hedges = counter("speechfront_gateway_compute_hedges_total")
        for i in range(4):
            text, seconds = await recognize(clients, f"idle-hang-{i}")
            assert (text, seconds < FAST_ENOUGH) == ("a", True)
        assert counter("speechfront_gateway_compute_hedges_total") == hedges


# -- replicas that fail -------------------------------------------------------------


async def test_a_replica_refusing_unavailable_costs_an_immediate_retry_on_the_other() -> None:
    async with stub_replicas("a", "b") as (a, b), compute_over(a, b) as clients:
        b.refuse = grpc.StatusCode.UNAVAILABLE
        retries = counter("speechfront_gateway_compute_retries_total")
        for i in range(6):  # round-robin reaches b within two calls
            text, seconds = await recognize(clients, f"refused-{i}")
            assert (text, seconds < FAST_ENOUGH) == ("a", True)
            if b.arrivals:
                break
        assert b.arrivals
        assert counter("speechfront_gateway_compute_retries_total") > retries


async def test_a_replica_that_died_costs_a_retry_not_a_wait() -> None:
    async with stub_replicas("a", "b") as (a, b), compute_over(a, b) as clients:
        assert b.server is not None
        await b.server.stop(0)
        retries = counter("speechfront_gateway_compute_retries_total")
        for i in range(4):
            text, seconds = await recognize(clients, f"died-{i}")
            assert (text, seconds < FAST_ENOUGH) == ("a", True)
        assert counter("speechfront_gateway_compute_retries_total") > retries
        assert not clients.asr_pool.replica(b.address).healthy


async def test_an_overloaded_replica_sends_the_call_to_another_and_stays_in_rotation() -> None:
    async with stub_replicas("a", "b") as (a, b), compute_over(a, b) as clients:
        b.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        for i in range(6):
            text, _ = await recognize(clients, f"busy-{i}")
            assert text == "a"
            if b.arrivals:
                break
        assert b.arrivals
        assert clients.asr_pool.replica(b.address).healthy


async def test_an_overloaded_only_replica_is_not_asked_again() -> None:
    async with stub_replicas("b") as (b,), compute_over(b) as clients:
        b.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await recognize(clients, "busy-only")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(b.arrivals) == 1


# -- the hedge budget ---------------------------------------------------------------


def test_hedge_budget_follows_recent_service_time_within_floor_and_deadline_share() -> None:
    budget = HedgeBudget(floor_s=1.5, initial_s=3.0, factor=2.0, window=50, min_samples=8)
    assert budget.budget(10.0) == 3.0  # nothing seen yet
    for _ in range(50):
        budget.observe(0.2)
    assert budget.budget(10.0) == 1.5  # 2 x 0.2 s is under the floor
    for _ in range(50):
        budget.observe(1.8)
    assert budget.budget(10.0) == pytest.approx(3.6)  # the window now holds only slow calls
    assert budget.budget(5.0) == 2.5  # a hedge always keeps half the deadline
    for _ in range(50):
        budget.observe(0.3)
    assert budget.budget(10.0) == 1.5


def test_hedge_budget_scales_with_the_audio_sent() -> None:
    budget = HedgeBudget(floor_s=0.1, min_samples=1, deadline_share=1.0)
    for _ in range(20):
        budget.observe(1.0, work=4.0)  # 0.25 s per second of audio
    assert budget.budget(60.0, work=4.0) == pytest.approx(2.0)
    assert budget.budget(60.0, work=12.0) == pytest.approx(6.0)
    assert budget.budget(60.0, work=0.5) == pytest.approx(0.5)  # short calls count as 1 s


# -- targets ------------------------------------------------------------------------


def test_static_targets_list_their_replicas() -> None:
    assert parse_target("10.0.0.1:50052,10.0.0.2:50052") == (
        ["10.0.0.1:50052", "10.0.0.2:50052"],
        None,
    )
    assert parse_target("ipv4:10.0.0.1:1, 10.0.0.2:2") == (["10.0.0.1:1", "10.0.0.2:2"], None)
    assert parse_target("ipv6:[::1]:1,[::2]:1") == (["[::1]:1", "[::2]:1"], None)
    assert parse_target("asr:50052") == (["asr:50052"], None)
    assert parse_target("dns:///asr.speech.svc:50052") == ([], "asr.speech.svc:50052")
    assert parse_target("dns://10.0.0.53/asr.speech.svc:50052") == ([], "asr.speech.svc:50052")


def test_dns_names_resolve_to_one_address_per_record() -> None:
    found = resolve("localhost:50052")
    assert "127.0.0.1:50052" in found
    assert all(a == "127.0.0.1:50052" or a.startswith("[") for a in found)


async def test_a_dns_target_follows_replicas_that_come_and_go() -> None:
    records = ["127.0.0.2:1", "127.0.0.3:1"]
    pool = ReplicaPool(
        "asr",
        "dns:///asr.example:50052",
        asr_pb2_grpc.AsrStub,
        options=PoolOptions(refresh_s=0.05, probe_interval_s=60.0),
        resolver=lambda name: list(records) if name == "asr.example:50052" else [],
    )
    try:
        assert pool.addresses == []
        pool.start()
        await wait_until(lambda: pool.addresses == records, 2.0, "first resolution")
        records[:] = ["127.0.0.3:1", "127.0.0.4:1"]
        await wait_until(lambda: pool.addresses == records, 2.0, "replica set follows DNS")
    finally:
        await pool.close()
