"""Binary audio framing, selected by the device's ``Protocol-Version`` header.

v1: the frame is one raw Opus packet.
v2: 16-byte big-endian header (version u16, type u16, reserved u32,
    timestamp_ms u32, payload_size u32), then the payload.
v3: 4-byte big-endian header (type u8, reserved u8, payload_size u16), then the payload.
Payload type 0 is Opus audio, 1 is a JSON text message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from services.gateway.errors import BadFrame

_V2_HEADER = struct.Struct(">HHIII")
_V3_HEADER = struct.Struct(">BBH")

SUPPORTED_VERSIONS = (1, 2, 3)


class PayloadType(IntEnum):
    OPUS = 0
    JSON = 1


@dataclass(frozen=True, slots=True)
class Frame:
    type: PayloadType
    payload: bytes
    timestamp_ms: int | None = None


def parse_protocol_version(value: str | None) -> int:
    """The header is optional (v1 when absent); anything else unknown is refused."""
    if value is None or value.strip() == "":
        return 1
    try:
        version = int(value)
    except ValueError:
        raise BadFrame(f"Protocol-Version must be 1, 2 or 3 (got {value!r})") from None
    if version not in SUPPORTED_VERSIONS:
        raise BadFrame(f"Protocol-Version must be 1, 2 or 3 (got {version})")
    return version


def decode_frame(version: int, data: bytes) -> Frame:
    if version == 1:
        return Frame(PayloadType.OPUS, data)
    if version == 2:
        return _decode(data, _V2_HEADER, lambda h: (h[1], h[4], h[3]))
    return _decode(data, _V3_HEADER, lambda h: (h[0], h[2], None))


def encode_frame(
    version: int, payload: bytes, kind: PayloadType = PayloadType.OPUS, timestamp_ms: int = 0
) -> bytes:
    """The inverse of ``decode_frame`` (the simulator and server-to-device audio use it)."""
    if version == 1:
        if kind is not PayloadType.OPUS:
            raise ValueError("protocol v1 binary frames carry only Opus")
        return payload
    if version == 2:
        return _V2_HEADER.pack(2, kind, 0, timestamp_ms & 0xFFFFFFFF, len(payload)) + payload
    if len(payload) > 0xFFFF:
        raise ValueError("protocol v3 payloads are at most 65535 bytes")
    return _V3_HEADER.pack(kind, 0, len(payload)) + payload


def _decode(data: bytes, header: struct.Struct, fields) -> Frame:  # type: ignore[no-untyped-def]
    if len(data) < header.size:
        raise BadFrame(
            f"binary frame of {len(data)} bytes is shorter than its {header.size}-byte header"
        )
    kind, size, timestamp = fields(header.unpack_from(data))
    payload = data[header.size :]
    if size != len(payload):
        raise BadFrame(f"frame header says {size} payload bytes but {len(payload)} follow")
    try:
        payload_type = PayloadType(kind)
    except ValueError:
        raise BadFrame(f"unknown binary payload type {kind}") from None
    return Frame(payload_type, payload, timestamp)
