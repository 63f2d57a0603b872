"""The FunASR protocol's pieces that need no cluster: keys, config messages, partial texts."""

from __future__ import annotations

import pytest

from services.gateway.compat.funasr_config import parse_config, parse_text
from services.gateway.compat.funasr_input import PartialGate
from services.gateway.compat.funasr_text import PartialText, tagged
from services.gateway.compat.keys import bearer_key, key_accepted, namespace
from services.gateway.config import GatewaySettings
from services.gateway.errors import ConnectionRejected
from services.gateway.store import SessionStore
from services.protos import asr_pb2

# Nothing listens here: a Redis lookup fails, and must fail closed.
NO_REDIS = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize(
    ("header", "key"),
    [("Bearer k1", "k1"), ("Bearer; k1", "k1"), ("bearer;k1", "k1"), ("Basic k1", ""), (None, "")],
)
def test_bearer_key_reads_both_spellings_clients_send(header: str | None, key: str) -> None:
    assert bearer_key(header) == key


async def test_configured_key_is_accepted_and_others_are_not_without_redis() -> None:
    settings = GatewaySettings(compat_keys="k1,k2", redis_url=NO_REDIS)
    store = SessionStore(NO_REDIS, 60)
    try:
        assert await key_accepted(settings, store, "k2")
        assert not await key_accepted(settings, store, "k3")
        assert not await key_accepted(settings, store, "")
    finally:
        await store.close()


async def test_open_mode_accepts_callers_without_a_key() -> None:
    settings = GatewaySettings(compat_open=True, redis_url=NO_REDIS)
    store = SessionStore(NO_REDIS, 60)
    try:
        assert await key_accepted(settings, store, "")
    finally:
        await store.close()


def test_voiceprint_namespace_never_holds_the_key_itself() -> None:
    assert "secret" not in namespace("secret") and namespace("secret") != namespace("other")
    assert namespace("") == "open"


def test_partial_stride_is_the_middle_chunk_size_in_60_ms_units() -> None:
    config = parse_config({"mode": "2pass", "chunk_size": [5, 10, 5]}, True, "auto", True)
    assert config.stride == 16000 * 600 // 1000
    assert parse_config({"mode": "online"}, True, "auto", True).stride == 9600


def test_unknown_mode_is_refused_with_the_modes_named() -> None:
    with pytest.raises(ConnectionRejected, match="offline"):
        parse_config({"mode": "streaming"}, True, "auto", True)


def test_config_takes_itn_language_rate_and_file_format() -> None:
    message = {"mode": "offline", "itn": False, "svs_lang": "zh", "audio_fs": 8000}
    config = parse_config({**message, "wav_format": "wav", "hotwords": "{}"}, True, "auto", True)
    assert (config.itn, config.language, config.audio_fs, config.container) == (
        False,
        "zh",
        8000,
        True,
    )


@pytest.mark.parametrize("text", ["[1, 2]", "not json", "[" * 100 + "]" * 100])
def test_text_messages_must_be_json_objects(text: str) -> None:
    with pytest.raises(ConnectionRejected):
        parse_text(text)


def test_partial_text_sends_words_once_two_recognitions_agree() -> None:
    partial = PartialText()
    assert partial.update("Turn on.") == ""
    assert partial.update("Turn on the kit") == "Turn on "
    assert partial.update("turn on the kitchen") == "the "
    assert partial.rest("Turn on the kitchen lights.") == "kitchen lights."


def test_sensevoice_tags_come_in_the_order_xiaozhi_reads_them() -> None:
    asr = asr_pb2.RecognizeResponse(text="你好。", language="zh", emotion="HAPPY", event="Speech")
    assert tagged(asr, itn=True) == "<|zh|><|HAPPY|><|Speech|><|withitn|>你好。"
    plain = asr_pb2.RecognizeResponse(text="hello", language="en")
    assert tagged(plain, itn=False) == "<|en|><|EMO_UNKNOWN|><|Speech|><|woitn|>hello"


def test_partial_gate_halves_when_the_asr_queues_and_regrows_when_it_does_not() -> None:
    gate = PartialGate(8)
    gate.observe(500.0)  # a final waited half a second behind others
    assert gate.limit == 4
    gate.back_off()  # a partial was refused
    assert gate.limit == 2
    for _ in range(10):
        gate.observe(5.0)
    assert gate.limit == 8


def test_partial_gate_at_zero_lets_one_probe_through_at_a_time() -> None:
    gate = PartialGate(4)
    gate.limit = 0
    assert gate.take()  # the probe
    assert not gate.take()
    gate.give()
    assert not gate.take()  # the next probe waits its turn


def test_partial_gate_with_a_ceiling_of_zero_never_opens() -> None:
    assert not PartialGate(0).take()


def test_no_partial_starts_while_a_final_is_being_recognised() -> None:
    gate = PartialGate(4)
    gate.finals = 1
    assert not gate.take()
    gate.finals = 0
    assert gate.take()
