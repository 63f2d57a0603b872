"""The gateway's side of the multiplexed VAD stream to one replica.

All sessions of this gateway pinned to a replica share one bidirectional gRPC
stream to it. Sessions enqueue opens, frames and closes; one sender drains
the queue into ``VadRequest`` messages, one per short tick (``vad_wire``),
and one receiver routes each event to the session that owns its stream id.

Three things end a connection besides the server: a transport error; the
replica failing its health checks while the connection looks open (a frozen
process keeps its TCP socket); and audio going unacknowledged for
``progress_timeout_s`` (the replica answers but its detector is stuck).
Either way every stream on it is gone and the ``on_lost`` callback lets the
owners re-pin.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from services.common.grpc_client import close_channel, open_channel
from services.common.tasks import being_cancelled, cancel_and_wait
from services.gateway.vad_wire import Outgoing, WireForm
from services.protos import vad_pb2, vad_pb2_grpc

log = logging.getLogger(__name__)

VAD_RECONNECTS = Counter(
    "speechfront_gateway_vad_reconnects_total", "Times the VAD stream had to be re-established."
)
VAD_STALLS = Counter(
    "speechfront_gateway_vad_stalls_total",
    "VAD connections abandoned because the replica stalled, by sign (health, progress).",
    ["sign"],
)
VAD_BACKLOG = Gauge(
    "speechfront_gateway_vad_backlog", "VAD operations waiting to be sent, by replica.", ["replica"]
)

VAD_CONNECTED = Gauge(
    "speechfront_gateway_vad_connected",
    "1 while this gateway's stream to the VAD replica is up, by replica.",
    ["replica"],
)
VAD_WRITES = Counter(
    "speechfront_gateway_vad_writes_total",
    "VadRequest messages written to VAD replicas (one per send tick while audio flows).",
)

EventHandler = Callable[[vad_pb2.SpeechEvent], None]


class VadStreamClient:
    def __init__(
        self,
        target: str,
        on_event: EventHandler,
        on_lost: Callable[[VadStreamClient], None],
        max_backlog: int = 20_000,
        health_interval_s: float = 1.0,
        health_failures: int = 2,
        connect_timeout_s: float = 5.0,
        progress_timeout_s: float = 10.0,
        wire: WireForm = "ticks",
        send_tick_s: float = 0.02,
    ) -> None:
        self.target = target
        self._wire: WireForm = wire
        self._send_tick_s = send_tick_s
        self._on_event = on_event
        # Streams on a lost connection are gone; their owners re-pin and replay.
        self._on_lost = on_lost
        self._max_backlog = max_backlog
        self._health_interval_s = health_interval_s
        self._health_failures = health_failures
        self._connect_timeout_s = connect_timeout_s
        self._progress_timeout_s = progress_timeout_s
        # (batch number, when it was handed to gRPC) of audio not yet
        # acknowledged on the current connection.
        self._unacked: deque[tuple[int, float]] = deque()
        self._last_ack = 0.0
        # How far behind the replica is, in operations: every op queued here
        # is numbered (``ops_queued`` after it), and ``ops_done`` counts those
        # the replica is through with (acknowledged; the server acknowledges a
        # batch once it has stepped all audio read before it) or that are moot
        # (their connection is gone). A session compares the number after each
        # of its frames with ``ops_done`` to know how much of its audio the VAD
        # may still report speech in, queued here, on the wire or in the
        # replica's backlog (``SessionVad.oldest_needed``).
        self.ops_queued = 0
        self.ops_done = 0
        # Requests handed to gRPC, all connections together.
        self.writes = 0
        self._ops_taken = 0
        # (batch, ops taken through it) of every request not yet acknowledged.
        self._ops_in_flight: deque[tuple[int, int]] = deque()
        # After a stall, sessions go elsewhere for a while even once the
        # replica reconnects: a stuck detector still accepts connections.
        self._avoid_until = 0.0
        self.stall_cooldown_s = 30.0
        # Unbounded as a container; opens and frames respect ``max_backlog``
        # (``has_room``) while closes always go, so cleanup never fails.
        self._queue = Outgoing()
        self._backlog = VAD_BACKLOG.labels(target)
        self._connected_gauge = VAD_CONNECTED.labels(target)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"vad-stream-{self.target}")

    async def stop(self) -> None:
        # grpc may not let a wait on a dead replica go at once; a stop must return.
        await cancel_and_wait(self._task, limit_s=5.0)
        self._connected_gauge.set(0)

    # -- operations (never raise) ------------------------------------------

    def has_room(self, ops: int = 1) -> bool:
        """Whether ``ops`` more opens or frames fit in the backlog now."""
        return len(self._queue.ops) + ops <= self._max_backlog

    def open(self, stream_id: str, start_sample: int = 0, silence_ms: int = 0) -> None:
        self._put(
            vad_pb2.StreamOpen(
                stream_id=stream_id, start_sample=start_sample, silence_ms=silence_ms
            )
        )

    def send(self, stream_id: str, seq: int, pcm: bytes) -> None:
        # The hot path: a tuple now, a protobuf field only when the tick is packed.
        self._queue.put((stream_id, seq, pcm))
        self.ops_queued += 1

    def close(self, stream_id: str, flush: bool) -> None:
        self._put(vad_pb2.StreamClose(stream_id=stream_id, flush=flush))

    def _put(self, op: vad_pb2.StreamOpen | vad_pb2.StreamClose) -> None:
        self._queue.put(op)
        self.ops_queued += 1

    # -- connection ------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            channel = open_channel(self.target)
            was_connected = False
            watchdog: asyncio.Task[None] | None = None
            try:
                stub = vad_pb2_grpc.VadStub(channel)
                self._unacked = deque()
                self._ops_in_flight = deque()
                self._last_ack = time.monotonic()
                call = stub.Stream(self._requests(self._queue), wait_for_ready=True)
                await asyncio.wait_for(call.wait_for_connection(), self._connect_timeout_s)
                self.connected.set()
                self._connected_gauge.set(1)
                was_connected = True
                backoff = 0.1
                watchdog = asyncio.create_task(self._watch_health(channel, call))
                async for response in call:
                    self._acknowledge(response.acked_batch)
                    for event in response.events:
                        self._dispatch(event)
                log.warning("VAD stream to %s ended by the server", self.target)
            except asyncio.CancelledError:
                if being_cancelled() or watchdog is None or not watchdog.done():
                    raise
                # The watchdog cancelled the call: the replica is stalled.
                log.warning("VAD replica %s stopped answering; stream abandoned", self.target)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                if was_connected:
                    log.warning("VAD stream to %s failed: %s", self.target, exc)
            finally:
                self.connected.clear()
                self._connected_gauge.set(0)
                await cancel_and_wait(watchdog)
                await close_channel(channel)
            # Each connection attempt reads its own queue. grpc keeps polling
            # the request generator of a call the server ended, so a shared
            # queue would hand the next connection's first message (the
            # replayed opens of many sessions) to the dead call and leave
            # those sessions without a VAD stream.
            self._retire_queue()
            moot = self._ops_taken
            if was_connected:
                VAD_RECONNECTS.inc()
            # What was queued for this attempt is gone with it; the sessions
            # re-open and replay what they need (measured against how far
            # this connection got, so ``ops_done`` moves on only after).
            self._report_lost()
            self.ops_done = max(self.ops_done, moot)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _watch_health(
        self, channel: grpc.aio.Channel, call: grpc.aio.StreamStreamCall
    ) -> None:
        """Cancel the call once the replica misses ``health_failures`` checks in a
        row, or leaves audio unacknowledged for ``progress_timeout_s``.

        A frozen replica keeps its socket open and sends nothing: without this
        the stream would look healthy until keepalive or TCP gives up.
        """
        stub = health_pb2_grpc.HealthStub(channel)
        misses = 0
        while True:
            await asyncio.sleep(self._health_interval_s)
            if self._stalled(time.monotonic()):
                sign = "progress"
                break
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=self._health_interval_s
                )
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                serving = False
            misses = 0 if serving else misses + 1
            if misses >= self._health_failures:
                sign = "health"
                break
        log.warning("VAD replica %s stalled (%s)", self.target, sign)
        VAD_STALLS.labels(sign).inc()
        self._avoid_until = time.monotonic() + self.stall_cooldown_s
        call.cancel()

    @property
    def preferred(self) -> bool:
        """Connected, and not recently stalled."""
        return self.connected.is_set() and time.monotonic() >= self._avoid_until

    def _stalled(self, now: float) -> bool:
        """Audio has waited ``progress_timeout_s`` and no acknowledgement came meanwhile.

        A replica that is slow (long ticks under load) still acknowledges
        something every tick; only one that makes no progress at all is cut.
        """
        if not self._unacked:
            return False
        waiting_since = max(self._unacked[0][1], self._last_ack)
        return now - waiting_since > self._progress_timeout_s

    def _acknowledge(self, batch: int) -> None:
        if self._unacked and self._unacked[0][0] <= batch:
            self._last_ack = time.monotonic()
        while self._unacked and self._unacked[0][0] <= batch:
            self._unacked.popleft()
        while self._ops_in_flight and self._ops_in_flight[0][0] <= batch:
            self.ops_done = max(self.ops_done, self._ops_in_flight.popleft()[1])

    def _report_lost(self) -> None:
        try:
            self._on_lost(self)
        except Exception:
            # One session's failure to move must not end this client's loop.
            log.exception("re-pinning sessions after losing %s failed", self.target)

    def _retire_queue(self) -> None:
        old, self._queue = self._queue, Outgoing()
        # Never sent: numbered as taken, and moot.
        self._ops_taken += old.retire()
        self._backlog.set(0)

    def _dispatch(self, event: vad_pb2.SpeechEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("handling VAD event for %s failed", event.stream_id)

    async def _requests(self, queue: Outgoing) -> AsyncIterator[vad_pb2.VadRequest]:
        numbers = itertools.count(1)
        ticks = self._wire == "ticks"
        last_write = 0.0
        caught_up = True
        while True:
            await queue.ready.wait()
            if ticks and caught_up and not queue.retired:
                # Let the rest of this tick's frames join the first one: writes
                # then follow the clock, however many sessions send. A backlog
                # (more than one write holds) goes out back to back.
                wait = last_write + self._send_tick_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            if queue.retired:
                return
            request, taken, has_audio = queue.take(self._wire)
            caught_up = not queue.ops
            last_write = time.monotonic()
            self._backlog.set(len(queue.ops))
            request.batch = next(numbers)
            self.writes += 1
            VAD_WRITES.inc()
            self._ops_taken += taken
            self._ops_in_flight.append((request.batch, self._ops_taken))
            if has_audio:
                self._unacked.append((request.batch, last_write))
            yield request
