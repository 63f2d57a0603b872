"""Frames to the VAD travel per send tick, packed across sessions, and hear the same speech.

A real VAD service (servicer, stream table, inference thread and the batched
FSMN engine on the lite model) listens on loopback in this process; the
gateway's real ``VadStreamClient`` talks to it over gRPC.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support.recordings import mandarin

from services.common.audio import float_to_pcm16
from services.common.inference import InferenceThread
from services.gateway.vad_client import VadStreamClient
from services.gateway.vad_wire import MAX_BLOCK_PCM_BYTES, WireForm
from services.probes import free_port
from services.protos import vad_pb2, vad_pb2_grpc
from services.vad.fsmn_batched import BatchedFsmnVadEngine
from services.vad.server import VadServicer
from services.vad.streams import StreamTable

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fsmn-vad"
FRAME_BYTES = 960 * 2  # 60 ms
# Bounds every wait for the replica; a hang fails instead of blocking.
WAIT_S = 20.0

Kind = vad_pb2.SpeechEvent.Kind


@pytest.fixture(scope="module")
async def vad_address() -> AsyncIterator[str]:
    inference = InferenceThread("vad-coalescing-test")
    engine = inference.call(BatchedFsmnVadEngine, MODEL_DIR)
    table = StreamTable(
        engine, inference, default_silence_ms=500, tick_ms=60, max_streams=1000, max_backlog_s=10
    )
    server = grpc.aio.server()
    vad_pb2_grpc.add_VadServicer_to_server(VadServicer(table), server)
    # The client's watchdog abandons a replica that does not answer health checks.
    checks = health.aio.HealthServicer()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    table.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await table.stop()
        await server.stop(grace=None)
        inference.shutdown()


class Listener:
    """Events per stream, as the gateway's hub would route them."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[int, int]]] = {}
        self.closed: set[str] = set()

    def on_event(self, event: vad_pb2.SpeechEvent) -> None:
        if event.kind == Kind.STREAM_CLOSED:
            self.closed.add(event.stream_id)
        else:
            self.events.setdefault(event.stream_id, []).append((event.kind, event.offset_ms))

    async def wait_closed(self, stream_ids: list[str]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not self.closed.issuperset(stream_ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert self.closed.issuperset(stream_ids), "the replica never closed every stream"


async def connected_client(
    address: str, listener: Listener, wire: WireForm, tick_s: float = 0.01
) -> VadStreamClient:
    client = VadStreamClient(
        address, listener.on_event, lambda c: None, wire=wire, send_tick_s=tick_s
    )
    client.start()
    await asyncio.wait_for(client.connected.wait(), WAIT_S)
    return client


def speech_frames() -> list[bytes]:
    """The real recording between two pauses, in 60 ms frames."""
    pause = np.zeros(16_000, dtype=np.float32)
    pcm = float_to_pcm16(np.concatenate([pause, mandarin(), pause, pause]))
    pcm += b"\x00" * ((-len(pcm)) % FRAME_BYTES)
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


async def test_frames_sent_within_one_tick_leave_in_one_write(vad_address: str) -> None:
    listener = Listener()
    client = await connected_client(vad_address, listener, "ticks", tick_s=0.02)
    try:
        ids = [f"burst/{i}" for i in range(50)]
        await asyncio.sleep(0.05)  # the tick after the connection's first write
        before = client.writes
        for sid in ids:
            client.open(sid)
        for seq in (1, 2, 3):
            for sid in ids:
                client.send(sid, seq, b"\x00\x00" * 160)  # 10 ms
        for sid in ids:
            client.close(sid, flush=True)
        await listener.wait_closed(ids)
        # 50 opens, 150 frames (48 000 bytes) and 50 closes, queued in one go: one write.
        assert client.writes - before == 1
    finally:
        await client.stop()


async def test_a_tick_holding_more_than_one_block_goes_out_in_writes_back_to_back(
    vad_address: str,
) -> None:
    listener = Listener()
    # A long tick: writes one tick apart would take seconds.
    client = await connected_client(vad_address, listener, "ticks", tick_s=0.2)
    try:
        ids = [f"big/{i}" for i in range(1000)]
        await asyncio.sleep(0.25)
        before = client.writes
        for sid in ids:
            client.open(sid)
        for seq in (1, 2, 3):
            for sid in ids:
                client.send(sid, seq, b"\x00\x00" * 960)
        for sid in ids:
            client.close(sid, flush=True)
        # 3 000 frames of 1 920 bytes: several blocks of at most MAX_BLOCK_PCM_BYTES.
        expected = math.ceil(len(ids) * 3 / (MAX_BLOCK_PCM_BYTES // 1920))
        started = time.monotonic()
        while client.writes - before < expected and time.monotonic() - started < WAIT_S:
            await asyncio.sleep(0.001)
        # Not one tick per write: the backlog did not wait for the clock.
        assert time.monotonic() - started < expected * 0.2 / 2
        await listener.wait_closed(ids)
        assert client.writes - before == expected
    finally:
        await client.stop()


async def test_writes_follow_the_send_tick_not_the_frames(vad_address: str) -> None:
    listener = Listener()
    client = await connected_client(vad_address, listener, "ticks", tick_s=0.02)
    try:
        ids = [f"paced/{i}" for i in range(100)]
        for sid in ids:
            client.open(sid)
        before = client.writes
        started = time.monotonic()
        # 100 devices, each sending a 60 ms frame at its own moment: a frame
        # every 0.6 ms, 1 700 frames over a second.
        for seq in range(1, 18):
            for sid in ids:
                client.send(sid, seq, b"\x00\x00" * 960)
                await asyncio.sleep(0.0006)
        elapsed = time.monotonic() - started
        for sid in ids:
            client.close(sid, flush=False)
        writes = client.writes - before
        assert writes <= elapsed / 0.02 + 2, f"{writes} writes in {elapsed:.2f} s"
        assert writes * 10 < 17 * len(ids)
    finally:
        await client.stop()


@pytest.mark.parametrize("wire", ["ticks", "frames"])
async def test_each_wire_form_hears_the_recordings_speech_in_every_stream(
    vad_address: str, wire: WireForm
) -> None:
    listener = Listener()
    client = await connected_client(vad_address, listener, wire)
    frames = speech_frames()
    ids = [f"{wire}/{i}" for i in range(8)]
    try:
        for sid in ids:
            client.open(sid)
        for seq, frame in enumerate(frames, start=1):
            for sid in ids:
                client.send(sid, seq, frame)
            await asyncio.sleep(0.002)
        for sid in ids:
            client.close(sid, flush=True)
        await listener.wait_closed(ids)
    finally:
        await client.stop()
    first = listener.events[ids[0]]
    kinds = [kind for kind, _ in first]
    assert kinds[0] == Kind.SPEECH_START and kinds[-1] == Kind.SPEECH_END
    # Speech starts in the recording (after the 1 s pause and its own lead-in).
    assert 1_000 <= first[0][1] <= 2_500
    assert all(listener.events[sid] == first for sid in ids)


async def test_both_wire_forms_give_the_same_events_for_the_same_audio(
    vad_address: str,
) -> None:
    frames = speech_frames()
    heard: dict[str, list[tuple[int, int]]] = {}
    for wire in ("frames", "ticks"):
        listener = Listener()
        client = await connected_client(vad_address, listener, wire)
        sid = f"same/{wire}"
        try:
            client.open(sid)
            for seq, frame in enumerate(frames, start=1):
                client.send(sid, seq, frame)
                await asyncio.sleep(0.001)
            client.close(sid, flush=True)
            await listener.wait_closed([sid])
        finally:
            await client.stop()
        heard[wire] = listener.events[sid]
    assert heard["ticks"] == heard["frames"]


async def _exchange(address: str, requests: list[vad_pb2.VadRequest]) -> list[vad_pb2.SpeechEvent]:
    """Send ``requests``, then collect events until a last stream, ``end``, has closed
    (the request side stays open meanwhile: a gateway that stops sending is gone)."""
    done = asyncio.Event()

    async def stream() -> AsyncIterator[vad_pb2.VadRequest]:
        for request in requests:
            yield request
        yield vad_pb2.VadRequest(
            opens=[vad_pb2.StreamOpen(stream_id="end")],
            closes=[vad_pb2.StreamClose(stream_id="end", flush=True)],
        )
        await done.wait()

    events: list[vad_pb2.SpeechEvent] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = vad_pb2_grpc.VadStub(channel).Stream(stream(), timeout=WAIT_S)
        async for response in call:
            events.extend(response.events)
            if any(e.stream_id == "end" and e.kind == Kind.STREAM_CLOSED for e in events):
                done.set()
                call.cancel()
                break
    return [e for e in events if e.stream_id != "end"]


def _block(frames: list[tuple[str, int, bytes]], pcm: bytes | None = None) -> vad_pb2.FrameBlock:
    return vad_pb2.FrameBlock(
        stream_ids=[f[0] for f in frames],
        seqs=[f[1] for f in frames],
        samples=[len(f[2]) // 2 for f in frames],
        pcm=b"".join(f[2] for f in frames) if pcm is None else pcm,
    )


async def test_a_block_whose_lengths_disagree_with_its_pcm_fails_its_streams(
    vad_address: str,
) -> None:
    frame = b"\x00\x00" * 960
    block = _block([("a", 1, frame), ("b", 1, frame)], pcm=frame + frame[:-2])
    events = await _exchange(
        vad_address,
        [
            vad_pb2.VadRequest(
                opens=[vad_pb2.StreamOpen(stream_id="a"), vad_pb2.StreamOpen(stream_id="b")],
                block=block,
            )
        ],
    )
    errors = {(e.stream_id, e.kind) for e in events}
    assert errors == {("a", Kind.STREAM_ERROR), ("b", Kind.STREAM_ERROR)}
    assert all("do not match" in e.detail for e in events)


async def test_a_block_frame_going_backwards_fails_only_its_stream(vad_address: str) -> None:
    frame = b"\x00\x00" * 960
    block = _block([("fine", 1, frame), ("back", 2, frame), ("fine", 2, frame), ("back", 1, frame)])
    events = await _exchange(
        vad_address,
        [
            vad_pb2.VadRequest(
                opens=[vad_pb2.StreamOpen(stream_id="fine"), vad_pb2.StreamOpen(stream_id="back")],
                block=block,
                closes=[vad_pb2.StreamClose(stream_id="fine", flush=True)],
            )
        ],
    )
    assert [(e.stream_id, e.kind) for e in events] == [
        ("back", Kind.STREAM_ERROR),
        ("fine", Kind.STREAM_CLOSED),
    ]
    assert "seq 1 after 2" in events[0].detail


async def test_a_block_frame_for_a_stream_never_opened_is_reported_once(
    vad_address: str,
) -> None:
    frame = b"\x00\x00" * 960
    block = _block([("ghost", 1, frame), ("ghost", 2, frame)])
    events = await _exchange(vad_address, [vad_pb2.VadRequest(block=block)])
    assert [(e.stream_id, e.kind, e.detail) for e in events] == [
        ("ghost", Kind.STREAM_ERROR, "stream is not open")
    ]
