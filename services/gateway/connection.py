"""One device WebSocket from handshake to close."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from services.gateway import metrics
from services.gateway.context import GatewayContext
from services.gateway.device_link import DeviceLink
from services.gateway.errors import (
    INTERNAL_ERROR,
    POLICY_VIOLATION,
    ConnectionRejected,
)
from services.gateway.framing import PayloadType, decode_frame, parse_protocol_version
from services.gateway.messages import declared_frame_duration, hello_reply, parse_message
from services.gateway.opus import OpusStreamDecoder
from services.gateway.session import DeviceSession, new_session_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handshake:
    device_id: str
    client_id: str
    token: str
    protocol_version: int


def read_handshake(websocket: WebSocket) -> Handshake:
    """Headers as firmware sends them, or query parameters for clients that cannot set headers."""
    headers, query = websocket.headers, websocket.query_params

    def pick(name: str) -> str:
        return (headers.get(name) or query.get(name) or "").strip()

    token = pick("authorization") or pick("token")
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    return Handshake(
        device_id=pick("device-id"),
        client_id=pick("client-id"),
        token=token,
        protocol_version=parse_protocol_version(pick("protocol-version") or None),
    )


async def authorize(ctx: GatewayContext, handshake: Handshake) -> None:
    if not handshake.device_id:
        raise ConnectionRejected(POLICY_VIOLATION, "Device-Id header or device-id query required")
    if ctx.settings.allow_anonymous:
        return
    if handshake.token and (
        handshake.token in ctx.settings.auth_tokens
        or await ctx.store.token_is_valid(handshake.token)
    ):
        return
    raise ConnectionRejected(POLICY_VIOLATION, "unauthorized: missing or invalid token")


async def admit(ctx: GatewayContext, websocket: WebSocket) -> bool:
    """Refuse the upgrade with HTTP 503 when draining or full: clients back off and retry."""
    if ctx.draining:
        reason = "gateway is draining"
    elif len(ctx.hub.sessions) >= ctx.settings.max_sessions:
        reason = "gateway at its session limit"
    else:
        return True
    metrics.CONNECTIONS.labels("refused_" + ("draining" if ctx.draining else "full")).inc()
    await websocket.send_denial_response(
        JSONResponse({"error": reason}, status_code=503, headers={"Retry-After": "5"})
    )
    return False


async def serve_device(ctx: GatewayContext, websocket: WebSocket) -> None:
    if not await admit(ctx, websocket):
        return
    await websocket.accept()
    session: DeviceSession | None = None
    try:
        handshake = read_handshake(websocket)
        await authorize(ctx, handshake)
        hello = await _await_hello(ctx, websocket, handshake.protocol_version)
        decoder = OpusStreamDecoder(declared_frame_duration(hello))
        link = DeviceLink(
            websocket.send_text,
            websocket.send_bytes,
            lambda code, reason: _close(websocket, code, reason),
            handshake.protocol_version,
        )
        session = DeviceSession(
            ctx,
            link,
            session_id=new_session_id(),
            device_id=handshake.device_id,
            client_id=handshake.client_id,
        )
        ctx.hub.add(session)
        metrics.CONNECTIONS.labels("accepted").inc()
        settings = ctx.settings
        await websocket.send_text(
            json.dumps(
                hello_reply(
                    session.session_id, settings.downlink_sample_rate, settings.downlink_frame_ms
                )
            )
        )
        session.record_connected(handshake.client_id, handshake.protocol_version, hello)
        await session.deliver_undelivered()
        limiter = FrameRateLimiter(ctx.settings.max_frames_per_s)
        await _receive_loop(websocket, session, decoder, handshake.protocol_version, limiter)
    except ConnectionRejected as exc:
        metrics.CLOSES.labels(exc.label if session else f"handshake_{exc.label}").inc()
        log.info("closing connection: %s", exc.reason)
        await _close(websocket, exc.code, exc.reason)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("connection failed")
        await _close(websocket, INTERNAL_ERROR, "internal error")
    finally:
        if session is not None:
            ctx.hub.remove(session)
            await session.close()


async def _await_hello(ctx: GatewayContext, websocket: WebSocket, version: int) -> dict[str, Any]:
    try:
        raw = await asyncio.wait_for(websocket.receive(), ctx.settings.hello_timeout_s)
    except TimeoutError:
        raise ConnectionRejected(POLICY_VIOLATION, "no hello within the timeout") from None
    if raw["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(raw.get("code", 1000))
    text = raw.get("text")
    if text is None:
        raise ConnectionRejected(POLICY_VIOLATION, "expected a hello message before audio")
    message = parse_message(text)
    if message["type"] != "hello":
        raise ConnectionRejected(POLICY_VIOLATION, f"expected hello, got {message['type']!r}")
    transport = message.get("transport", "websocket")
    if transport != "websocket":
        raise ConnectionRejected(POLICY_VIOLATION, f"unsupported transport {transport!r}")
    return message


class FrameRateLimiter:
    """Audio frames per second, averaged over a short window: a device sends about 17."""

    def __init__(self, max_per_s: int, window_s: float = 2.0) -> None:
        self._budget = max_per_s * window_s
        self._window_s = window_s
        self._window_start = time.monotonic()
        self._count = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= self._window_s:
            self._window_start, self._count = now, 0
        self._count += 1
        return self._count <= self._budget


async def _receive_loop(
    websocket: WebSocket,
    session: DeviceSession,
    decoder: OpusStreamDecoder,
    version: int,
    limiter: FrameRateLimiter,
) -> None:
    while True:
        raw = await websocket.receive()
        if raw["type"] == "websocket.disconnect":
            return
        data = raw.get("bytes")
        if data is not None:
            frame = decode_frame(version, data)
            if frame.type is PayloadType.JSON:
                await session.handle_message(
                    parse_message(frame.payload.decode("utf-8", "replace"))
                )
            else:
                if not limiter.allow():
                    raise ConnectionRejected(POLICY_VIOLATION, "audio frame rate over the limit")
                session.handle_audio(decoder.decode(frame.payload))
        elif raw.get("text") is not None:
            await session.handle_message(parse_message(raw["text"]))


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.client_state is WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(code=code, reason=reason)
