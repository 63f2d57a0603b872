"""Restarting local processes that exit, the way a pod's restart policy does.

``LocalCluster(supervise=True)`` (services/cluster.py) runs one ``Supervisor``
over its processes; the policy and the bookkeeping are here, apart from how
processes are started and probed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

log = logging.getLogger("speechfront.cluster")


@dataclass(frozen=True)
class Backoff:
    """Restart delays as a pod's restart policy has them.

    The first restart after an exit waits ``initial_s``; every further exit
    that comes before the process has stayed up ``reset_after_s`` doubles the
    wait, up to ``max_s``. A process that stayed up that long starts over.
    """

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def failures_after_exit(self, failures: int, uptime_s: float) -> int:
        """Consecutive quick exits, counting the one that just happened."""
        return 1 if uptime_s >= self.reset_after_s else failures + 1

    def delay(self, failures: int) -> float:
        """Seconds to wait before the restart that follows ``failures`` quick exits."""
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.initial_s * self.factor ** min(failures - 1, 64))


class Process(Protocol):
    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


class Supervised(Protocol):
    """What a ``Supervisor`` needs from whatever runs the processes."""

    def current(self, name: str) -> Process | None: ...

    def restart(self, name: str, note: str) -> None: ...

    def healthy(self, name: str) -> bool: ...

    def ports_free(self, name: str) -> bool: ...


@dataclass
class ProcessStatus:
    name: str
    # running: alive and healthy; starting: alive, not healthy yet;
    # waiting: exited, to be restarted at ``next_start``.
    state: str = "starting"
    restarts: int = 0
    failures: int = 0
    last_exit_code: int | None = None
    started_at: float = 0.0
    exited_at: float | None = None
    next_start: float = 0.0
    ports_held: bool = False
    # Seconds from each exit being seen to the restarted process being healthy.
    recoveries: list[float] = field(default_factory=list)


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


class Supervisor:
    """Restarts processes that exit, each on its own back-off, from one thread.

    Every ``interval_s`` it looks at each watched process: one that exited is
    restarted after ``backoff`` (once nothing listens on its ports any more);
    one that is starting is probed until healthy. No step waits on a process,
    so a replica that keeps failing never holds up the others.
    """

    PORT_RETRY_S = 0.5

    def __init__(
        self,
        target: Supervised,
        backoff: Backoff | None = None,
        interval_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._backoff = backoff or Backoff()
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._status: dict[str, ProcessStatus] = {}
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, name: str) -> None:
        with self._lock:
            if name not in self._status:
                self._status[name] = ProcessStatus(name, started_at=self._clock())

    def watching(self, name: str) -> bool:
        with self._lock:
            return name in self._status

    def status(self, name: str) -> ProcessStatus:
        with self._lock:
            st = self._status[name]
            return replace(st, recoveries=list(st.recoveries))

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return {name: st.restarts for name, st in self._status.items()}

    def expedite(self, name: str) -> None:
        """Restart now a process waiting out its back-off (someone asked for it)."""
        with self._lock:
            st = self._status.get(name)
            if st is not None and st.state == "waiting":
                st.next_start = min(st.next_start, self._clock())

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._halt.wait(self._interval_s):
            self.tick()

    def tick(self) -> None:
        with self._lock:
            names = list(self._status)
        for name in names:
            if self._halt.is_set():
                return
            try:
                self._step(name)
            except Exception:  # one process's trouble must not stop the others' care
                log.exception("supervising %s failed", name)

    def _step(self, name: str) -> None:
        with self._lock:
            st = self._status[name]
            state = st.state
        if state == "waiting":
            self._maybe_restart(name, st)
            return
        process = self._target.current(name)
        code = None if process is None else process.poll()
        if process is not None and code is None:
            if state == "starting" and self._target.healthy(name):
                now = self._clock()
                with self._lock:
                    st.state = "running"
                    if st.exited_at is not None:
                        st.recoveries.append(now - st.exited_at)
                if st.exited_at is not None:
                    log.info("%s healthy again, %.1f s after it exited", name, now - st.exited_at)
            return
        now = self._clock()
        with self._lock:
            st.failures = self._backoff.failures_after_exit(st.failures, now - st.started_at)
            delay = self._backoff.delay(st.failures)
            st.last_exit_code = code
            st.exited_at = now
            st.next_start = now + delay
            st.state = "waiting"
        log.warning(
            "%s exited with code %s after %.1f s; restart %d in %.1f s",
            name, describe_exit(code), now - st.started_at, st.restarts + 1, delay,
        )  # fmt: skip

    def _maybe_restart(self, name: str, st: ProcessStatus) -> None:
        now = self._clock()
        if now < st.next_start:
            return
        if not self._target.ports_free(name):
            # The old process (or one it left behind) still listens there.
            with self._lock:
                st.next_start = now + self.PORT_RETRY_S
                logged, st.ports_held = st.ports_held, True
            if not logged:
                log.warning(
                    "%s: its ports are still in use; restarting it once they are free", name
                )
            return
        note = f"restart {st.restarts + 1} after exit code {describe_exit(st.last_exit_code)}"
        try:
            self._target.restart(name, note)
        except Exception as exc:  # e.g. the executable went away: back off again
            with self._lock:
                st.failures += 1
                st.next_start = now + self._backoff.delay(st.failures)
            log.error("%s could not be restarted (%s); next try in %.1f s", name, exc,
                      st.next_start - now)  # fmt: skip
            return
        with self._lock:
            st.restarts += 1
            st.ports_held = False
            st.state = "starting"
            st.started_at = self._clock()
        log.warning("%s restarted (%s)", name, note)


# -- the cluster -------------------------------------------------------------
