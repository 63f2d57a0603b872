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

The ring is a ``bytearray`` of s16le samples, written and read by slice
through a memoryview: every device packet passes through here, and a
slice copy of bytes costs a fifth of the same copy through numpy arrays.
"""

from __future__ import annotations

INITIAL_SAMPLES = 16_000
# Capacities past the first second are whole multiples of this (125 ms).
GRAIN = 2_000


def _round_up(samples: int) -> int:
    return -(-samples // GRAIN) * GRAIN


class UtteranceBuffer:
    def __init__(self, max_samples: int) -> None:
        self._max = max_samples
        # Nothing until the first audio: a session that never sends any costs none.
        self._data = bytearray()
        self._view = memoryview(self._data)
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
        return len(self._data) >> 1

    def append(self, pcm: bytes) -> None:
        n = len(pcm) >> 1
        if n == 0:
            return
        if len(pcm) & 1:
            pcm = pcm[:-1]
        size = self.capacity
        if self._used + n > size and size < self._max:
            step = max(GRAIN, size // 8) if size else INITIAL_SAMPLES
            self._resize(min(_round_up(max(self._used + n, size + step)), self._max))
            size = self.capacity
        if n >= size:
            self._base += self._used + n - size
            self._used = 0
            pcm = pcm[-2 * size :]
            n = size
        elif self._used + n > size:
            # Drop the oldest audio: it is older than any utterance may be long.
            drop = self._used + n - size
            self._base += drop
            self._used -= drop
        self._write(self.end, pcm)
        self._used += n

    def slice(self, start: int, end: int) -> bytes:
        """PCM for [start, end), clipped to what is held."""
        lo, hi = max(start, self._base), min(end, self.end)
        if hi <= lo:
            return b""
        return self._read(lo, hi)

    def discard_before(self, offset: int) -> None:
        drop = min(max(0, offset - self._base), self._used)
        if drop == 0:
            return
        self._base += drop
        self._used -= drop
        size = self.capacity
        if size > INITIAL_SAMPLES and self._used < size // 4:
            # A long utterance is over: give its storage back (keeping room
            # for as much again, so a listening session does not regrow).
            self._resize(min(max(INITIAL_SAMPLES, _round_up(2 * self._used)), self._max))

    # -- the ring ---------------------------------------------------------

    def _write(self, at: int, pcm: bytes | memoryview) -> None:
        size = len(self._data)
        i = (2 * at) % size
        n = len(pcm)
        if i + n <= size:
            self._view[i : i + n] = pcm
            return
        first = size - i
        self._view[i:] = pcm[:first]
        self._view[: n - first] = pcm[first:]

    def _read(self, lo: int, hi: int) -> bytes:
        size = len(self._data)
        i, n = (2 * lo) % size, 2 * (hi - lo)
        if i + n <= size:
            return self._view[i : i + n].tobytes()
        return self._view[i:].tobytes() + self._view[: i + n - size].tobytes()

    def _resize(self, size: int) -> None:
        held = self._read(self._base, self.end) if self._used else b""
        self._view.release()
        self._data = bytearray(2 * size)
        self._view = memoryview(self._data)
        self._write(self._base, held)
