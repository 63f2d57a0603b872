"""Opus decoding of device audio to the cluster's 16 kHz s16le PCM.

Every listening device sends about 17 packets a second, so the decode is
the gateway's largest cost per device. libopus itself takes about 24 µs
for a 60 ms packet; opuslib's binding took 55 µs, most of it spent turning
each decoded frame into a list of Python ints and back (``pointer[:n]``),
in a fresh ctypes array per packet. ``LibopusDecoder`` calls the same
system libopus through ctypes with the argument types declared once and
one reusable output buffer per thread, which costs within a microsecond of
libopus's own time and returns the very same samples (``bench.listeners``
and ``tests/test_opus_decode.py`` show both). No maintained package offered
that for a raw Opus stream at 16 kHz: opuslib-next copies the same way and
opuscodec decodes Ogg files with its own, newer libopus build.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import weakref
from functools import cache
from typing import Literal, Protocol

import opuslib

from services.gateway.audio_path import audio_path_settings
from services.gateway.errors import BadFrame

SAMPLE_RATE = 16_000
# The largest Opus packet duration (120 ms) bounds what one decode may return.
MAX_FRAME_SAMPLES = SAMPLE_RATE * 120 // 1000
_MAX_FRAME_BYTES = MAX_FRAME_SAMPLES * 2

Binding = Literal["direct", "opuslib"]


class PacketDecoder(Protocol):
    """One Opus decoder state: a packet in, its 16-bit mono PCM out."""

    def decode(self, packet: bytes) -> bytes:
        """Raises ``BadFrame`` for a packet libopus refuses."""
        ...


class _Libopus:
    """The few libopus entry points a decoder needs, typed once."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("opus") or "libopus.so.0"
        lib = ctypes.CDLL(name)
        self.create = lib.opus_decoder_create
        self.create.argtypes = (ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int))
        self.create.restype = ctypes.c_void_p
        self.destroy = lib.opus_decoder_destroy
        self.destroy.argtypes = (ctypes.c_void_p,)
        self.destroy.restype = None
        # c_char_p passes a bytes object's own storage: no copy of the packet.
        self.decode = lib.opus_decode
        self.decode.argtypes = (
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
        )
        self.decode.restype = ctypes.c_int
        self.strerror = lib.opus_strerror
        self.strerror.argtypes = (ctypes.c_int,)
        self.strerror.restype = ctypes.c_char_p


@cache
def _libopus() -> _Libopus:
    return _Libopus()


class _OutputBuffer(threading.local):
    """Where libopus writes a frame before it is copied out. One per thread
    rather than per decoder: ctypes lets go of the GIL during the call, and a
    thousand sessions need not hold 3.8 kB each for a copy that lasts a call."""

    def __init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(_MAX_FRAME_BYTES)
        self.address = ctypes.addressof(self.buffer)
        self.view = memoryview(self.buffer).cast("B")


_output = _OutputBuffer()


class LibopusDecoder:
    """libopus through ctypes, decoding into a reused buffer."""

    def __init__(self) -> None:
        lib = _libopus()
        error = ctypes.c_int(0)
        state = lib.create(SAMPLE_RATE, 1, ctypes.byref(error))
        if not state or error.value != 0:
            raise RuntimeError(f"opus_decoder_create failed: {error.value}")
        self._state: int = state
        self._decode = lib.decode
        weakref.finalize(self, lib.destroy, state)

    def decode(self, packet: bytes) -> bytes:
        if type(packet) is not bytes:
            packet = bytes(packet)  # c_char_p takes bytes only
        out = _output
        samples = self._decode(self._state, packet, len(packet), out.address, MAX_FRAME_SAMPLES, 0)
        if samples < 0:
            message = _libopus().strerror(samples).decode(errors="replace")
            raise BadFrame(f"invalid Opus packet: {message}")
        return out.view[: samples * 2].tobytes()


class OpuslibDecoder:
    """The opuslib binding: the path before ``LibopusDecoder``, kept to compare."""

    def __init__(self) -> None:
        self._decoder = opuslib.Decoder(SAMPLE_RATE, 1)

    def decode(self, packet: bytes) -> bytes:
        try:
            pcm: bytes = self._decoder.decode(packet, MAX_FRAME_SAMPLES)
        except opuslib.OpusError as exc:
            raise BadFrame(f"invalid Opus packet: {exc}") from None
        return pcm


def packet_decoder(binding: Binding | None = None) -> PacketDecoder:
    """A fresh decoder state; the binding defaults to ``SF_GATEWAY_OPUS_BINDING``."""
    chosen = binding or audio_path_settings().opus_binding
    return OpuslibDecoder() if chosen == "opuslib" else LibopusDecoder()


class OpusStreamDecoder:
    """One per device connection: Opus decoders carry state between packets.

    Opus is permissive enough that some arbitrary bytes decode "successfully",
    so a packet must also last exactly the ``frame_duration`` the device
    declared in its hello (real firmware always sends 60 ms packets).
    """

    def __init__(self, frame_duration_ms: int | None = 60, binding: Binding | None = None) -> None:
        self._decoder = packet_decoder(binding)
        self._expected_bytes = (
            None if frame_duration_ms is None else SAMPLE_RATE * frame_duration_ms // 1000 * 2
        )

    def decode(self, packet: bytes) -> bytes:
        if not packet:
            raise BadFrame("empty Opus packet")
        pcm = self._decoder.decode(packet)
        if self._expected_bytes is not None and len(pcm) != self._expected_bytes:
            raise BadFrame(
                f"Opus packet lasts {len(pcm) // 32} ms, "
                f"hello declared {self._expected_bytes // 32} ms frames"
            )
        return pcm
