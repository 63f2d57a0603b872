"""FSMN-VAD features: the whole-batch path of a regular tick gives the general path's rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from support.recordings import mandarin

from services.vad.fsmn_features import FeatureState, OnlineLfrFrontend, _in_step

CMVN = Path(__file__).resolve().parents[1] / "models" / "fsmn-vad" / "am.mvn"
TICK = 960  # 60 ms
STREAMS = 12


def _ticks(count: int) -> list[list[np.ndarray]]:
    """Each stream hears the recording from its own offset, one tick at a time."""
    audio = mandarin()
    looped = np.concatenate([audio, audio])
    offsets = np.linspace(0, audio.size, STREAMS, endpoint=False).astype(np.int64)
    return [
        [looped[(o + t * TICK) % audio.size :][:TICK].copy() for o in offsets] for t in range(count)
    ]


def _run(ticks: list[list[np.ndarray]], final_at: int) -> list[tuple[np.ndarray, np.ndarray]]:
    frontend = OnlineLfrFrontend(CMVN)
    states = [FeatureState() for _ in range(STREAMS)]
    out = []
    for t, chunks in enumerate(ticks):
        # The last stream ends at ``final_at``: that tick takes the general path.
        final = [t == final_at and i == STREAMS - 1 for i in range(STREAMS)]
        # Past the first tick every tick is a regular one, but the ending one
        # and the next (the ended stream starts over).
        regular = t > 0 and (final_at < 0 or t not in (final_at, final_at + 1))
        assert _in_step(states, chunks, final) == regular
        out.append(frontend.extract(states, chunks, final))
    return out


def test_a_regular_tick_gives_the_same_rows_as_the_general_path() -> None:
    ticks = _ticks(20)
    regular = _run(ticks, final_at=-1)
    general = _run(ticks, final_at=10)
    for t in range(10):
        assert np.array_equal(regular[t][0], general[t][0]), f"tick {t}"
    rows_regular, counts_regular = regular[10]
    rows_general, counts_general = general[10]
    # Every stream but the ending one: identical rows, bit for bit.
    assert np.array_equal(counts_regular[:-1], counts_general[:-1])
    kept = int(counts_regular[:-1].sum())
    assert np.array_equal(rows_regular[:kept], rows_general[:kept])


def test_streams_keep_their_own_carried_audio_between_regular_ticks() -> None:
    ticks = _ticks(6)
    frontend = OnlineLfrFrontend(CMVN)
    states = [FeatureState() for _ in range(STREAMS)]
    for chunks in ticks:
        frontend.extract(states, chunks, [False] * STREAMS)
    for i, state in enumerate(states):
        held = state.pending.size
        assert np.array_equal(state.pending, ticks[-1][i][TICK - held :])
