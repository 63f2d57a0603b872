"""Language codes from devices and settings, and Chinese text in simplified characters."""

from __future__ import annotations

from typing import Any

import pytest

from services.asr.config import AsrSettings
from services.asr.languages import SimplifiedChinese, normalize_language
from services.gateway.messages import declared_language


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("zh", "zh"),
        ("zh-CN", "zh"),
        ("EN_us", "en"),
        ("cmn", "zh"),
        ("auto", "auto"),
        ("", "auto"),
        ("*", "auto"),
        ("detect", "auto"),
    ],
)
def test_a_language_tag_is_reduced_to_the_code_whisper_knows(code: str, expected: str) -> None:
    assert normalize_language(code) == expected


def test_traditional_characters_become_simplified() -> None:
    assert SimplifiedChinese.convert("歡迎大家來體驗語音識別") == "欢迎大家来体验语音识别"


@pytest.mark.parametrize("text", ["欢迎大家来体验语音识别", "turn on the lights", ""])
def test_simplified_chinese_and_other_text_are_left_as_they_are(text: str) -> None:
    assert SimplifiedChinese.convert(text) == text


@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        ({"language": "zh"}, "zh"),
        ({"language": "zh-CN"}, "zh"),
        ({"language": "zh-Hant-TW"}, "zh"),
        ({"language": "EN"}, "en"),
        ({"language": "auto"}, "auto"),
    ],
)
def test_a_hello_may_name_the_language_of_the_device(hello: dict[str, Any], expected: str) -> None:
    assert declared_language({"type": "hello", **hello}) == expected


@pytest.mark.parametrize(
    "hello",
    [{}, {"language": ""}, {"language": 5}, {"language": "not a tag"}, {"language": "z" * 40}],
)
def test_a_hello_without_a_usable_language_leaves_it_to_the_deployment(
    hello: dict[str, Any],
) -> None:
    assert declared_language({"type": "hello", **hello}) is None


def test_one_setting_picks_the_whisper_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SF_ASR_WHISPER_MODEL_DIR", raising=False)
    monkeypatch.setenv("SF_ASR_WHISPER_MODEL", "base")
    assert AsrSettings().whisper_path().name == "whisper-base"
    monkeypatch.setenv("SF_ASR_WHISPER_MODEL", "tiny.en")
    assert AsrSettings().whisper_path().name == "whisper-tiny.en"
    monkeypatch.setenv("SF_ASR_WHISPER_MODEL_DIR", "/elsewhere/whisper-small")
    assert str(AsrSettings().whisper_path()) == "/elsewhere/whisper-small"


def test_detection_languages_are_a_comma_separated_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SF_ASR_WHISPER_LANGUAGES", " zh, EN ,ja")
    assert AsrSettings().whisper_detect_among() == ["zh", "en", "ja"]
