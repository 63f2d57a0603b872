"""Whisper tiny.en engine on real weights: accuracy on espeak-ng speech, one generate per batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.wer import word_error_rate

from services.asr.engine import AsrRequest
from services.asr.whisper import WhisperEngine, repeats_itself, segments_within
from services.common import metrics
from services.simulator.speech import silence, synthesize, trim_silence

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "whisper-tiny.en"
SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "please turn on the lights in the living room",
    "what is the weather going to be like tomorrow morning",
    "remind me to call my mother this evening",
    "play some music in the kitchen",
)

pytestmark = pytest.mark.skipif(not MODEL_DIR.exists(), reason="whisper-tiny.en not unpacked")


class CountingGenerate:
    """Passes everything through to the CTranslate2 model, counting ``generate`` calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.windows: list[int] = []

    def generate(self, features: Any, prompts: list[list[int]], **kwargs: Any) -> Any:
        self.calls += 1
        self.batch_sizes.append(len(prompts))
        self.windows.append(features.shape[-1])
        return self.inner.generate(features, prompts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def engine() -> WhisperEngine:
    return WhisperEngine(MODEL_DIR, device="cpu")


@pytest.fixture
def counter(engine: WhisperEngine) -> Iterator[CountingGenerate]:
    original = engine.model.model
    wrapper = CountingGenerate(original)
    engine.model.model = wrapper
    yield wrapper
    engine.model.model = original


def test_espeak_sentences_are_transcribed_with_wer_at_most_10_percent(
    engine: WhisperEngine,
) -> None:
    hypotheses = [engine.transcribe([AsrRequest(synthesize(s, "en"))])[0].text for s in SENTENCES]
    wer = word_error_rate(SENTENCES, hypotheses)
    print(f"WER {wer:.3f}: {hypotheses}")
    assert wer <= 0.10


def test_batch_of_three_gives_three_texts_in_order_from_one_generate_call(
    engine: WhisperEngine, counter: CountingGenerate
) -> None:
    texts = SENTENCES[1:4]
    batch = [
        AsrRequest(synthesize(t, v))
        for t, v in zip(texts, ("en", "en+f3", "en-us+f5"), strict=True)
    ]
    out = engine.transcribe(batch)
    assert counter.calls == 1
    assert counter.batch_sizes == [3]
    assert len(out) == 3
    for text, transcript in zip(texts, out, strict=True):
        assert word_error_rate([text], [transcript.text]) <= 0.10, transcript.text
        assert transcript.language == "en"
        assert transcript.raw_text.strip() == transcript.text


@pytest.mark.parametrize("seconds", [0.0, 0.05, 1.0])
def test_empty_or_silent_audio_gives_short_text_without_error(
    engine: WhisperEngine, seconds: float
) -> None:
    (out,) = engine.transcribe([AsrRequest(silence(seconds))])
    assert len(out.text) <= 5


def test_utterance_over_30_s_is_split_and_decoded_in_the_same_generate_call(
    engine: WhisperEngine, counter: CountingGenerate
) -> None:
    parts = SENTENCES[1:] * 3
    audio = np.concatenate([synthesize(s, "en") for s in parts])
    assert audio.size > 30 * 16_000
    short = AsrRequest(synthesize(SENTENCES[4], "en"))
    long_out, short_out = engine.transcribe([AsrRequest(audio), short])
    assert counter.calls == 1
    assert counter.batch_sizes == [3]
    assert word_error_rate([" ".join(parts)], [long_out.text]) <= 0.10, long_out.text
    assert word_error_rate([SENTENCES[4]], [short_out.text]) <= 0.10


@pytest.mark.parametrize("voice", ["en", "en+f3", "en+m7", "en-us+f5"])
def test_one_word_command_in_a_short_window_is_transcribed_once(
    engine: WhisperEngine, voice: str
) -> None:
    # About 1.2 s of audio in the 7 s floor window, where Whisper without
    # timestamps and silence padding answered "Stop... Stop... Stop...".
    audio = np.concatenate([silence(0.3), trim_silence(synthesize("stop", voice)), silence(0.5)])
    (out,) = engine.transcribe([AsrRequest(audio)])
    assert out.text.lower().strip(".!? ") == "stop", out.text


def test_a_decode_that_loops_is_redone_with_the_longer_window() -> None:
    # With a 4 s floor this clip, cut the way the VAD cuts it, loops
    # ("Play some just music. Play some just music. Play ...").
    engine = WhisperEngine(MODEL_DIR, device="cpu", min_window_s=4.0)
    counter = CountingGenerate(engine.model.model)
    engine.model.model = counter
    speech = trim_silence(synthesize("play some jazz music", "en+m7"))
    audio = np.concatenate([silence(0.2), speech, silence(0.2)])
    before = metrics.ASR_REDECODES._value.get()
    (out,) = engine.transcribe([AsrRequest(audio)])
    assert counter.windows == [400, 1000]
    assert metrics.ASR_REDECODES._value.get() == before + 1
    assert out.text.lower().startswith("play some") and not repeats_itself(out.text.split())


@pytest.mark.parametrize(
    "tokens",
    [[1, 1, 1], [5, 1, 2, 1, 2, 1, 2], [1, 2, 3, 1, 2, 3], [9, 4, 5, 6, 7, 4, 5, 6, 7, 8]],
)
def test_a_block_following_itself_is_a_repeat(tokens: list[int]) -> None:
    assert repeats_itself(tokens)


@pytest.mark.parametrize("tokens", [[], [1], [1, 1], [1, 2, 1, 2], [1, 2, 3, 4, 1, 2, 3]])
def test_ordinary_text_is_not_a_repeat(tokens: list[int]) -> None:
    assert not repeats_itself(tokens)


TS = 1000  # a made-up first timestamp id: ids from TS up are timestamps, 20 ms apart


def ts(seconds: float) -> int:
    return TS + round(seconds / 0.02)


def test_segments_that_start_inside_the_audio_are_kept_in_order() -> None:
    tokens = [ts(0.0), 1, 2, ts(2.0), ts(2.0), 3, ts(3.5)]
    assert segments_within(tokens, TS, duration_s=4.0) == [[1, 2], [3]]


def test_a_segment_starting_after_the_audio_ends_is_dropped() -> None:
    tokens = [ts(0.0), 1, 2, ts(2.0), ts(4.2), 1, 2, ts(5.0)]
    assert segments_within(tokens, TS, duration_s=4.0) == [[1, 2]]


def test_a_segment_cut_off_by_the_length_cap_is_kept() -> None:
    assert segments_within([ts(0.5), 7, 8], TS, duration_s=4.0) == [[7, 8]]


def test_text_without_timestamps_is_kept() -> None:
    assert segments_within([5, 6], TS, duration_s=1.0) == [[5, 6]]
