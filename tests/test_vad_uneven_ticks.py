"""Live ticks bring streams unequal audio: the batched FSMN-VAD hears the same speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from support.recordings import mandarin

from services.vad.fsmn_batched import BatchedFsmnVadEngine

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fsmn-vad"
PACKET = 960  # one 60 ms device packet
STREAMS = 16


def _material() -> np.ndarray:
    pause = np.zeros(16_000, dtype=np.float32)
    audio = np.concatenate([pause, mandarin(), pause, mandarin(), pause, pause])
    return np.concatenate([audio, np.zeros((-audio.size) % PACKET, dtype=np.float32)])


def _events(packets_per_tick: list[np.ndarray]) -> dict[str, list[tuple[str, int]]]:
    """Step every stream through the material, ``packets_per_tick[i][t]`` packets
    of stream i at tick t (all of it in the end), and collect its events."""
    audio = _material()
    engine = BatchedFsmnVadEngine(MODEL_DIR)
    ids = [f"s{i}" for i in range(STREAMS)]
    for sid in ids:
        engine.open(sid, 500)
    at = dict.fromkeys(ids, 0)
    heard: dict[str, list[tuple[str, int]]] = {sid: [] for sid in ids}
    ticks = len(packets_per_tick[0])
    for t in range(ticks):
        chunks = {}
        for i, sid in enumerate(ids):
            take = int(packets_per_tick[i][t]) * PACKET if t < ticks - 1 else audio.size
            piece = audio[at[sid] : at[sid] + take]
            at[sid] += piece.size
            if piece.size:
                chunks[sid] = piece
        for event in engine.step(chunks, ids if t == ticks - 1 else []):
            heard[event.stream_id].append((event.kind, event.offset_ms))
    return heard


def test_streams_a_packet_ahead_or_behind_hear_what_they_hear_in_step() -> None:
    ticks = _material().size // PACKET + 1
    even = [np.ones(ticks, dtype=np.int64) for _ in range(STREAMS)]
    rng = np.random.default_rng(11)
    # One stream in four is off by a packet in any tick, as live ticks are.
    uneven = [rng.choice([0, 1, 2], size=ticks, p=[0.125, 0.75, 0.125]) for _ in range(STREAMS)]
    expected = _events(even)
    assert all(events == expected["s0"] for events in expected.values())
    assert any(kind == "start" for kind, _ in expected["s0"])
    assert _events(uneven) == expected
