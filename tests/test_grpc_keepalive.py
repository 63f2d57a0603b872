"""Keepalive: clients find a silent peer in seconds, and servers accept their pings.

A peer that stops answering without closing its connections (a stopped
process, a partition) is found by the client's keepalive ping going
unanswered. A server that does not allow a client's ping rate answers the third early
ping with GOAWAY too_many_pings, which drops the connection (and any call on
it). With gRPC's default server policy an idle connection is allowed one
ping per two hours, so a client pinging every 5 s is sent away about 16 s
after its last call. The replica here is a stub servicer (the edge), reached
through a TCP relay that can stop relaying; the client channel and the server
options are the ones the services use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from services.common.grpc_client import (
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    keepalive_options,
    open_channel,
)
from services.common.grpc_service import server_options
from services.common.settings import ServiceSettings
from services.protos import asr_pb2, asr_pb2_grpc

# Long enough for four client pings on an idle connection: a server with
# gRPC's default ping policy sends GOAWAY at the fourth.
IDLE_S = 20.0


class StubAsr(asr_pb2_grpc.AsrServicer):
    """A stub replica: answers at once, or after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def Recognize(
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        await asyncio.sleep(self.delay_s)
        return asr_pb2.RecognizeResponse(text="ok")


@asynccontextmanager
async def stub_server(servicer: StubAsr) -> AsyncIterator[int]:
    server = grpc.aio.server(options=server_options(ServiceSettings.model_construct()))
    asr_pb2_grpc.add_AsrServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


class Relay:
    """TCP relay to a server; ``freeze()`` stops relaying while connections stay open."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def freeze(self) -> None:
        self._flowing.clear()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in self._writers:
                writer.close()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            await self._flowing.wait()
            sink.write(data)
            await sink.drain()


def test_clients_ping_a_silent_peer_soon_and_no_more_often_than_servers_accept() -> None:
    client = dict(keepalive_options())
    server = dict(server_options(ServiceSettings.model_construct()))
    assert client["grpc.keepalive_time_ms"] + client["grpc.keepalive_timeout_ms"] <= 10_000
    assert (
        client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    )
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1  # idle connections may be pinged
    assert client["grpc.http2.max_pings_without_data"] == 0  # keep pinging while idle
    # A call's own flow-control ping must not wait out a longer timeout than keepalive's.
    assert client["grpc.http2.ping_timeout_ms"] <= client["grpc.keepalive_timeout_ms"]
    assert server["grpc.http2.max_ping_strikes"] == 0


async def test_a_call_to_a_peer_that_went_silent_fails_after_one_keepalive_timeout() -> None:
    async with stub_server(StubAsr(delay_s=60.0)) as port:
        relay = Relay(port)
        async with relay.running() as relay_port:
            channel = open_channel(f"127.0.0.1:{relay_port}")
            try:
                stub = asr_pb2_grpc.AsrStub(channel)
                call = stub.Recognize(asr_pb2.RecognizeRequest(), timeout=30)
                await channel.channel_ready()
                relay.freeze()
                frozen_at = time.monotonic()
                try:
                    await call
                    raise AssertionError("the call to a silent peer succeeded")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                found_after = time.monotonic() - frozen_at
                assert found_after < (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 1.0
            finally:
                await channel.close()


async def test_an_idle_connection_pinged_for_20_s_is_not_sent_away() -> None:
    async with stub_server(StubAsr()) as port:
        channel = open_channel(f"127.0.0.1:{port}")
        try:
            stub = asr_pb2_grpc.AsrStub(channel)
            assert (await stub.Recognize(asr_pb2.RecognizeRequest(), timeout=10)).text == "ok"
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # A GOAWAY takes the channel out of READY (it reconnects at once after).
            left_ready = asyncio.ensure_future(
                channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
            )
            done, _ = await asyncio.wait({left_ready}, timeout=IDLE_S)
            left_ready.cancel()
            assert not done, f"the connection left READY: {channel.get_state()}"
            assert (await stub.Recognize(asr_pb2.RecognizeRequest(), timeout=10)).text == "ok"
        finally:
            await channel.close()
