"""Binary framing of device audio: protocol versions 1, 2 and 3."""

from __future__ import annotations

import struct

import pytest

from services.gateway.errors import INVALID_PAYLOAD, BadFrame
from services.gateway.framing import (
    PayloadType,
    decode_frame,
    encode_frame,
    parse_protocol_version,
)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_opus_payload_round_trips_through_each_version(version: int) -> None:
    payload = bytes(range(200))
    frame = decode_frame(version, encode_frame(version, payload, PayloadType.OPUS, 120))
    assert frame.type is PayloadType.OPUS
    assert frame.payload == payload


def test_v1_frame_is_the_raw_packet() -> None:
    assert decode_frame(1, b"\x78\x01\x02").payload == b"\x78\x01\x02"


def test_v2_header_is_big_endian_with_timestamp() -> None:
    data = struct.pack(">HHIII", 2, 0, 0, 123456, 3) + b"abc"
    frame = decode_frame(2, data)
    assert (frame.type, frame.payload, frame.timestamp_ms) == (PayloadType.OPUS, b"abc", 123456)


def test_v3_json_payload_type_is_recognised() -> None:
    data = struct.pack(">BBH", 1, 0, 2) + b"{}"
    assert decode_frame(3, data).type is PayloadType.JSON


@pytest.mark.parametrize("version", [2, 3])
def test_header_that_overstates_payload_size_is_refused(version: int) -> None:
    frame = encode_frame(version, b"x" * 10)
    with pytest.raises(BadFrame, match="header says 10 payload bytes but 9 follow") as err:
        decode_frame(version, frame[:-1])
    assert err.value.code == INVALID_PAYLOAD


@pytest.mark.parametrize("version", [2, 3])
def test_header_that_understates_payload_size_is_refused(version: int) -> None:
    with pytest.raises(BadFrame, match="but 11 follow"):
        decode_frame(version, encode_frame(version, b"x" * 10) + b"y")


@pytest.mark.parametrize("version", [2, 3])
def test_frame_shorter_than_its_header_is_refused(version: int) -> None:
    with pytest.raises(BadFrame, match="shorter than its"):
        decode_frame(version, b"\x00\x01")


def test_unknown_payload_type_is_refused() -> None:
    with pytest.raises(BadFrame, match="unknown binary payload type 7"):
        decode_frame(3, struct.pack(">BBH", 7, 0, 1) + b"x")


@pytest.mark.parametrize(("header", "version"), [(None, 1), ("", 1), ("2", 2), (" 3 ", 3)])
def test_protocol_version_header_selects_framing(header: str | None, version: int) -> None:
    assert parse_protocol_version(header) == version


@pytest.mark.parametrize("header", ["4", "0", "v2", "1.5"])
def test_unsupported_protocol_version_is_refused(header: str) -> None:
    with pytest.raises(BadFrame, match="Protocol-Version must be 1, 2 or 3"):
        parse_protocol_version(header)
