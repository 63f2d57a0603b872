"""Multilingual Whisper base on real weights: Mandarin from a real recording, English, languages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.cer import character_error_rate
from support.recordings import MANDARIN_TEXT, MANDARIN_WAV, mandarin
from support.wer import word_error_rate

from services.asr.engine import AsrRequest
from services.asr.languages import SimplifiedChinese
from services.asr.whisper import WhisperEngine
from services.simulator.phrases import SENTENCES, VOICES
from services.simulator.speech import silence, synthesize

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "whisper-base"

pytestmark = [
    pytest.mark.skipif(not MODEL_DIR.exists(), reason="whisper-base not unpacked (make models)"),
    pytest.mark.skipif(not MANDARIN_WAV.exists(), reason=f"{MANDARIN_WAV} missing"),
]


@pytest.fixture(scope="module")
def engine() -> WhisperEngine:
    return WhisperEngine(MODEL_DIR, device="cpu", cpu_threads=1, detect_among=("zh", "en"))


def english(sentence: str, voice: str = "en") -> np.ndarray:
    return np.concatenate([silence(0.3), synthesize(sentence, voice), silence(0.5)])


@pytest.mark.parametrize("language", ["auto", "zh", "zh-CN"])
def test_mandarin_recording_is_transcribed_in_simplified_characters(
    engine: WhisperEngine, language: str
) -> None:
    (out,) = engine.transcribe([AsrRequest(mandarin(), language=language)])
    cer = character_error_rate([MANDARIN_TEXT], [out.text])
    print(f"{language}: CER {cer:.3f} {out.text}")
    # Measured 0.105 ("语音" heard as "与您"); at most 3 of its 19 characters.
    assert cer <= 0.16, out.text
    assert out.language == "zh"
    assert SimplifiedChinese.convert(out.text) == out.text


def test_english_is_detected_and_transcribed_with_wer_at_most_15_percent(
    engine: WhisperEngine,
) -> None:
    sentences = SENTENCES[:6]
    out = engine.transcribe(
        [AsrRequest(english(s, VOICES[i % len(VOICES)])) for i, s in enumerate(sentences)]
    )
    wer = word_error_rate(sentences, [t.text for t in out])
    print(f"WER {wer:.3f}: {[t.text for t in out]}")
    assert wer <= 0.15
    assert {t.language for t in out} == {"en"}


def test_one_batch_of_mandarin_and_english_gives_each_in_its_own_language(
    engine: WhisperEngine,
) -> None:
    sentence = "turn on the kitchen lights"
    first, second, third = engine.transcribe(
        [AsrRequest(english(sentence)), AsrRequest(mandarin()), AsrRequest(english(sentence))]
    )
    assert (first.language, second.language, third.language) == ("en", "zh", "en")
    assert character_error_rate([MANDARIN_TEXT], [second.text]) <= 0.16, second.text
    assert word_error_rate([sentence] * 2, [first.text, third.text]) <= 0.2


def test_whisper_reports_no_emotion_or_event(engine: WhisperEngine) -> None:
    (out,) = engine.transcribe([AsrRequest(mandarin())])
    assert (out.emotion, out.event) == ("", "")


def test_a_language_the_model_does_not_know_is_detected_instead(engine: WhisperEngine) -> None:
    (out,) = engine.transcribe([AsrRequest(mandarin(), language="tlh")])
    assert out.language == "zh"


def test_detection_limited_to_languages_the_model_does_not_know_is_refused() -> None:
    with pytest.raises(ValueError, match="xx"):
        WhisperEngine(MODEL_DIR, device="cpu", cpu_threads=1, detect_among=("zh", "xx"))
