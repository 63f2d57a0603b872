"""Draining a gateway: stop taking devices, then hand its sessions off in turns."""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from services.gateway.context import GatewayContext
from services.gateway.session import DeviceSession

log = logging.getLogger(__name__)

# The share of the drain over which hand-offs are spread; the rest is for
# sessions that keep talking past their turn.
HANDOFF_SPREAD = 0.5
# The share at the end of the drain kept for the last hand-offs' speech to be
# flushed through the VAD and recognised before their sockets close: a
# session still talking at the end must not get only a moment for that.
SETTLE_SHARE = 0.3
PAUSE_POLL_S = 0.05
# How often the drain looks for sessions that joined after it began (their
# upgrade was accepted just before): each is handed off too, not cut when
# the server stops.
LATE_JOIN_POLL_S = 0.2
# A session heard saying nothing this long is closed without waiting for an
# utterance to end (a device that is not talking). Long enough that a device
# between two sentences is caught at the end of the next one instead: the VAD
# reports a speech start a few hundred milliseconds after it began.
QUIET_S = 4.0


async def hand_off(session: DeviceSession, turn: float, settle_at: float, deadline: float) -> None:
    """Close one session for a reconnect elsewhere, losing nothing it said.

    From ``turn`` on, wait for the moment an utterance of the session ends
    (or for ``QUIET_S`` without speech), stop listening, let its results be
    delivered, then close with 1012 (service restart): the device reconnects
    through the Service to another gateway and goes on there. At
    ``settle_at`` speech still in progress is ended where it is and
    recognised, with until ``deadline`` for its results.
    """
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, turn - loop.time()))
    quiet_since: float | None = loop.time()
    moment = "at its settle time"
    while loop.time() < settle_at:
        if session.vad.in_speech:
            quiet_since = None
        elif quiet_since is None:
            moment = "after an utterance"
            break
        elif loop.time() - quiet_since >= QUIET_S:
            moment = "while quiet"
            break
        await asyncio.sleep(PAUSE_POLL_S)
    session.begin_drain()
    idle = await session.wait_idle(max(1.0, deadline - loop.time()))
    if idle:
        log.info("session %s handed off %s", session.session_id, moment)
    else:
        # Its last results go to the device's undelivered list, or are lost
        # with the VAD streams still open.
        log.warning(
            "session %s handed off %s before its speech was done (%s)",
            session.session_id,
            moment,
            session.unfinished(),
        )
    await session.close_for_restart()


async def drain(ctx: GatewayContext) -> None:
    """Stop taking devices, then hand the sessions off one after another.

    Runs before uvicorn's own shutdown, which would otherwise close every
    WebSocket at once the moment SIGTERM arrives. New upgrades get 503 and
    /readyz says not ready at once. The sessions are handed off in turns
    spread over the first half of ``drain_timeout_s`` (so their devices
    reconnect to the other gateways a few at a time, not all in the same
    instant), each at a pause in its speech (``hand_off``); a session whose
    hello completes after the drain began is handed off as it appears.
    """
    ctx.draining = True
    sessions = list(ctx.hub.sessions.values())
    log.info("draining %d sessions", len(sessions))
    loop = asyncio.get_running_loop()
    now = loop.time()
    timeout = ctx.settings.drain_timeout_s
    step = timeout * HANDOFF_SPREAD / max(1, len(sessions))
    deadline = now + timeout
    settle_at = deadline - timeout * SETTLE_SHARE
    handing = {
        s.session_id: (s, asyncio.create_task(hand_off(s, now + i * step, settle_at, deadline)))
        for i, s in enumerate(sessions)
    }
    try:
        # Admitted connections include upgrades still waiting for their hello
        # (and compatible-API calls, which finish meanwhile).
        while loop.time() < deadline and (
            ctx.connections.total or not all(task.done() for _, task in handing.values())
        ):
            for session in list(ctx.hub.sessions.values()):
                if session.session_id not in handing:
                    late = asyncio.create_task(hand_off(session, now, settle_at, deadline))
                    handing[session.session_id] = (session, late)
            await asyncio.sleep(LATE_JOIN_POLL_S)
    finally:
        outcomes = await asyncio.gather(
            *(task for _, task in handing.values()), return_exceptions=True
        )
    for (session, _), outcome in zip(handing.values(), outcomes, strict=True):
        if isinstance(outcome, Exception):
            log.warning("hand-off of session %s failed: %s", session.session_id, outcome)
    log.info(
        "drained %d sessions (%d joined during the drain)",
        len(handing),
        len(handing) - len(sessions),
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the gateway before shutting down."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        ctx = getattr(self._app.state, "ctx", None)
        if self._drain is not None or ctx is None:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        loop = asyncio.get_event_loop()
        self._drain = loop.create_task(drain(ctx))
        self._drain.add_done_callback(lambda _: super(DrainingServer, self).handle_exit(sig, None))
