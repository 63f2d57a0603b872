"""The batched FSMN-VAD engine finds the boundaries funasr's own streaming generate() finds.

Clips are built deterministically from espeak-ng speech (several voices,
English and Mandarin), silences of varied length, Gaussian noise at a few
levels, and some cut mid-utterance. The reference feeds each clip alone
through funasr in 60 ms chunks; the engine steps all clips together (one
batch per step), with slots fragmented so the general gather/scatter path
runs and the encoder splits the batch, at several chunk sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.fsmn_reference import CHUNK, SILENCE_MS, Events, funasr_events, load_funasr_fsmn
from support.vad_clips import build_clips, step_together

from services.common.audio import SAMPLE_RATE
from services.simulator.speech import silence
from services.vad.fsmn_batched import BatchedFsmnVadEngine

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fsmn-vad"
TOLERANCE_MS = 30

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.pt").exists(), reason="no FSMN-VAD")


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return build_clips()


@pytest.fixture(scope="module")
def reference(clips: dict[str, np.ndarray]) -> dict[str, Events]:
    model = load_funasr_fsmn()
    return {name: funasr_events(model, audio) for name, audio in clips.items()}


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def engine(request: pytest.FixtureRequest) -> Iterator[BatchedFsmnVadEngine]:
    # Small encoder sub-batches, so the 54 clips also cross a sub-batch
    # boundary; both encoder precisions are held to funasr.
    yield BatchedFsmnVadEngine(MODEL_DIR, max_encoder_batch=32, precision=request.param)


def assert_matches(got: dict[str, Events], want: dict[str, Events], label: str) -> int:
    worst = 0
    for name, expected in want.items():
        actual = got[name]
        assert [k for k, _ in actual] == [k for k, _ in expected], (label, name, actual, expected)
        for (_, got_ms), (_, want_ms) in zip(actual, expected, strict=True):
            worst = max(worst, abs(got_ms - want_ms))
    assert worst <= TOLERANCE_MS, (label, worst)
    return worst


def test_clips_are_useful_cases(clips: dict[str, np.ndarray], reference: dict[str, Events]) -> None:
    assert len(clips) >= 50
    assert sum(1 for events in reference.values() if events) >= 0.9 * len(clips)
    assert sum(len(events) for events in reference.values()) >= 150
    # Some clips must end while funasr is still inside speech.
    assert any(
        events and events[-1][1] * SAMPLE_RATE // 1000 > clips[name].size - 0.2 * SAMPLE_RATE
        for name, events in reference.items()
    )


@pytest.mark.parametrize("chunk_ms", [60, 200, 77])
def test_batched_steps_match_funasr_streaming(
    engine: BatchedFsmnVadEngine,
    clips: dict[str, np.ndarray],
    reference: dict[str, Events],
    chunk_ms: int,
) -> None:
    got = step_together(engine, clips, SAMPLE_RATE * chunk_ms // 1000)
    worst = assert_matches(got, reference, f"{chunk_ms} ms steps")
    compared = sum(len(events) for events in reference.values())
    print(f"\n{chunk_ms} ms steps: {len(clips)} clips, {compared} boundaries, max diff {worst} ms")


def test_streams_in_one_batch_are_isolated(
    engine: BatchedFsmnVadEngine, clips: dict[str, np.ndarray], reference: dict[str, Events]
) -> None:
    talker = next(name for name, events in reference.items() if len(events) >= 4)
    audio = clips[talker]
    rng = np.random.default_rng(5)
    together = {
        talker: audio,
        "quiet": silence(audio.size / SAMPLE_RATE),
        "hiss": rng.normal(0.0, 0.002, audio.size).astype(np.float32),
    }
    got = step_together(engine, together, CHUNK)
    assert got["quiet"] == []
    assert got["hiss"] == []
    assert got[talker] == step_together(engine, {talker: audio}, CHUNK)[talker]
    assert_matches({talker: got[talker]}, {talker: reference[talker]}, "isolation")


def test_final_without_new_audio_flushes_and_offsets_keep_counting(
    engine: BatchedFsmnVadEngine, clips: dict[str, np.ndarray], reference: dict[str, Events]
) -> None:
    name = next(name for name, events in reference.items() if len(events) >= 2)
    audio = clips[name]
    engine.open("flush", SILENCE_MS)
    events = engine.step({"flush": audio}, [])
    events += engine.step({}, ["flush"])
    first: Events = [(e.kind, e.offset_ms) for e in events]
    assert_matches({name: first}, {name: reference[name]}, "flush without audio")
    # After a flush the stream starts over; offsets go on from its origin.
    again = engine.step({"flush": audio}, ["flush"])
    engine.close("flush")
    shift = audio.size * 1000 // SAMPLE_RATE
    assert [(e.kind, e.offset_ms - shift) for e in again] == first
