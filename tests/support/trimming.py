"""A heap trimmer on a clock the test moves, recording when it would trim.

malloc_trim itself is the edge here: what is asserted is when the trimmer
decides to give memory back, not what glibc does with it.
"""

from __future__ import annotations

from services.common.memory import HeapTrimmer


class RecordedTrims:
    def __init__(self, min_interval_s: float, min_released_bytes: int) -> None:
        self.now = 100.0
        self.at: list[float] = []
        self.trimmer = HeapTrimmer(
            min_interval_s=min_interval_s,
            min_released_bytes=min_released_bytes,
            clock=lambda: self.now,
            trim=self._trim,
        )

    def _trim(self) -> bool:
        self.at.append(self.now)
        return True
