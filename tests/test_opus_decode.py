"""The gateway's Opus decode: libopus called directly gives opuslib's samples, bit for bit."""

from __future__ import annotations

import threading

import numpy as np
import opuslib
import pytest
from support.recordings import mandarin

from services.common.audio import float_to_pcm16
from services.gateway.errors import BadFrame
from services.gateway.opus import LibopusDecoder, OpuslibDecoder, OpusStreamDecoder

SAMPLE_RATE = 16_000


def _packets(application: int, frame_ms: int, bitrate: int | None = None) -> list[bytes]:
    """The real Mandarin recording, then quiet noise, as one device's Opus stream."""
    rng = np.random.default_rng(7)
    audio = np.concatenate([mandarin(), rng.normal(0, 0.002, SAMPLE_RATE * 2).astype(np.float32)])
    frame = SAMPLE_RATE * frame_ms // 1000
    audio = np.concatenate([audio, np.zeros((-audio.size) % frame, dtype=np.float32)])
    pcm = float_to_pcm16(audio)
    encoder = opuslib.Encoder(SAMPLE_RATE, 1, application)
    if bitrate is not None:
        encoder.bitrate = bitrate
    step = frame * 2
    return [encoder.encode(pcm[i : i + step], frame) for i in range(0, len(pcm), step)]


# How xiaozhi firmware sends (VoIP, 60 ms), and the other modes Opus may pick.
ENCODINGS = {
    "voip-60ms": (opuslib.APPLICATION_VOIP, 60, None),
    "voip-20ms-low-rate": (opuslib.APPLICATION_VOIP, 20, 8_000),
    "audio-40ms-celt": (opuslib.APPLICATION_AUDIO, 40, 64_000),
    "restricted-lowdelay-120ms": (opuslib.APPLICATION_RESTRICTED_LOWDELAY, 120, 24_000),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_direct_libopus_decodes_real_packets_to_opuslibs_exact_samples(encoding: str) -> None:
    packets = _packets(*ENCODINGS[encoding])
    direct, baseline = LibopusDecoder(), OpuslibDecoder()
    for index, packet in enumerate(packets):
        assert direct.decode(packet) == baseline.decode(packet), f"packet {index} differs"


def test_stream_decoder_gives_the_same_pcm_with_either_binding() -> None:
    packets = _packets(opuslib.APPLICATION_VOIP, 60)
    direct = OpusStreamDecoder(60, binding="direct")
    baseline = OpusStreamDecoder(60, binding="opuslib")
    assert b"".join(map(direct.decode, packets)) == b"".join(map(baseline.decode, packets))


def test_decoded_frames_do_not_share_the_output_buffer() -> None:
    decoder = LibopusDecoder()
    packets = _packets(opuslib.APPLICATION_VOIP, 60)[:20]
    frames = [decoder.decode(p) for p in packets]
    again = LibopusDecoder()
    assert frames == [again.decode(p) for p in packets]


def test_decoders_on_separate_threads_keep_their_own_output() -> None:
    packets = _packets(opuslib.APPLICATION_VOIP, 60)
    expected = b"".join(map(OpuslibDecoder().decode, packets))
    results: list[bytes] = []

    def run() -> None:
        decoder = LibopusDecoder()
        results.append(b"".join(decoder.decode(p) for p in packets))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [expected] * 4


@pytest.mark.parametrize("binding", ["direct", "opuslib"])
def test_a_packet_libopus_refuses_is_a_bad_frame(binding: str) -> None:
    decoder = OpusStreamDecoder(60, binding=binding)  # type: ignore[arg-type]
    # TOC code 3 (arbitrary frame count) with a frame count of zero is invalid.
    with pytest.raises(BadFrame, match="invalid Opus packet"):
        decoder.decode(b"\x03\x00")


@pytest.mark.parametrize("binding", ["direct", "opuslib"])
def test_a_packet_longer_than_declared_is_a_bad_frame(binding: str) -> None:
    packet = _packets(opuslib.APPLICATION_VOIP, 120)[0]
    decoder = OpusStreamDecoder(60, binding=binding)  # type: ignore[arg-type]
    with pytest.raises(BadFrame, match="hello declared 60 ms"):
        decoder.decode(packet)


def test_an_empty_packet_is_a_bad_frame() -> None:
    with pytest.raises(BadFrame, match="empty"):
        OpusStreamDecoder(60).decode(b"")


def test_a_memoryview_packet_decodes_like_bytes() -> None:
    packet = _packets(opuslib.APPLICATION_VOIP, 60)[3]
    assert LibopusDecoder().decode(memoryview(packet)) == OpuslibDecoder().decode(packet)  # type: ignore[arg-type]
