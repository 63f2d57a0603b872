"""The gateway application: device WebSocket, health, metrics and the speaker API."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from services.common.config import load_settings
from services.common.grpc_service import configure_logging
from services.common.loop_monitor import LoopLagMonitor
from services.gateway import metrics as gateway_metrics
from services.gateway.compat.funasr_server import FunasrRuntime, FunasrServer
from services.gateway.compat.http import CompatHttp
from services.gateway.compute import ComputeClients
from services.gateway.config import GatewaySettings
from services.gateway.connection import serve_device
from services.gateway.context import GatewayContext
from services.gateway.deletion_cost import DeletionCost, in_cluster
from services.gateway.drain import DrainingServer
from services.gateway.http_guards import GuardedWebSocketProtocol, guarded_http_protocol, log_config
from services.gateway.hub import SessionHub
from services.gateway.recognition import Recognizer
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


# -- the HTTP server ------------------------------------------------------------


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
        # After the drain: utterances of the last hand-offs still being
        # recognised finish (their results reach the devices' new sessions)
        # rather than die with the process.
        timeout_graceful_shutdown=math.ceil(max(settings.asr_timeout_s, settings.speaker_timeout_s))
        + 5,
    )


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level)
    app = create_app(settings)
    DrainingServer(server_config(app, settings), app).run()
