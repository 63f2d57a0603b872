"""Audio of one session, addressed by absolute sample offset (audio time).

VAD events name offsets from the start of the session's audio; the buffer
keeps enough behind the current utterance's start (a pre-roll) to cut it out
exactly when its end arrives, and never more than ``max_samples``.

Storage is a ring: sample ``a`` lives at ``a % capacity``, so dropping old
audio costs nothing and a listening session can drop it frame by frame,
holding only the look-back its VAD stream needs (about a second). The ring
grows with what is held, not with the limit: one second at the first audio,
then in steps of an eighth (at least ``GRAIN``), so a listening session
holds little more than its look-back, only a long utterance costs its full
length, and that storage is given back once the utterance is over.
"""

from __future__ import annotations

import numpy as np

INITIAL_SAMPLES = 16_000
# Capacities past the first second are whole multiples of this (125 ms).
GRAIN = 2_000


def _round_up(samples: int) -> int:
    return -(-samples // GRAIN) * GRAIN


class UtteranceBuffer:
    def __init__(self, max_samples: int) -> None:
        self._max = max_samples
        # Nothing until the first audio: a session that never sends any costs none.
        self._data = np.zeros(0, dtype=np.int16)
        self._base = 0  # absolute offset of the oldest sample held
        self._used = 0

    @property
    def end(self) -> int:
        """Absolute offset one past the newest sample."""
        return self._base + self._used

    @property
    def start(self) -> int:
        """Oldest sample still held."""
        return self._base

    @property
    def capacity(self) -> int:
        """Samples of storage allocated now."""
        return int(self._data.size)

    def append(self, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, dtype="<i2")
        n = samples.size
        if n == 0:
            return
        size = self._data.size
        if self._used + n > size and size < self._max:
            step = max(GRAIN, size // 8) if size else INITIAL_SAMPLES
            self._resize(min(_round_up(max(self._used + n, size + step)), self._max))
        capacity = self._data.size
        if n >= capacity:
            self._base += self._used + n - capacity
            self._used = 0
            samples = samples[-capacity:]
            n = capacity
        elif self._used + n > capacity:
            # Drop the oldest audio: it is older than any utterance may be long.
            drop = self._used + n - capacity
            self._base += drop
            self._used -= drop
        self._write(self.end, samples)
        self._used += n

    def slice(self, start: int, end: int) -> bytes:
        """PCM for [start, end), clipped to what is held."""
        lo, hi = max(start, self._base), min(end, self.end)
        if hi <= lo:
            return b""
        return self._read(lo, hi).tobytes()

    def discard_before(self, offset: int) -> None:
        drop = min(max(0, offset - self._base), self._used)
        if drop == 0:
            return
        self._base += drop
        self._used -= drop
        if self._data.size > INITIAL_SAMPLES and self._used < self._data.size // 4:
            # A long utterance is over: give its storage back (keeping room
            # for as much again, so a listening session does not regrow).
            self._resize(min(max(INITIAL_SAMPLES, _round_up(2 * self._used)), self._max))

    # -- the ring ---------------------------------------------------------

    def _write(self, at: int, samples: np.ndarray) -> None:
        size = self._data.size
        i = at % size
        first = min(samples.size, size - i)
        self._data[i : i + first] = samples[:first]
        self._data[: samples.size - first] = samples[first:]

    def _read(self, lo: int, hi: int) -> np.ndarray:
        size = self._data.size
        i, n = lo % size, hi - lo
        if i + n <= size:
            return self._data[i : i + n]
        return np.concatenate([self._data[i:], self._data[: i + n - size]])

    def _resize(self, size: int) -> None:
        held = self._read(self._base, self.end) if self._used else self._data[:0]
        self._data = np.zeros(size, dtype=np.int16)
        self._write(self._base, held)
