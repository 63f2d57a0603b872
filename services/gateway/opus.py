"""Opus decoding of device audio to the cluster's 16 kHz s16le PCM."""

from __future__ import annotations

import opuslib

from services.gateway.errors import BadFrame

SAMPLE_RATE = 16_000
# The largest Opus packet duration (120 ms) bounds what one decode may return.
MAX_FRAME_SAMPLES = SAMPLE_RATE * 120 // 1000


class OpusStreamDecoder:
    """One per device connection: Opus decoders carry state between packets.

    Opus is permissive enough that some arbitrary bytes decode "successfully",
    so a packet must also last exactly the ``frame_duration`` the device
    declared in its hello (real firmware always sends 60 ms packets).
    """

    def __init__(self, frame_duration_ms: int | None = 60) -> None:
        self._decoder = opuslib.Decoder(SAMPLE_RATE, 1)
        self._expected_bytes = (
            None if frame_duration_ms is None else SAMPLE_RATE * frame_duration_ms // 1000 * 2
        )

    def decode(self, packet: bytes) -> bytes:
        if not packet:
            raise BadFrame("empty Opus packet")
        try:
            pcm: bytes = self._decoder.decode(packet, MAX_FRAME_SAMPLES)
        except opuslib.OpusError as exc:
            raise BadFrame(f"invalid Opus packet: {exc}") from None
        if self._expected_bytes is not None and len(pcm) != self._expected_bytes:
            raise BadFrame(
                f"Opus packet lasts {len(pcm) // 32} ms, "
                f"hello declared {self._expected_bytes // 32} ms frames"
            )
        return pcm
