"""The local cluster's restart policy, driven by a fake clock and fake processes,
and the front that restarted gateways come back behind."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest

from services.front import Front
from services.probes import free_port
from services.supervisor import Backoff, Supervisor


def test_backoff_doubles_from_one_second_up_to_thirty() -> None:
    backoff = Backoff()
    assert [backoff.delay(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(10_000) == 30  # no overflow however often it failed


def test_backoff_starts_over_after_the_process_stayed_up() -> None:
    backoff = Backoff(reset_after_s=60)
    failures = 0
    for _ in range(4):  # four quick exits in a row
        failures = backoff.failures_after_exit(failures, uptime_s=2)
    assert backoff.delay(failures) == 8
    failures = backoff.failures_after_exit(failures, uptime_s=61)
    assert failures == 1 and backoff.delay(failures) == 1


@dataclass
class FakeProcess:
    pid: int
    code: int | None = None

    def poll(self) -> int | None:
        return self.code


@dataclass
class FakeTarget:
    """Processes by name; ``broken`` ones fail to start, ``busy`` ones hold their ports."""

    processes: dict[str, FakeProcess] = field(default_factory=dict)
    healthy_names: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)
    unreadable: set[str] = field(default_factory=set)
    started: list[str] = field(default_factory=list)

    def current(self, name: str) -> FakeProcess | None:
        if name in self.unreadable:
            raise RuntimeError(f"cannot look at {name}")
        return self.processes.get(name)

    def restart(self, name: str, note: str) -> None:
        if name in self.broken:
            raise OSError("no such executable")
        self.started.append(name)
        self.processes[name] = FakeProcess(pid=len(self.started) + 100)

    def healthy(self, name: str) -> bool:
        return name in self.healthy_names

    def ports_free(self, name: str) -> bool:
        return name not in self.busy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def supervised(clock: Clock, *names: str) -> tuple[Supervisor, FakeTarget]:
    target = FakeTarget({n: FakeProcess(pid=i) for i, n in enumerate(names)}, set(names))
    supervisor = Supervisor(target, Backoff(), clock=clock)
    for name in names:
        supervisor.watch(name)
    supervisor.tick()
    return supervisor, target


def test_an_exited_process_is_restarted_after_its_backoff_and_counted(clock: Clock) -> None:
    supervisor, target = supervised(clock, "asr-1", "vad")
    assert supervisor.status("asr-1").state == "running"
    clock.now += 100
    target.processes["asr-1"].code = -9
    supervisor.tick()
    status = supervisor.status("asr-1")
    assert (status.state, status.last_exit_code, status.failures) == ("waiting", -9, 1)
    clock.now += 0.9
    supervisor.tick()
    assert target.started == []  # still backing off
    clock.now += 0.2
    supervisor.tick()
    assert target.started == ["asr-1"]
    assert supervisor.status("asr-1").state == "starting"
    target.healthy_names.discard("asr-1")
    supervisor.tick()
    assert supervisor.status("asr-1").state == "starting"  # alive, not healthy yet
    clock.now += 2.0
    target.healthy_names.add("asr-1")
    supervisor.tick()
    status = supervisor.status("asr-1")
    assert (status.state, status.restarts) == ("running", 1)
    assert status.recoveries == [pytest.approx(3.1)]
    assert supervisor.restarts() == {"asr-1": 1, "vad": 0}


def test_quick_exits_back_off_longer_and_others_are_not_held_up(clock: Clock) -> None:
    supervisor, target = supervised(clock, "speaker", "gateway-1")
    clock.now += 100
    target.broken.add("speaker")
    target.processes["speaker"].code = 1
    supervisor.tick()
    tries = []
    for _ in range(5):  # each failed start waits twice as long as the one before
        clock.now = supervisor.status("speaker").next_start
        before = clock.now
        supervisor.tick()
        tries.append(supervisor.status("speaker").next_start - before)
    assert tries == [2, 4, 8, 16, 30]
    # Meanwhile another process dies and comes back on its own schedule.
    target.processes["gateway-1"].code = -9
    supervisor.tick()
    clock.now += 1.0
    supervisor.tick()
    assert target.started == ["gateway-1"]
    assert supervisor.status("speaker").state == "waiting"


def test_a_process_that_keeps_exiting_right_after_start_backs_off(clock: Clock) -> None:
    supervisor, target = supervised(clock, "vad-1")
    delays = []
    for _ in range(4):
        target.processes["vad-1"].code = 1
        supervisor.tick()
        status = supervisor.status("vad-1")
        delays.append(status.next_start - clock.now)
        clock.now = status.next_start
        supervisor.tick()  # restarted
    assert delays == [1, 2, 4, 8]
    assert supervisor.status("vad-1").restarts == 4


def test_no_restart_while_the_old_process_holds_its_ports(clock: Clock) -> None:
    supervisor, target = supervised(clock, "gateway")
    target.busy.add("gateway")
    target.processes["gateway"].code = -9
    supervisor.tick()
    for _ in range(5):
        clock.now += 1.0
        supervisor.tick()
    assert target.started == []
    target.busy.clear()
    clock.now += 1.0
    supervisor.tick()
    assert target.started == ["gateway"]


def test_trouble_looking_at_one_process_does_not_stop_the_others(clock: Clock) -> None:
    supervisor, target = supervised(clock, "front", "asr")
    target.unreadable.add("front")
    target.processes["asr"].code = -9
    supervisor.tick()
    clock.now += 1.0
    supervisor.tick()
    assert target.started == ["asr"]


def test_expedite_restarts_a_waiting_process_at_once(clock: Clock) -> None:
    supervisor, target = supervised(clock, "redis")
    for _ in range(5):  # a long back-off by now
        target.processes["redis"].code = 1
        supervisor.tick()
        clock.now = supervisor.status("redis").next_start
        supervisor.tick()
    target.processes["redis"].code = 1
    supervisor.tick()
    assert supervisor.status("redis").next_start - clock.now == 30
    supervisor.expedite("redis")
    supervisor.tick()
    assert supervisor.status("redis").state == "starting"
    supervisor.expedite("redis")  # harmless once it runs again
    supervisor.tick()
    assert supervisor.status("redis").restarts == 6


async def test_front_tries_every_gateway_for_each_of_many_devices_reconnecting_at_once() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    live = await asyncio.start_server(echo, "127.0.0.1", 0)
    live_port = live.sockets[0].getsockname()[1]
    front = Front([("127.0.0.1", free_port()), ("127.0.0.1", live_port)])  # one gateway dead
    server = await asyncio.start_server(front.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def ask(i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello %d" % i)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(100), 5)
        writer.close()
        return reply

    try:
        replies = await asyncio.gather(*(ask(i) for i in range(8)))
    finally:
        for s in (server, live):
            s.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.wait_closed(), 2)
    assert replies == [b"hello %d" % i for i in range(8)]
