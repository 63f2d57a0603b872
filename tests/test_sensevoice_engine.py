"""SenseVoiceEngine on a tiny random SenseVoiceSmall, loaded the way the real one is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.tiny_models import write_tiny_sensevoice

from services.asr.engine import AsrRequest, Transcript
from services.asr.sensevoice import SenseVoiceEngine, parse_rich_text
from services.common.audio import SAMPLE_RATE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sensevoice(tmp_path_factory.mktemp("sensevoice"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> SenseVoiceEngine:
    return SenseVoiceEngine(str(model_dir))


def tone(seconds: float, hz: float, seed: int) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * hz * t) + 0.05 * noise).astype(np.float32)


class CallCounter:
    """Counts the model's ``inference`` calls and the encoder's batch sizes (the model runs)."""

    def __init__(self, engine: SenseVoiceEngine) -> None:
        self.model = engine.model.model
        self.inference_calls = 0
        self.encoder_batches: list[int] = []

    def __enter__(self) -> CallCounter:
        original = self.model.inference

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.inference_calls += 1
            return original(*args, **kwargs)

        self.model.inference = counted
        self.handle = self.model.encoder.register_forward_hook(
            lambda _m, args, _out: self.encoder_batches.append(args[0].shape[0])
        )
        return self

    def __exit__(self, *_: object) -> None:
        del self.model.inference
        self.handle.remove()


@pytest.fixture
def counter(engine: SenseVoiceEngine) -> Iterator[CallCounter]:
    with CallCounter(engine) as c:
        yield c


def test_a_local_dir_loads_through_funasr_automodel_with_its_weights(
    engine: SenseVoiceEngine, model_dir: Path
) -> None:
    from funasr import AutoModel
    from funasr.models.sense_voice.model import SenseVoiceSmall

    assert isinstance(engine.model, AutoModel)
    assert isinstance(engine.model.model, SenseVoiceSmall)
    assert engine.name == "sensevoice"
    assert engine.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    saved = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    loaded = engine.model.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k].cpu()) for k in saved)


def test_a_batch_of_three_lengths_is_one_model_call_with_results_in_order(
    engine: SenseVoiceEngine, counter: CallCounter
) -> None:
    audio = [tone(1.7, 220, 1), tone(0.6, 440, 2), tone(3.1, 330, 3)]
    batch = [AsrRequest(a, language="en", use_itn=False) for a in audio]

    results = engine.transcribe(batch)

    assert len(results) == 3
    assert all(isinstance(r, Transcript) for r in results)
    assert counter.inference_calls == 1
    assert counter.encoder_batches == [3]
    # Each transcript is the one its utterance gets alone: the order is the input's.
    alone = [engine.transcribe([r])[0] for r in batch]
    assert len({a.raw_text for a in alone}) == 3, "order check needs distinct outputs"
    assert [r.raw_text for r in results] == [a.raw_text for a in alone]


@pytest.mark.parametrize(("language", "use_itn"), [("zh", True), ("en", False), ("auto", True)])
def test_the_batch_language_and_itn_option_reach_the_model_as_its_queries(
    engine: SenseVoiceEngine, language: str, use_itn: bool
) -> None:
    model = engine.model.model
    inputs: list[torch.Tensor] = []
    # A pre-hook: the encoder scales its input in place.
    handle = model.encoder.register_forward_pre_hook(
        lambda _m, args: inputs.append(args[0].detach().clone())
    )
    try:
        engine.transcribe([AsrRequest(tone(0.8, f, 6), language, use_itn) for f in (200, 400)])
    finally:
        handle.remove()

    # SenseVoice prepends [language, event, emotion, text-norm] query embeddings.
    [x] = inputs
    lid = model.embed.weight[model.lid_dict[language]]
    norm = model.embed.weight[model.textnorm_dict["withitn" if use_itn else "woitn"]]
    for row in x:
        assert torch.equal(row[0], lid)
        assert torch.equal(row[3], norm)


def test_transcripts_carry_the_raw_text_and_its_parsed_fields(engine: SenseVoiceEngine) -> None:
    [result] = engine.transcribe([AsrRequest(tone(1.0, 300, 4))])

    assert result == parse_rich_text(result.raw_text)
    assert "<|" not in result.text


def test_an_empty_and_a_very_short_utterance_still_give_transcripts(
    engine: SenseVoiceEngine,
) -> None:
    batch = [AsrRequest(np.zeros(0, np.float32)), AsrRequest(tone(0.01, 500, 5))]

    assert len(engine.transcribe(batch)) == 2


def test_an_empty_batch_needs_no_model_call(engine: SenseVoiceEngine, counter: CallCounter) -> None:
    assert engine.transcribe([]) == []
    assert counter.inference_calls == 0


@pytest.mark.parametrize(
    "other",
    [
        AsrRequest(np.zeros(8000, np.float32), language="zh", use_itn=True),
        AsrRequest(np.zeros(8000, np.float32), language="en", use_itn=False),
    ],
)
def test_a_batch_mixing_language_or_itn_options_is_refused(
    engine: SenseVoiceEngine, counter: CallCounter, other: AsrRequest
) -> None:
    first = AsrRequest(np.zeros(8000, np.float32), language="en", use_itn=True)

    with pytest.raises(ValueError, match="mixes"):
        engine.transcribe([first, other])
    assert counter.inference_calls == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "<|en|><|HAPPY|><|Speech|><|woitn|>hello world",
            Transcript("hello world", "en", "HAPPY", "Speech"),
        ),
        (
            "<|zh|><|NEUTRAL|><|Speech|><|withitn|>欢迎大家来体验达摩院推出的语音识别模型。",
            Transcript("欢迎大家来体验达摩院推出的语音识别模型。", "zh", "NEUTRAL", "Speech"),
        ),
        (
            "<|yue|><|EMO_UNKNOWN|><|BGM|><|withitn|>",
            Transcript("", "yue", "EMO_UNKNOWN", "BGM"),
        ),
        (
            "<|nospeech|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>",
            Transcript("", "nospeech", "EMO_UNKNOWN", "Event_UNK"),
        ),
        (
            "<|ja|><|SAD|><|Laughter|><|withitn|>  こんにちは <|ja|> 世界 ",
            Transcript("こんにちは 世界", "ja", "SAD", "Laughter"),
        ),
        ("plain text, no tags", Transcript("plain text, no tags")),
    ],
)
def test_sensevoice_tags_are_parsed_into_fields(raw: str, expected: Transcript) -> None:
    parsed = parse_rich_text(raw)

    assert parsed.text == expected.text
    assert (parsed.language, parsed.emotion, parsed.event) == (
        expected.language,
        expected.emotion,
        expected.event,
    )
    assert parsed.raw_text == raw
