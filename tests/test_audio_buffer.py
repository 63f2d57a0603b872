"""UtteranceBuffer: audio addressed by absolute sample offset, bounded."""

from __future__ import annotations

import numpy as np

from services.gateway.audio_buffer import UtteranceBuffer


def pcm(start: int, count: int) -> bytes:
    """Samples whose values are their own offsets, so slices are easy to check."""
    return np.arange(start, start + count, dtype="<i2").tobytes()


def values(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i2").tolist()


def test_slice_returns_audio_by_absolute_offset() -> None:
    buffer = UtteranceBuffer(100)
    buffer.append(pcm(0, 30))
    buffer.append(pcm(30, 30))
    assert values(buffer.slice(25, 35)) == list(range(25, 35))
    assert buffer.end == 60


def test_oldest_audio_is_dropped_past_capacity() -> None:
    buffer = UtteranceBuffer(50)
    for start in range(0, 120, 20):
        buffer.append(pcm(start, 20))
    assert buffer.end == 120
    assert buffer.start == 70
    assert values(buffer.slice(0, 80)) == list(range(70, 80))


def test_discard_before_keeps_later_audio_addressable() -> None:
    buffer = UtteranceBuffer(100)
    buffer.append(pcm(0, 60))
    buffer.discard_before(40)
    assert buffer.start == 40
    assert values(buffer.slice(40, 45)) == list(range(40, 45))
    buffer.append(pcm(60, 10))
    assert values(buffer.slice(58, 62)) == [58, 59, 60, 61]


def test_append_larger_than_capacity_keeps_the_newest() -> None:
    buffer = UtteranceBuffer(10)
    buffer.append(pcm(0, 25))
    assert (buffer.start, buffer.end) == (15, 25)
    assert values(buffer.slice(0, 100)) == list(range(15, 25))


def test_slice_outside_held_audio_is_empty() -> None:
    buffer = UtteranceBuffer(10)
    buffer.append(pcm(0, 10))
    assert buffer.slice(20, 30) == b""


def test_storage_grows_with_the_audio_held_not_with_the_limit() -> None:
    buffer = UtteranceBuffer(32 * 16_000)
    buffer.append(pcm(0, 960))
    assert buffer.capacity == 16_000
    for start in range(960, 5 * 16_000, 960):
        buffer.append(pcm(start % 30_000, 960))
    assert 5 * 16_000 <= buffer.capacity <= 8 * 16_000


def test_storage_is_given_back_once_a_long_utterance_is_discarded() -> None:
    buffer = UtteranceBuffer(32 * 16_000)
    for start in range(0, 10 * 16_000, 1600):
        buffer.append(pcm(start % 30_000, 1600))
    assert buffer.capacity >= 10 * 16_000
    buffer.discard_before(buffer.end - 100)
    assert buffer.capacity == 16_000
    assert values(buffer.slice(buffer.end - 100, buffer.end)) == values(
        pcm((10 * 16_000 - 100) % 30_000, 100)
    )
