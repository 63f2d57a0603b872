"""The gateway application: device WebSocket, health, metrics and the speaker API."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from services.common.config import load_settings
from services.common.grpc_service import configure_logging
from services.common.logging_filter import RedactSecrets
from services.common.loop_monitor import LoopLagMonitor
from services.gateway import metrics as gateway_metrics
from services.gateway.compat.funasr_server import FunasrRuntime, FunasrServer
from services.gateway.compat.http import CompatHttp
from services.gateway.compute import ComputeClients
from services.gateway.config import GatewaySettings
from services.gateway.connection import serve_device
from services.gateway.context import GatewayContext
from services.gateway.deletion_cost import DeletionCost, in_cluster
from services.gateway.hub import SessionHub
from services.gateway.recognition import Recognizer
from services.gateway.session import DeviceSession
from services.gateway.speakers_api import AdminRequestGuard
from services.gateway.speakers_api import router as speakers_router
from services.gateway.store import SessionStore
from services.gateway.vad_client import VAD_STALLS, VadStreamClient
from services.gateway.vad_router import VadRouter

log = logging.getLogger(__name__)

MAX_SESSIONS = Gauge(
    "speechfront_gateway_max_sessions",
    "Sessions this gateway admits at most (SF_GATEWAY_MAX_SESSIONS); with "
    "speechfront_gateway_sessions, how full it is.",
)

DEVICE_PATHS = ("/xiaozhi/v1/", "/xiaozhi/v1")
# Outcomes that alerts count from their first occurrence: a counter series
# born at 1 shows no increase to rate(), so they exist at 0 from the start.
COUNTED_OUTCOMES = ("ok", "asr_error", "overloaded", "dropped_backlog", "truncated")
VAD_STALL_SIGNS = ("health", "progress")


def _initialise_counters() -> None:
    for outcome in COUNTED_OUTCOMES:
        gateway_metrics.UTTERANCES.labels(outcome)
    for sign in VAD_STALL_SIGNS:
        VAD_STALLS.labels(sign)


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = SessionStore(
            settings.redis_url, settings.session_ttl_s, settings.redis_max_connections
        )
        hub = SessionHub(store, settings.gateway_id)
        # The FunASR, OpenAI and voiceprint APIs' VAD streams (services/gateway/compat/).
        compat = FunasrRuntime(settings.funasr_max_partials)

        def on_vad_lost(client: VadStreamClient) -> None:
            hub.on_vad_lost(client)
            compat.segmenters.on_vad_lost(client)

        vad = VadRouter(
            settings.vad_target,
            hub.on_vad_event,
            on_vad_lost,
            progress_timeout_s=settings.vad_progress_timeout_s,
        )
        compute = ComputeClients(settings.asr_target, settings.speaker_target)
        ctx = GatewayContext(
            settings=settings,
            store=store,
            compute=compute,
            vad=vad,
            hub=hub,
            recognizer=Recognizer(settings, compute, store),
        )
        app.state.ctx = ctx
        app.state.compat = compat
        MAX_SESSIONS.set(settings.max_sessions)
        _initialise_counters()
        # In a Kubernetes pod: scale-in removes the gateways with fewest sessions.
        pod = in_cluster(settings.gateway_id)
        deletion_cost = None if pod is None else DeletionCost(pod, lambda: len(hub.sessions))
        if deletion_cost is not None:
            deletion_cost.start()
        loop_monitor = LoopLagMonitor("gateway")
        loop_monitor.start()
        store.start()
        hub.start()
        vad.start()
        compute.start()
        funasr = FunasrServer(ctx, compat) if settings.funasr_port else None
        if funasr is not None:
            await funasr.start()
        if settings.allow_anonymous:
            log.warning("open mode: devices are accepted without a valid token")
        try:
            yield
        finally:
            if deletion_cost is not None:
                await deletion_cost.stop()
            if funasr is not None:
                await funasr.stop()
            await loop_monitor.stop()
            await hub.stop()
            await vad.stop()
            await ctx.compute.close()
            await ctx.store.close()

    # The API description is for developers, not for the device port.
    docs = settings.api_docs
    app = FastAPI(
        title="speechfront gateway",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(AdminRequestGuard, settings=settings)
    # Outermost: the OpenAI and voiceprint-api routes, with their own keys and error shapes.
    app.add_middleware(CompatHttp, settings=settings)
    app.include_router(speakers_router)

    async def device_socket(websocket: WebSocket) -> None:
        await serve_device(websocket.app.state.ctx, websocket)

    for path in DEVICE_PATHS:
        app.add_api_websocket_route(path, device_socket)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Ready unless draining: readiness is this gateway's own state only.

        A VAD or Redis outage is shared by every gateway; were it to fail
        readiness, every gateway would leave the Service at once and devices
        could not even connect. Each dependency is reported in ``checks`` and
        as ``degraded``, and each gateway copes with it (sessions wait for a
        VAD replica, Redis writes are replayed)."""
        ctx: GatewayContext = request.app.state.ctx
        checks = {"vad": ctx.vad.any_connected, "redis": ctx.store.up, "draining": ctx.draining}
        ready = not ctx.draining
        status = "draining" if ctx.draining else "ready"
        if ready and not (checks["vad"] and checks["redis"]):
            status = "degraded"
        return JSONResponse(
            {"ready": ready, "status": status, "checks": checks, "sessions": len(ctx.hub.sessions)},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


# The share of the drain over which hand-offs are spread; the rest is for
# sessions that keep talking past their turn.
HANDOFF_SPREAD = 0.5
PAUSE_POLL_S = 0.05
# A session heard saying nothing this long is closed without waiting for an
# utterance to end (a device that is not talking). Long enough that a device
# between two sentences is caught at the end of the next one instead: the VAD
# reports a speech start a few hundred milliseconds after it began.
QUIET_S = 4.0


async def hand_off(session: DeviceSession, turn: float, deadline: float) -> None:
    """Close one session for a reconnect elsewhere, losing nothing it said.

    From ``turn`` on, wait for the moment an utterance of the session ends
    (or for ``QUIET_S`` without speech), stop listening, let its results be
    delivered, then close with 1012 (service restart): the device reconnects
    through the Service to another gateway and goes on there. At
    ``deadline`` speech still in progress is ended where it is and
    recognised, as a drain always did.
    """
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, turn - loop.time()))
    quiet_since: float | None = loop.time()
    while loop.time() < deadline:
        if session.vad.in_speech:
            quiet_since = None
        elif quiet_since is None or loop.time() - quiet_since >= QUIET_S:
            break  # an utterance has just ended, or the device is not talking
        await asyncio.sleep(PAUSE_POLL_S)
    session.begin_drain()
    await session.wait_idle(max(1.0, deadline - loop.time()))
    await session.close_for_restart()


async def drain(ctx: GatewayContext) -> None:
    """Stop taking devices, then hand the sessions off one after another.

    Runs before uvicorn's own shutdown, which would otherwise close every
    WebSocket at once the moment SIGTERM arrives. New upgrades get 503 and
    /readyz says not ready at once. The sessions are handed off in turns
    spread over the first half of ``drain_timeout_s`` (so their devices
    reconnect to the other gateways a few at a time, not all in the same
    instant), each at a pause in its speech (``hand_off``).
    """
    ctx.draining = True
    sessions = list(ctx.hub.sessions.values())
    log.info("draining %d sessions", len(sessions))
    loop = asyncio.get_running_loop()
    now = loop.time()
    timeout = ctx.settings.drain_timeout_s
    step = timeout * HANDOFF_SPREAD / max(1, len(sessions))
    deadline = now + timeout
    outcomes = await asyncio.gather(
        *(hand_off(s, now + i * step, deadline) for i, s in enumerate(sessions)),
        return_exceptions=True,
    )
    for session, outcome in zip(sessions, outcomes, strict=True):
        if isinstance(outcome, Exception):
            log.warning("hand-off of session %s failed: %s", session.session_id, outcome)
    log.info("drained")


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


# -- the HTTP server ------------------------------------------------------------

# A request's line and headers. Firmware sends a few hundred bytes, a proxy adds
# a few headers. Both stay under websockets' own limits (8 KiB per line, 128
# headers), so an upgrade handed on to it is never refused there.
MAX_HEAD_BYTES = 8 * 1024
MAX_HEADERS = 100


def _plain_response(status: int, text: str) -> bytes:
    body = text.encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on each request's head.

    uvicorn bounds neither the time a client takes to send a request's line
    and headers nor their size: a client that sends half a request and stops
    (slowloris), or an endless header, keeps its socket and its buffer for
    ever. Here a head must arrive within ``head_timeout_s`` of the connection
    (of the request's first byte, on a kept-alive connection) and stay within
    MAX_HEAD_BYTES and MAX_HEADERS; otherwise the client gets 408 or 431 and
    the socket is closed. ``guarded_http_protocol`` sets the timeout.
    """

    head_timeout_s = 10.0

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # the bytes arriving belong to a request's head
        self._head_bytes = 0  # its line and headers, as parsed
        self._head_fed = 0  # bytes fed to the parser while it was in that head
        self._headers = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if self._head_timer is None:
                self._arm()
            # The parser keeps an unfinished header whole: bound what it holds.
            if self._head_fed > MAX_HEAD_BYTES:
                self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
                return
            self._head_fed += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._headers = True, 0, 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._count(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._count(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head, self._head_fed = False, 0
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        # What follows is the next request's head; its first byte starts its timer.
        self._in_head = True
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        if not self._refused:
            super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        if not self._refused and not self.transport.is_closing():
            super().send_400_response(msg)

    def _count(self, size: int) -> bool:
        """Add to the head's size; False once the request has been refused."""
        if self._refused:
            return False
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
        elif self._headers > MAX_HEADERS:
            self._refuse(431, f"over {MAX_HEADERS} request headers")
        return not self._refused

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, f"request head not received within {self.head_timeout_s:g} s")

    def _refuse(self, status: int, reason: str) -> None:
        self._refused = True
        self._disarm()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("refused a request from %s: %d %s", client, status, reason)
        if not self.transport.is_closing():
            self.transport.write(_plain_response(status, reason + "\n"))
            self.transport.close()


def guarded_http_protocol(head_timeout_s: float) -> type[GuardedHttpProtocol]:
    class Configured(GuardedHttpProtocol):
        pass

    Configured.head_timeout_s = head_timeout_s
    return Configured


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol, closing cleanly where it would not.

    - When websockets refuses the handshake request itself (a header line over
      its limit, too many headers, a request it cannot parse), uvicorn neither
      sends websockets' answer nor closes the socket.
    - A text message that is not UTF-8 is closed with 1007 as it should be,
      but uvicorn logs a traceback for each one; here it is closed with a reason
      and nothing is logged (the client's mistake, not the server's).
    """

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (
            not self.handshake_initiated
            and self.conn.handshake_exc is not None
            and not self.transport.is_closing()
        ):
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.frames = []
                self.conn.send_close(1007, "text message is not valid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()


def log_config() -> dict[str, Any]:
    """uvicorn's logging, with credentials redacted from every line it writes."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": RedactSecrets}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    return config


def server_config(app: FastAPI, settings: GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_http_protocol(settings.handshake_timeout_s),
        ws=GuardedWebSocketProtocol,
        log_config=log_config(),
        log_level=settings.log_level.lower(),
        ws_max_size=1 << 20,
        # Opus does not compress, and permessage-deflate costs ~34 kB of zlib
        # state per connection that offers it (firmware does not; browsers and
        # the websockets client do).
        ws_per_message_deflate=False,
        ws_ping_interval=30,
        ws_ping_timeout=60,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level)
    app = create_app(settings)
    DrainingServer(server_config(app, settings), app).run()
