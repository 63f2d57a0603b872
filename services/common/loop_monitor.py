"""Event-loop lag: how late a timer fires. A blocked loop delays every device at once."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Gauge, Histogram

from services.common.tasks import cancel_and_wait

LOOP_LAG = Histogram(
    "speechfront_event_loop_lag_seconds",
    "How late a periodic timer fired on the service's event loop.",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
LOOP_LAG_MAX = Gauge(
    "speechfront_event_loop_lag_max_seconds",
    "Largest event-loop lag seen in the last interval.",
    ["service"],
)


class LoopLagMonitor:
    def __init__(self, service: str, interval_s: float = 0.1, report_every_s: float = 5.0) -> None:
        self._service = service
        self._interval = interval_s
        self._report_every = report_every_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self._service}-loop-lag")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        histogram = LOOP_LAG.labels(self._service)
        worst, window_start = 0.0, time.monotonic()
        while True:
            expected = time.monotonic() + self._interval
            await asyncio.sleep(self._interval)
            lag = max(0.0, time.monotonic() - expected)
            histogram.observe(lag)
            worst = max(worst, lag)
            if time.monotonic() - window_start >= self._report_every:
                LOOP_LAG_MAX.labels(self._service).set(worst)
                worst, window_start = 0.0, time.monotonic()
