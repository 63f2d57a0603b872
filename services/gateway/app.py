"""The gateway application: device WebSocket, health, metrics and the speaker API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.config import load_settings
from services.common.grpc_service import configure_logging
from services.common.loop_monitor import LoopLagMonitor
from services.gateway.compute import ComputeClients
from services.gateway.config import GatewaySettings
from services.gateway.connection import serve_device
from services.gateway.session import GatewayContext, SessionHub
from services.gateway.speakers_api import router as speakers_router
from services.gateway.store import SessionStore
from services.gateway.vad_router import VadRouter

log = logging.getLogger(__name__)

DEVICE_PATHS = ("/xiaozhi/v1/", "/xiaozhi/v1")


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub = SessionHub()
        vad = VadRouter(settings.vad_target, hub.on_vad_event, hub.on_vad_lost)
        ctx = GatewayContext(
            settings=settings,
            store=SessionStore(settings.redis_url, settings.session_ttl_s),
            compute=ComputeClients(settings.asr_target, settings.speaker_target),
            vad=vad,
            hub=hub,
        )
        app.state.ctx = ctx
        loop_monitor = LoopLagMonitor("gateway")
        loop_monitor.start()
        vad.start()
        if settings.allow_anonymous:
            log.warning("open mode: devices are accepted without a valid token")
        try:
            yield
        finally:
            await loop_monitor.stop()
            await vad.stop()
            await ctx.compute.close()
            await ctx.store.close()

    app = FastAPI(title="speechfront gateway", lifespan=lifespan)
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
        ctx: GatewayContext = request.app.state.ctx
        checks = {"vad": ctx.vad.any_connected, "redis": await ctx.store.ping()}
        ready = all(checks.values())
        return JSONResponse(
            {"ready": ready, "checks": checks, "sessions": len(ctx.hub.sessions)},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def main() -> None:
    import uvicorn

    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_max_size=1 << 20,
        ws_ping_interval=30,
        ws_ping_timeout=60,
    )
