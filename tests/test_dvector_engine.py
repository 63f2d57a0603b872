"""Resemblyzer d-vector engine on real weights, with espeak-ng voices as speakers."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from services.simulator.speech import synthesize
from services.speaker.dvector import RECOMMENDED_THRESHOLD, DVectorEngine

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "resemblyzer" / "pretrained.pt"
VOICES = ("en", "en+f3", "en+m7", "en-us+f5")
# About 5 s each: shorter clips (2-3 s) give same-voice pairs as low as 0.85.
SENTENCES = (
    "the quick brown fox jumps over the lazy dog while the farmer watches from the old fence",
    "please turn on the lights in the living room and set the heating to twenty one degrees",
    "what is the weather going to be like tomorrow morning when I drive to the airport",
)

pytestmark = pytest.mark.skipif(not WEIGHTS.exists(), reason="pretrained.pt not unpacked")

Key = tuple[str, int]


@pytest.fixture(scope="module")
def engine() -> DVectorEngine:
    return DVectorEngine(WEIGHTS, device="cpu")


@pytest.fixture(scope="module")
def clips() -> dict[Key, np.ndarray]:
    return {(v, i): synthesize(s, v) for v in VOICES for i, s in enumerate(SENTENCES)}


@pytest.fixture(scope="module")
def embeddings(engine: DVectorEngine, clips: dict[Key, np.ndarray]) -> dict[Key, np.ndarray]:
    keys = list(clips)
    rows = engine.embed([clips[k] for k in keys])
    return dict(zip(keys, rows, strict=True))


def pair_similarities(embeddings: dict[Key, np.ndarray]) -> dict[str, list[float]]:
    """Cosine similarity of every pair, grouped by what the pair shares."""
    groups: dict[str, list[float]] = {"same_voice": [], "other_voice": [], "same_text": []}
    for (a, ea), (b, eb) in itertools.combinations(embeddings.items(), 2):
        sim = float(ea @ eb)
        if a[0] == b[0]:
            groups["same_voice"].append(sim)
        elif a[1] == b[1]:
            groups["same_text"].append(sim)
        else:
            groups["other_voice"].append(sim)
    for name, sims in groups.items():
        print(f"{name}: min {min(sims):.3f} max {max(sims):.3f} n={len(sims)}")
    return groups


def test_embeddings_are_n_by_256_and_unit_norm(
    engine: DVectorEngine, clips: dict[Key, np.ndarray]
) -> None:
    batch = list(clips.values())[:5]
    out = engine.embed(batch)
    assert out.shape == (5, 256)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_same_voice_other_sentence_is_closer_than_other_voice_same_sentence(
    embeddings: dict[Key, np.ndarray],
) -> None:
    groups = pair_similarities(embeddings)
    assert min(groups["same_voice"]) > max(groups["same_text"])


def test_recommended_threshold_separates_same_and_different_voices(
    embeddings: dict[Key, np.ndarray],
) -> None:
    # Verification compares an enrolment utterance with a different one, so
    # both groups here are pairs of different sentences.
    groups = pair_similarities(embeddings)
    assert min(groups["same_voice"]) > RECOMMENDED_THRESHOLD > max(groups["other_voice"])


def test_batch_gives_the_same_embeddings_as_one_at_a_time(
    engine: DVectorEngine, clips: dict[Key, np.ndarray]
) -> None:
    wavs = [clips[("en", 0)], clips[("en+f3", 1)][: 16000 * 2], clips[("en+m7", 2)]]
    batched = engine.embed(wavs)
    single = np.stack([engine.embed([w])[0] for w in wavs])
    np.testing.assert_allclose(batched, single, atol=1e-4)
