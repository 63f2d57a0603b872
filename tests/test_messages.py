"""Device text messages and the Opus decoder's input checks."""

from __future__ import annotations

import re

import numpy as np
import opuslib
import pytest

from services.gateway.errors import ConnectionRejected
from services.gateway.messages import declared_frame_duration, hello_reply, parse_message
from services.gateway.opus import OpusStreamDecoder


def test_hello_as_firmware_sends_it_parses() -> None:
    message = parse_message(
        '{"type":"hello","version":1,"features":{"mcp":true,"aec":true},"transport":"websocket",'
        '"audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}'
    )
    assert message["type"] == "hello"
    assert declared_frame_duration(message) == 60


def test_hello_without_audio_params_declares_no_duration() -> None:
    assert declared_frame_duration({"type": "hello"}) is None


def test_reply_hello_names_websocket_transport_and_session() -> None:
    reply = hello_reply("abc", 24000, 60)
    assert reply["transport"] == "websocket"
    assert reply["session_id"] == "abc"
    assert reply["audio_params"]["sample_rate"] == 24000


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[1, 2, 3]", "must be a JSON object (got list)"),
        ('"hello"', "must be a JSON object (got str)"),
        ("{not json", "not JSON"),
        ('{"state": "start"}', 'no string "type"'),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ConnectionRejected, match=re.escape(reason)):
        parse_message(text)


def test_non_opus_uplink_format_is_refused() -> None:
    with pytest.raises(ConnectionRejected, match="only Opus"):
        declared_frame_duration({"audio_params": {"format": "pcm"}})


def _opus_packet(ms: int) -> bytes:
    samples = 16 * ms
    tone = (np.sin(np.arange(samples) * 0.05) * 8000).astype("<i2").tobytes()
    return opuslib.Encoder(16000, 1, opuslib.APPLICATION_VOIP).encode(tone, samples)


def test_opus_packet_decodes_to_16khz_pcm() -> None:
    assert len(OpusStreamDecoder(60).decode(_opus_packet(60))) == 960 * 2


def test_packet_of_another_duration_than_declared_is_refused() -> None:
    with pytest.raises(ConnectionRejected, match="lasts 20 ms, hello declared 60 ms"):
        OpusStreamDecoder(60).decode(_opus_packet(20))


@pytest.mark.parametrize("garbage", [b"hello world, not opus at all", b"\xff\xff\xff", b""])
def test_non_opus_bytes_are_refused(garbage: bytes) -> None:
    with pytest.raises(ConnectionRejected):
        OpusStreamDecoder(60).decode(garbage)
