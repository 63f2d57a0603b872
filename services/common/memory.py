"""Giving freed heap memory back to the operating system.

glibc keeps what Python, numpy and torch free in its heaps for reuse, so a
process that once held a lot (a VAD tick over every stream catching up, a
thousand device sessions) keeps its peak resident size after the memory is
free. ``malloc_trim(0)`` hands the free pages back. It walks every heap, so a
``HeapTrimmer`` calls it only once enough has been freed since the last
time, and at most every few seconds (a trim of ~300 MB of free pages takes
~20 ms; one with nothing to give back, microseconds).

Elsewhere than glibc (musl, macOS) there is nothing to call and every
function here is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# mallopt parameter numbers (glibc's malloc.h).
_M_ARENA_MAX = -8


def _glibc() -> Any | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


_LIBC = _glibc()


def malloc_trim() -> bool:
    """Give the free pages of every heap back to the OS; whether any were."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


def limit_arenas(count: int) -> None:
    """At most ``count`` malloc arenas from now on.

    glibc gives each thread that allocates its own arena (up to 8 per core),
    and what one thread frees stays in that thread's arena. A service with an
    inference thread, gRPC's threads and the event loop otherwise keeps a
    peak's worth of free memory in each. Call it before those threads start;
    ``MALLOC_ARENA_MAX`` in the environment does the same.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, count)


class HeapTrimmer:
    """Trims the heap once ``min_released_bytes`` were freed, at most every ``min_interval_s``.

    Callers report what they free (``released``), as an estimate: a trim is
    cheap enough that precision does not matter, only that a process which
    freed little never pays for walking its heap. With ``collect``, a full
    garbage collection runs first: what a closed WebSocket session leaves is
    mostly reference cycles (the ASGI stack, transports, tasks), which an
    idle process would otherwise keep until its next full collection.

    ``maybe_trim`` may be called from any thread; ``trim_soon`` schedules it
    on the running event loop (the thread its garbage belongs to).
    """

    def __init__(
        self,
        min_interval_s: float = 5.0,
        min_released_bytes: int = 8 << 20,
        *,
        collect: bool = False,
        delay_s: float = 1.0,
        max_delay_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        trim: Callable[[], bool] = malloc_trim,
    ) -> None:
        self.min_interval_s = min_interval_s
        self.min_released_bytes = min_released_bytes
        self.collect = collect
        self.delay_s = delay_s
        self.max_delay_s = max_delay_s
        self._clock = clock
        self._trim = trim
        self._released = 0
        self._last = -float("inf")
        self.trims = 0
        self._lock = threading.Lock()
        self._scheduled: asyncio.TimerHandle | None = None
        self._pending_since: float | None = None

    def released(self, nbytes: int) -> None:
        # A lost update under a race only delays a trim; no lock on this path.
        self._released += max(0, nbytes)

    def due(self, min_interval_s: float | None = None) -> bool:
        """Enough was freed, and the last trim is ``min_interval_s`` ago (by
        default the trimmer's own interval)."""
        interval = self.min_interval_s if min_interval_s is None else min_interval_s
        return self._released >= self.min_released_bytes and self._clock() - self._last >= interval

    def maybe_trim(self, min_interval_s: float | None = None) -> bool:
        """Trim now if enough was freed and the last trim is long enough ago."""
        if not self.due(min_interval_s):
            return False
        with self._lock:
            self._released = 0
            self._last = self._clock()
            self.trims += 1
            try:
                if self.collect:
                    gc.collect()
                return self._trim()
            except Exception:  # never worth failing the caller over
                log.exception("giving memory back failed")
                return False

    def trim_soon(self) -> None:
        """On the running loop: trim once the frees have paused for ``delay_s``
        (a burst of closes is over), ``max_delay_s`` after the first at the
        latest, and never within ``min_interval_s`` of the last trim."""
        if self._released < self.min_released_bytes:
            return
        now = self._clock()
        if self._pending_since is None:
            self._pending_since = now
        at = min(now + self.delay_s, self._pending_since + self.max_delay_s)
        at = max(at, self._last + self.min_interval_s)
        if self._scheduled is not None:
            self._scheduled.cancel()
        loop = asyncio.get_running_loop()
        self._scheduled = loop.call_later(max(0.0, at - now), self._run_scheduled)

    def _run_scheduled(self) -> None:
        self._scheduled = None
        self._pending_since = None
        if not self.maybe_trim():
            self.trim_soon()


# The process's own trimmer, for code that frees memory in many places. It
# collects garbage first, so it is only for a process whose event loop owns
# its objects (the gateway). A full collection holds the loop for ~130 ms
# with a thousand sessions open, so it runs at most every 30 s.
HEAP = HeapTrimmer(min_interval_s=30.0, min_released_bytes=8 << 20, collect=True)
