"""The gateway application: device WebSocket, health, metrics and the speaker API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.config import load_settings
from services.common.grpc_service import configure_logging
from services.common.loop_monitor import LoopLagMonitor
from services.gateway.compute import ComputeClients
from services.gateway.config import GatewaySettings
from services.gateway.connection import serve_device
from services.gateway.context import GatewayContext
from services.gateway.hub import SessionHub
from services.gateway.recognition import Recognizer
from services.gateway.speakers_api import router as speakers_router
from services.gateway.store import SessionStore
from services.gateway.vad_router import VadRouter

log = logging.getLogger(__name__)

DEVICE_PATHS = ("/xiaozhi/v1/", "/xiaozhi/v1")


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = SessionStore(
            settings.redis_url, settings.session_ttl_s, settings.redis_max_connections
        )
        hub = SessionHub(store, settings.gateway_id)
        vad = VadRouter(
            settings.vad_target,
            hub.on_vad_event,
            hub.on_vad_lost,
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
        loop_monitor = LoopLagMonitor("gateway")
        loop_monitor.start()
        store.start()
        hub.start()
        vad.start()
        compute.start()
        if settings.allow_anonymous:
            log.warning("open mode: devices are accepted without a valid token")
        try:
            yield
        finally:
            await loop_monitor.stop()
            await hub.stop()
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
        """Ready while VAD is reachable and not draining. Without Redis the gateway
        still recognises speech (state is written once Redis is back), so it stays
        ready but reports itself degraded."""
        ctx: GatewayContext = request.app.state.ctx
        checks = {"vad": ctx.vad.any_connected, "redis": ctx.store.up, "draining": ctx.draining}
        ready = checks["vad"] and not ctx.draining
        status = "draining" if ctx.draining else "ready" if ready else "not_ready"
        if ready and not checks["redis"]:
            status = "degraded"
        return JSONResponse(
            {"ready": ready, "status": status, "checks": checks, "sessions": len(ctx.hub.sessions)},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def drain(ctx: GatewayContext) -> None:
    """Stop taking devices, finish what they said, then tell them to reconnect elsewhere.

    Runs before uvicorn's own shutdown, which would otherwise close every
    WebSocket at once the moment SIGTERM arrives.
    """
    ctx.draining = True
    sessions = list(ctx.hub.sessions.values())
    log.info("draining %d sessions", len(sessions))
    for session in sessions:
        session.begin_drain()
    timeout = ctx.settings.drain_timeout_s
    await asyncio.gather(*(session.wait_idle(timeout) for session in sessions))
    await asyncio.gather(*(session.close_for_restart() for session in sessions))
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


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_max_size=1 << 20,
        ws_ping_interval=30,
        ws_ping_timeout=60,
        timeout_graceful_shutdown=5,
    )
    DrainingServer(config, app).run()
