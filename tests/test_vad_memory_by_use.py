"""The VAD's memory follows the streams it serves, and goes back when they leave."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.recordings import mandarin
from support.trimming import RecordedTrims

from services.common.inference import InferenceThread
from services.common.memory import HeapTrimmer
from services.protos import vad_pb2
from services.vad import fsmn_encoder, streams
from services.vad.fsmn_batched import BatchedFsmnVadEngine
from services.vad.fsmn_endpoint import SLOT_STATE
from services.vad.streams import Outbox, StreamTable

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fsmn-vad"

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.pt").exists(), reason="no FSMN-VAD")


@pytest.fixture(scope="module")
def engine() -> BatchedFsmnVadEngine:
    return BatchedFsmnVadEngine(MODEL_DIR)


def test_stream_slots_follow_the_live_streams_both_ways(
    engine: BatchedFsmnVadEngine,
) -> None:
    ids = [f"s{i}" for i in range(300)]
    for stream_id in ids:
        engine.open(stream_id, 500)
    # Grown a quarter at a time, not doubled (512 slots for 300 streams).
    assert 300 <= engine.capacity <= 300 * 5 // 4 + 16 * 5
    for stream_id in ids[100:]:
        engine.close(stream_id)
    assert 100 <= engine.capacity <= 2 * 100
    for stream_id in ids[:100]:
        engine.close(stream_id)
    assert engine.capacity == 16


def test_live_streams_keep_the_lowest_slots_whatever_closes() -> None:
    engine = BatchedFsmnVadEngine(MODEL_DIR)
    ids = [f"s{i}" for i in range(60)]
    for stream_id in ids:
        engine.open(stream_id, 500)
    rng = np.random.default_rng(7)
    live = set(ids)
    for stream_id in rng.permutation(ids)[:25]:
        engine.close(str(stream_id))
        live.discard(str(stream_id))
        assert sorted(engine._streams[s].slot for s in live) == list(range(len(live)))
    engine.open("new", 500)
    assert engine._streams["new"].slot == len(live)


def test_streams_coming_and_going_at_the_shrink_point_copy_nothing_wholesale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half the slots live, but a smaller size would round back up to this one."""
    engine = BatchedFsmnVadEngine(MODEL_DIR)
    compactions: list[int] = []
    compact = engine._encoder.compact

    def counting(live: int, capacity: int) -> None:
        compactions.append(capacity)
        compact(live, capacity)

    monkeypatch.setattr(engine._encoder, "compact", counting)
    for i in range(17):
        engine.open(f"s{i}", 500)
    assert engine.capacity == 32
    for i in range(10):
        engine.close(f"s{i}")
        engine.open(f"s{i}", 500)
    assert compactions == [] and engine.capacity == 32


def test_a_stream_moved_to_a_freed_slot_keeps_its_state() -> None:
    """Closing a stream moves the one in the last slot, mid-speech here: its
    FSMN memories and endpoint state arrive in the freed slot unchanged."""
    engine = BatchedFsmnVadEngine(MODEL_DIR)
    for stream_id in ("first", "moved"):
        engine.open(stream_id, 500)
    speech = np.concatenate([np.zeros(8000, np.float32), mandarin()])
    chunk = 960
    for at in range(0, 60 * chunk, chunk):
        # Different audio, so the two slots hold different state.
        engine.step({"first": speech[::-1][at : at + chunk], "moved": speech[at : at + chunk]}, [])
    moved = engine._streams["moved"]
    assert moved.slot == 1 and engine._detector.in_segment(1)
    memories = engine._encoder._cache[:, 1].clone()
    detector = [getattr(engine._detector, name)[1].copy() for name in SLOT_STATE]
    assert not torch.equal(engine._encoder._cache[:, 0], memories)

    engine.close("first")

    assert moved.slot == 0 and engine._detector.in_segment(0)
    assert torch.equal(engine._encoder._cache[:, 0], memories)
    for name, before in zip(SLOT_STATE, detector, strict=True):
        assert np.array_equal(getattr(engine._detector, name)[0], before), name


def test_the_memory_convolution_sees_a_few_batch_shapes_not_one_per_batch_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """oneDNN keeps a compiled kernel per input shape; live ticks bring every
    batch size, and each would be kept for good."""
    shapes: set[tuple[int, ...]] = set()
    conv2d = fsmn_encoder.F.conv2d

    def recording(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.add(tuple(x.shape))
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(fsmn_encoder.F, "conv2d", recording)
    encoder = BatchedFsmnVadEngine(MODEL_DIR)._encoder
    encoder.ensure_capacity(256)
    rng = np.random.default_rng(0)
    for n in range(1, 257, 3):
        counts = np.full(n, 6)
        feats = rng.standard_normal((6 * n, encoder.input_dim)).astype(np.float32)
        slots = np.arange(n)
        for slot in slots:
            encoder.reset(int(slot))
        padded = encoder.silence_posterior(slots, feats, counts)
        if n % 30 == 1:
            # The padding never reaches a real stream's posteriors.
            seen = set(shapes)
            with monkeypatch.context() as exact:
                exact.setattr(fsmn_encoder, "_CONV_ROWS", 1)
                exact.setattr(fsmn_encoder, "_conv_frames", lambda frames: frames)
                for slot in slots:
                    encoder.reset(int(slot))
                assert np.array_equal(encoder.silence_posterior(slots, feats, counts), padded)
            shapes.intersection_update(seen)
    assert len(shapes) <= 8, sorted(shapes)


def test_the_products_see_a_few_row_counts_not_one_per_batch_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """oneDNN, which runs the bfloat16 products, also keeps a kernel per shape
    (~0.6 MB each): every batch size the live ticks bring would be one."""
    rows: set[int] = set()
    functions = {name: getattr(fsmn_encoder.torch, name) for name in ("mm", "addmm")}
    linear = fsmn_encoder.F.linear

    def recording_linear(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows.add(x.shape[0])
        return linear(x, *args, **kwargs)

    def recording(name: str, position: int) -> Any:
        def call(*args: Any, **kwargs: Any) -> torch.Tensor:
            rows.add(args[position].shape[0])
            return functions[name](*args, **kwargs)

        return call

    monkeypatch.setattr(fsmn_encoder.F, "linear", recording_linear)
    monkeypatch.setattr(fsmn_encoder.torch, "mm", recording("mm", 0))
    monkeypatch.setattr(fsmn_encoder.torch, "addmm", recording("addmm", 1))
    encoder = BatchedFsmnVadEngine(MODEL_DIR, precision="bf16")._encoder
    encoder.ensure_capacity(256)
    rng = np.random.default_rng(0)
    for n in range(1, 257, 5):
        # Uneven ticks: most streams 6 frames, some 12, in any order.
        counts = rng.choice([6, 12], size=n, p=[0.9, 0.1])
        feats = rng.standard_normal((int(counts.sum()), encoder.input_dim)).astype(np.float32)
        slots = rng.permutation(256)[:n]
        for slot in slots:
            encoder.reset(int(slot))
        blocked = encoder.silence_posterior(slots, feats, counts)
        if n % 50 == 1:
            # The blocks and their padding never change a real row's output.
            with monkeypatch.context() as exact:
                exact.setattr(fsmn_encoder, "_BLOCK_ROWS", 1 << 20)
                exact.setattr(fsmn_encoder, "_MIN_BLOCK_ROWS", 1)
                exact.setattr(fsmn_encoder, "_row_blocks", lambda total: [(0, total)])
                seen = set(rows)
                for slot in slots:
                    encoder.reset(int(slot))
                assert np.array_equal(encoder.silence_posterior(slots, feats, counts), blocked)
                rows.intersection_update(seen)
    assert rows <= {16, 32, 64, 128, 256, 512}, sorted(rows)


def _table(
    engine: BatchedFsmnVadEngine, inference: InferenceThread, trimmer: HeapTrimmer | None = None
) -> StreamTable:
    return StreamTable(
        engine,
        inference,
        default_silence_ms=500,
        tick_ms=60,
        max_streams=8,
        max_backlog_s=10.0,
        trimmer=trimmer,
    )


async def test_the_last_stream_leaving_gives_the_heap_back(
    engine: BatchedFsmnVadEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[int] = []

    def trim() -> bool:
        trims.append(1)
        return True

    monkeypatch.setattr(streams, "malloc_trim", trim)
    inference = InferenceThread("vad-memory-test")
    try:
        table = _table(engine, inference)
        outbox: Outbox = asyncio.Queue()
        for name in ("a", "b"):
            table.open(1, outbox, vad_pb2.StreamOpen(stream_id=name))
            table.feed(1, outbox, vad_pb2.AudioFrame(stream_id=name, seq=1, pcm=b"\0\0" * 960))
        await table.tick()
        table.close(1, vad_pb2.StreamClose(stream_id="a", flush=False))
        await table.tick()
        await table.tick()
        assert trims == [], "one stream is still there"
        table.close(1, vad_pb2.StreamClose(stream_id="b", flush=False))
        await table.tick()  # applies the close
        await table.tick()  # quiet: the heap goes back
        await table.tick()
        assert trims == [1]
    finally:
        inference.shutdown()


async def test_a_quiet_tick_gives_back_what_busy_ticks_freed_without_waiting_their_interval(
    engine: BatchedFsmnVadEngine,
) -> None:
    trims = RecordedTrims(min_interval_s=10.0, min_released_bytes=1)
    inference = InferenceThread("vad-quiet-trim-test")
    try:
        table = _table(engine, inference, trims.trimmer)
        outbox: Outbox = asyncio.Queue()
        table.open(1, outbox, vad_pb2.StreamOpen(stream_id="a"))
        for seq in (1, 2):
            table.feed(1, outbox, vad_pb2.AudioFrame(stream_id="a", seq=seq, pcm=b"\0\0" * 960))
            await table.tick()
            trims.now += streams.QUIET_TRIM_INTERVAL_S
        assert trims.at == [100.0], "a busy tick trims at most every min_interval_s"
        await table.tick()  # no audio, the stream still open: the replica is quiet
        assert trims.at == [100.0, 100.0 + 2 * streams.QUIET_TRIM_INTERVAL_S]
    finally:
        inference.shutdown()
