"""Memory that follows the audio, not the limits: cheap, in-process guards.

- gateway: a listening session holds about its VAD look-back (plus what its
  replica has not acknowledged), however long it listens, yet never loses a
  speech start its replica may still report; the session buffer is a ring
  whose slices match a plain model;
- VAD: a tick over many streams that catch up at once reaches the engine in
  groups bounded by ``chunk_audio_s``; a batch is acknowledged only once its
  audio is stepped; the FSMN engine gives slots back when streams close,
  without disturbing the streams that stay;
- the heap trimmer trims only after enough was freed, and not too often.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from support.trimming import RecordedTrims

from services.common.audio import SAMPLE_RATE, float_to_pcm16
from services.common.inference import InferenceThread
from services.common.memory import HeapTrimmer
from services.gateway.audio_buffer import UtteranceBuffer
from services.gateway.config import GatewaySettings
from services.gateway.session import DeviceSession
from services.gateway.utterances import PRE_ROLL
from services.gateway.vad_client import VadStreamClient
from services.gateway.vad_router import VadRouter
from services.probes import free_port
from services.protos import vad_pb2
from services.vad.engine import VadEvent
from services.vad.streams import Outbox, StreamTable

FRAME_SAMPLES = SAMPLE_RATE * 60 // 1000
QUIET = float_to_pcm16(np.full(FRAME_SAMPLES, 0.001, dtype=np.float32))
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fsmn-vad"


# -- gateway: a listening session -------------------------------------------


class Directory:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def bind_stream(self, stream_id: str, handler: Any) -> None:
        self.handlers[stream_id] = handler

    def unbind_stream(self, stream_id: str) -> None:
        self.handlers.pop(stream_id, None)


class Store:
    async def save_session(self, session_id: str, device_id: str, fields: dict[str, Any]) -> None:
        return None


def listening_session() -> tuple[DeviceSession, VadStreamClient]:
    router = VadRouter("127.0.0.1:1", lambda e: None, lambda c: None)
    [client] = router.clients.values()
    client.connected.set()
    ctx = SimpleNamespace(
        settings=GatewaySettings(), vad=router, hub=Directory(), store=Store(), recognizer=None
    )
    session = DeviceSession(
        cast(Any, ctx), cast(Any, None), session_id="s", device_id="d", client_id="c"
    )
    return session, client


def network(client: VadStreamClient, acknowledge_all_but: int = 0) -> None:
    """The sender takes everything queued; the replica acknowledges all of it
    but the newest ``acknowledge_all_but`` operations."""
    client._queue.ops.clear()
    client.ops_done = max(client.ops_done, client.ops_queued - acknowledge_all_but)


async def test_a_quiet_listening_session_holds_about_its_look_back_however_long_it_listens() -> (
    None
):
    session, client = listening_session()
    await session.handle_message({"type": "listen", "state": "start", "mode": "auto"})
    buffer = session._cutter.buffer
    for _ in range(1000):  # 60 s
        session.handle_audio(QUIET)
        network(client)
    held = buffer.end - buffer.start
    assert held <= PRE_ROLL + FRAME_SAMPLES
    # ~1 s of look-back plus a frame, in 125 ms steps: under 40 kB of storage.
    assert buffer.capacity * 2 <= 40_000, buffer.capacity


async def test_a_lagging_replica_keeps_what_it_may_still_report() -> None:
    session, client = listening_session()
    await session.handle_message({"type": "listen", "state": "start", "mode": "auto"})
    buffer = session._cutter.buffer
    for _ in range(100):
        session.handle_audio(QUIET)
        network(client)
    # The replica stops acknowledging (stalled, or a backlog to catch up
    # with): nothing it has not been through may go, however much comes.
    acknowledged_to = buffer.end
    for _ in range(100):  # 6 s
        session.handle_audio(QUIET)
        network(client, acknowledge_all_but=10**6)
    assert buffer.start <= acknowledged_to - PRE_ROLL
    # It catches up: a start it reports now lies at most PRE_ROLL behind what
    # it has been through, and is still there to cut.
    network(client)
    session.handle_audio(QUIET)
    start = buffer.end - PRE_ROLL + FRAME_SAMPLES
    assert buffer.start <= start
    assert buffer.end - buffer.start <= PRE_ROLL + 2 * FRAME_SAMPLES


async def test_a_replay_after_a_loss_reaches_back_from_what_the_lost_replica_acknowledged() -> None:
    session, client = listening_session()
    await session.handle_message({"type": "listen", "state": "start", "mode": "auto"})
    for _ in range(50):
        session.handle_audio(QUIET)
        network(client)
    acknowledged_to = session._cutter.end
    for _ in range(30):  # 1.8 s the replica never got through
        session.handle_audio(QUIET)
        network(client, acknowledge_all_but=10**6)
    current = session.vad._current
    assert current is not None
    client.connected.clear()
    session.vad.on_lost(client)
    want = session.vad._want
    assert want is not None
    assert want.replay_from == acknowledged_to - PRE_ROLL
    assert session._cutter.buffer.start <= want.replay_from


def test_the_ring_buffer_matches_a_plain_model() -> None:
    rng = np.random.default_rng(7)
    limit = 5 * SAMPLE_RATE
    buffer = UtteranceBuffer(limit)
    model = np.zeros(0, dtype=np.int16)
    base = 0
    for _ in range(2000):
        action = rng.integers(10)
        if action < 6:
            n = int(rng.choice([1, 160, FRAME_SAMPLES, 1920, 7000, 90_000]))
            chunk = rng.integers(-(2**15), 2**15, n).astype(np.int16)
            buffer.append(chunk.tobytes())
            model = np.concatenate([model, chunk])
            if model.size > limit:
                base += model.size - limit
                model = model[-limit:]
        elif action < 9:
            cut = base + int(rng.integers(0, model.size + 1))
            buffer.discard_before(cut)
            model, base = model[cut - base :], cut
        end = base + model.size
        assert (buffer.start, buffer.end) == (base, end)
        lo = int(rng.integers(base - 100, end + 1))
        hi = int(rng.integers(lo, end + 200))
        first, last = max(lo, base) - base, min(hi, end) - base
        want = model[first:last].tobytes() if last > first else b""
        assert buffer.slice(lo, hi) == want
        assert buffer.capacity <= limit


# -- VAD: ticks in bounded groups ---------------------------------------------


class SizeRecordingEngine:
    """A fake engine at the table's edge: records the audio of every step call."""

    name = "sizes"

    def __init__(self) -> None:
        self.steps: list[dict[str, int]] = []
        self.finals: list[list[str]] = []

    def open(self, stream_id: str, silence_ms: int) -> None:
        pass

    def close(self, stream_id: str) -> None:
        pass

    def step(self, chunks: Mapping[str, np.ndarray], final: Collection[str]) -> list[VadEvent]:
        assert all(c.dtype == np.float32 for c in chunks.values())
        self.steps.append({sid: c.size for sid, c in chunks.items()})
        self.finals.append(list(final))
        return [VadEvent(sid, "start", 0) for sid in chunks]


@pytest.fixture
def inference() -> Iterator[InferenceThread]:
    thread = InferenceThread("memory-test")
    yield thread
    thread.shutdown()


def frame(stream_id: str, seq: int, samples: int = FRAME_SAMPLES) -> vad_pb2.AudioFrame:
    return vad_pb2.AudioFrame(stream_id=stream_id, seq=seq, pcm=b"\x01\x00" * samples)


def drain(outbox: Outbox) -> tuple[list[vad_pb2.SpeechEvent], list[int]]:
    events, acks = [], []
    while not outbox.empty():
        item = outbox.get_nowait()
        if isinstance(item, int):
            acks.append(item)
        else:
            events.append(item)
    return events, acks


def chunked_table(
    inference: InferenceThread, streams: int, frames: int
) -> tuple[SizeRecordingEngine, StreamTable, Outbox]:
    """``streams`` streams, each fed ``frames`` frames, on a table whose ticks
    step at most 2 s per stream, in engine calls of at most 8 s of audio."""
    engine = SizeRecordingEngine()
    table = StreamTable(
        engine,
        inference,
        default_silence_ms=500,
        tick_ms=60,
        max_streams=1000,
        max_backlog_s=10.0,
        max_step_s=2.0,
        chunk_audio_s=8.0,
    )
    outbox: Outbox = asyncio.Queue()
    for i in range(streams):
        table.open(1, outbox, vad_pb2.StreamOpen(stream_id=f"s{i}"))
        for seq in range(1, frames + 1):
            table.feed(1, outbox, frame(f"s{i}", seq))
    return engine, table, outbox


async def test_a_catch_up_tick_over_many_streams_reaches_the_engine_in_bounded_groups(
    inference: InferenceThread,
) -> None:
    n = 300
    # 2.4 s behind each: 2 s is stepped this tick, the rest next tick.
    engine, table, outbox = chunked_table(inference, n, frames=40)
    table.note_batch(1, outbox, 7)
    await table.tick()

    chunk, step = 8 * SAMPLE_RATE, 2 * SAMPLE_RATE
    assert len(engine.steps) == n * step // chunk
    assert all(sum(sizes.values()) <= chunk for sizes in engine.steps)
    stepped = [sid for sizes in engine.steps for sid in sizes]
    assert stepped == [f"1/s{i}" for i in range(n)], "every stream once, in order"
    assert {size for sizes in engine.steps for size in sizes.values()} == {step}
    events, acks = drain(outbox)
    assert len(events) == n
    assert acks == [], "audio read before the tick is not all stepped yet"

    await table.tick()
    assert all(size == 40 * FRAME_SAMPLES - step for size in engine.steps[-1].values())
    _, acks = drain(outbox)
    assert acks == [7]


async def test_a_live_tick_over_more_than_a_chunk_is_split_evenly(
    inference: InferenceThread,
) -> None:
    """Groups as even as the streams allow: a remainder of a few streams would
    pay a whole engine call's fixed cost for them."""
    n = 300
    engine, table, _ = chunked_table(inference, n, frames=1)
    await table.tick()

    # 18 s of audio over 8 s chunks: three calls of 100 streams, not 133, 133 and 34.
    assert [len(sizes) for sizes in engine.steps] == [100, 100, 100]
    assert [sid for sizes in engine.steps for sid in sizes] == [f"1/s{i}" for i in range(n)]


# -- VAD: the FSMN engine gives slots back ------------------------------------


@pytest.mark.skipif(not (MODEL_DIR / "model.pt").exists(), reason="no FSMN-VAD")
def test_the_fsmn_engine_shrinks_when_streams_close_and_the_rest_keep_their_state() -> None:
    from services.simulator.speech import silence, synthesize
    from services.vad.fsmn_batched import BatchedFsmnVadEngine

    speech = synthesize("turn on the kitchen lights")
    audio = np.concatenate([silence(0.5), speech, silence(0.8), speech, silence(1.0)])
    chunk = FRAME_SAMPLES
    half = (audio.size // 2) // chunk * chunk

    def run(engine: BatchedFsmnVadEngine, others: int) -> list[tuple[str, int]]:
        """One talker among ``others`` quiet streams that all close half way."""
        engine.open("talker", 500)
        for i in range(others):
            engine.open(f"quiet{i}", 500)
        got: list[VadEvent] = []
        for at in range(0, audio.size, chunk):
            if at == half:
                for i in range(others):
                    engine.close(f"quiet{i}")
            steps = {"talker": audio[at : at + chunk]}
            if at < half:
                steps |= {f"quiet{i}": np.zeros(chunk, np.float32) for i in range(others)}
            got += engine.step(steps, ["talker"] if at + chunk >= audio.size else [])
        engine.close("talker")
        return [(e.kind, e.offset_ms) for e in got if e.stream_id == "talker"]

    engine = BatchedFsmnVadEngine(MODEL_DIR)
    alone = run(engine, 0)
    assert len(alone) >= 4
    crowded = BatchedFsmnVadEngine(MODEL_DIR)
    # The talker sits after 200 others' slots; 200 closes move it down.
    assert run(crowded, 200) == alone
    assert crowded.capacity == 16
    crowded.open("again", 500)
    assert crowded.capacity == 16


# -- heap trimmer -------------------------------------------------------------


async def test_the_heap_trimmer_trims_only_after_enough_was_freed_and_not_too_often() -> None:
    trims = RecordedTrims(min_interval_s=10.0, min_released_bytes=1000)
    trimmer = trims.trimmer
    trimmer.released(999)
    assert not trimmer.maybe_trim()
    trimmer.released(1)
    assert trimmer.maybe_trim()
    trimmer.released(5000)
    trims.now += 5
    assert not trimmer.maybe_trim(), "too soon after the last"
    trims.now += 5
    assert trimmer.maybe_trim()
    assert trims.at == [100.0, 110.0]

    # Scheduled on the loop: a burst of frees leads to one trim, soon after.
    later = HeapTrimmer(min_interval_s=0.0, min_released_bytes=10, delay_s=0.01, trim=lambda: True)
    for _ in range(100):
        later.released(1)
        later.trim_soon()
    await asyncio.sleep(0.1)
    assert later.trims == 1


# -- gateway: how far behind a replica is -------------------------------------


async def test_the_vad_client_counts_the_operations_its_replica_is_through_with() -> None:
    client = VadStreamClient("127.0.0.1:1", lambda e: None, lambda c: None)
    client.open("a")
    client.send("a", 1, QUIET)
    client.send("a", 2, QUIET)
    requests = client._requests(client._queue)
    first = await anext(requests)
    client.send("a", 3, QUIET)
    second = await anext(requests)
    assert (client.ops_queued, client.ops_done) == (4, 0)
    client._acknowledge(first.batch)
    assert client.ops_done == 3
    client._acknowledge(second.batch)
    assert client.ops_done == 4


async def test_operations_of_a_lost_connection_count_as_done_only_after_the_owners_moved() -> None:
    seen: list[tuple[int, int]] = []

    def on_lost(client: VadStreamClient) -> None:
        seen.append((client.ops_queued, client.ops_done))

    client = VadStreamClient(
        f"127.0.0.1:{free_port()}", lambda e: None, on_lost, connect_timeout_s=0.3
    )
    client.open("a")
    client.send("a", 1, QUIET)
    client.start()
    try:
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)
    finally:
        await client.stop()
    # The owners measured their replay against what the replica had been
    # through (nothing); after that, those operations are moot.
    assert seen[0] == (2, 0)
    assert client.ops_done == 2
