"""Audio of one session, addressed by absolute sample offset (audio time).

VAD events name offsets from the start of the session's audio; the buffer
keeps enough behind the current utterance's start (a pre-roll) to cut it out
exactly when its end arrives, and never more than ``max_samples``.

Storage grows with what is held (doubling from one second), not with the
limit: a listening session whose audio is cut and discarded as it goes holds
little, and only a long utterance costs its full length.
"""

from __future__ import annotations

import numpy as np

INITIAL_SAMPLES = 16_000


class UtteranceBuffer:
    def __init__(self, max_samples: int) -> None:
        self._max = max_samples
        self._data = np.zeros(min(INITIAL_SAMPLES, max_samples), dtype=np.int16)
        self._base = 0  # absolute offset of self._data[0]
        self._used = 0

    @property
    def end(self) -> int:
        """Absolute offset one past the newest sample."""
        return self._base + self._used

    @property
    def start(self) -> int:
        """Oldest sample still held."""
        return self._base

    def append(self, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, dtype="<i2")
        n = samples.size
        if self._used + n > self._data.size and self._data.size < self._max:
            self._resize(self._used + n)
        capacity = self._data.size
        if n >= capacity:
            self._base += self._used + n - capacity
            self._data[:] = samples[-capacity:]
            self._used = capacity
            return
        if self._used + n > capacity:
            # Drop the oldest audio: it is older than any utterance may be long.
            self.discard_before(self.end + n - capacity)
        self._data[self._used : self._used + n] = samples
        self._used += n

    @property
    def capacity(self) -> int:
        """Samples of storage allocated now."""
        return int(self._data.size)

    def _resize(self, needed: int) -> None:
        """Storage for ``needed`` samples: the smallest doubling of one second, capped."""
        size = min(INITIAL_SAMPLES, self._max)
        while size < needed and size < self._max:
            size *= 2
        resized = np.zeros(min(size, self._max), dtype=np.int16)
        resized[: self._used] = self._data[: self._used]
        self._data = resized

    def slice(self, start: int, end: int) -> bytes:
        """PCM for [start, end), clipped to what is held."""
        lo = max(start, self._base) - self._base
        hi = min(end, self.end) - self._base
        if hi <= lo:
            return b""
        return self._data[lo:hi].tobytes()

    def discard_before(self, offset: int) -> None:
        drop = min(max(0, offset - self._base), self._used)
        if drop == 0:
            return
        remaining = self._used - drop
        self._data[:remaining] = self._data[drop : self._used]
        self._base += drop
        self._used = remaining
        if self._data.size > INITIAL_SAMPLES and remaining < self._data.size // 4:
            # A long utterance is over: give its storage back.
            self._resize(max(remaining, 1))
