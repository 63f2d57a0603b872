"""Idle closes: 1001 "idle" once a session has done nothing for the idle timeout,
counted from its last activity, whatever kept it active before."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.websockets import WebSocketDisconnect
from test_connection_caps import HELLO, gateway, headers

from services.gateway.connection import IdleWatch
from services.gateway.errors import ConnectionRejected


class Activity:
    def __init__(self) -> None:
        self.last = time.monotonic()
        self.closes: list[tuple[float, int, str]] = []

    def idle_for(self) -> float:
        return time.monotonic() - self.last

    async def close(self, idle: ConnectionRejected) -> None:
        self.closes.append((time.monotonic(), idle.code, idle.reason))


async def test_activity_postpones_the_close_to_a_timeout_after_the_last_of_it() -> None:
    activity = Activity()
    # Activity four times per timeout: only a loop stalled for most of a timeout
    # (seen on a busy 2-core machine at shorter scales) could close it early.
    watch = IdleWatch(activity.idle_for, 1.0, activity.close)
    try:
        # Active (device messages or backend replies) for three timeouts.
        for _ in range(12):
            await asyncio.sleep(0.25)
            activity.last = time.monotonic()
        assert activity.closes == []
        last = activity.last
        await asyncio.sleep(2.0)
    finally:
        watch.cancel()
    assert len(activity.closes) == 1
    closed_at, code, reason = activity.closes[0]
    assert code == 1001 and reason.startswith("idle for")
    assert 1.0 <= closed_at - last < 1.5


async def test_a_cancelled_watch_never_closes() -> None:
    activity = Activity()
    watch = IdleWatch(activity.idle_for, 0.05, activity.close)
    watch.cancel()
    await asyncio.sleep(0.15)
    assert activity.closes == []


def test_a_device_that_keeps_sending_is_not_closed_until_it_stops() -> None:
    with (
        gateway(idle_timeout_s=0.5) as client,
        client.websocket_connect("/xiaozhi/v1/", headers=headers("chatty")) as ws,
    ):
        ws.send_json(HELLO)
        ws.receive_json()
        for _ in range(8):  # 1.6 s, three timeouts
            time.sleep(0.2)
            ws.send_json({"type": "listen", "state": "detect", "text": "hi"})
        last = time.monotonic()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        waited = time.monotonic() - last
    assert closed.value.code == 1001 and "idle" in closed.value.reason
    assert 0.4 < waited < 3
