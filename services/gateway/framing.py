"""Binary audio framing, selected by the device's ``Protocol-Version`` header.

v1: the frame is one raw Opus packet.
v2: 16-byte big-endian header (version u16, type u16, reserved u32,
    timestamp_ms u32, payload_size u32), then the payload.
v3: 4-byte big-endian header (type u8, reserved u8, payload_size u16), then the payload.
Payload type 0 is Opus audio, 1 is a JSON text message.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

from services.gateway.errors import BadFrame

_V2_HEADER = struct.Struct(">HHIII")
_V3_HEADER = struct.Struct(">BBH")

SUPPORTED_VERSIONS = (1, 2, 3)


class PayloadType(IntEnum):
    OPUS = 0
    JSON = 1


# A tuple, not a frozen dataclass: one is built per audio packet, and a frozen
# dataclass's __init__ costs several times a tuple's.
class Frame(NamedTuple):
    type: PayloadType
    payload: bytes
    timestamp_ms: int | None = None


_PAYLOAD_TYPES = {kind.value: kind for kind in PayloadType}


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
    header = _V2_HEADER if version == 2 else _V3_HEADER
    if len(data) < header.size:
        raise BadFrame(
            f"binary frame of {len(data)} bytes is shorter than its {header.size}-byte header"
        )
    timestamp: int | None
    if version == 2:
        _, kind, _, timestamp, size = _V2_HEADER.unpack_from(data)
    else:
        kind, _, size = _V3_HEADER.unpack_from(data)
        timestamp = None
    payload = data[header.size :]
    if size != len(payload):
        raise BadFrame(f"frame header says {size} payload bytes but {len(payload)} follow")
    payload_type = _PAYLOAD_TYPES.get(kind)
    if payload_type is None:
        raise BadFrame(f"unknown binary payload type {kind}")
    return Frame(payload_type, payload, timestamp)


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
