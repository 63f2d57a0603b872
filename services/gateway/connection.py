"""One device WebSocket from handshake to close."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from services.common.audio import SAMPLE_RATE
from services.gateway import metrics
from services.gateway.auth import TokenRefused, split_token, verify_token
from services.gateway.context import GatewayContext
from services.gateway.device_link import DeviceLink
from services.gateway.errors import (
    GOING_AWAY,
    INTERNAL_ERROR,
    POLICY_VIOLATION,
    ConnectionRejected,
)
from services.gateway.framing import PayloadType, decode_frame, parse_protocol_version
from services.gateway.http_guards import BINARY_SINK, BinarySink
from services.gateway.limits import (
    ConnectionCounts,
    InputGuard,
    InputLimits,
    validate_audio_params,
)
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

    def identity(name: str) -> str:
        # One claim only: a header and a query parameter naming different ids are refused.
        header, param = (headers.get(name) or "").strip(), (query.get(name) or "").strip()
        if header and param and header != param:
            raise ConnectionRejected(
                POLICY_VIOLATION, f"{name} header and query parameter disagree"
            )
        return header or param

    token = pick("authorization") or pick("token")
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    return Handshake(
        device_id=identity("device-id"),
        client_id=identity("client-id"),
        token=token,
        protocol_version=parse_protocol_version(pick("protocol-version") or None),
    )


async def authorize(ctx: GatewayContext, handshake: Handshake) -> None:
    """Admit the device its token was issued to, and only that one.

    A per-device token (``auth.py``) is checked against the Device-Id and
    Client-Id presented, so the session's device is the one the token is bound
    to. Shared tokens (``SF_GATEWAY_AUTH_TOKENS``, Redis ``sf:auth:tokens``)
    admit any Device-Id and count only with ``allow_shared_tokens`` (testing).
    """
    if not handshake.device_id:
        raise ConnectionRejected(POLICY_VIOLATION, "Device-Id header or device-id query required")
    settings = ctx.settings
    if settings.allow_anonymous:
        return
    token = handshake.token
    if not token:
        raise ConnectionRejected(POLICY_VIOLATION, "unauthorized: missing token")
    refusal = "invalid token"
    secret = settings.auth_secret.get_secret_value()
    if secret and split_token(token) is not None:
        try:
            verify_token(
                secret,
                token,
                handshake.client_id,
                handshake.device_id,
                max_age_s=settings.auth_token_max_age_s,
            )
            return
        except TokenRefused as exc:
            refusal = exc.reason
    if settings.allow_shared_tokens:
        if token in settings.auth_tokens or await ctx.store.token_is_valid(token):
            return
    elif token in settings.auth_tokens:
        refusal = "shared tokens are off (SF_GATEWAY_ALLOW_SHARED_TOKENS); use a device token"
    raise ConnectionRejected(POLICY_VIOLATION, f"unauthorized: {refusal}")


def client_address(ctx: GatewayContext, websocket: WebSocket) -> str:
    """The client's address: the socket peer, or what a trusted proxy says it is."""
    header = ctx.settings.client_address_header
    if header and (forwarded := websocket.headers.get(header)):
        return forwarded.split(",")[0].strip()
    return websocket.client.host if websocket.client else ""


def credential_key(websocket: WebSocket) -> str:
    try:
        return ConnectionCounts.token_key(read_handshake(websocket).token)
    except ConnectionRejected:
        return ""


async def admit(ctx: GatewayContext, websocket: WebSocket, token_key: str, address: str) -> bool:
    """Refuse the upgrade with HTTP 503 when draining, full, or when this credential or
    address holds its share already: clients back off and retry."""
    outcome = "refused_full"
    if ctx.draining:
        reason, outcome = "gateway is draining", "refused_draining"
    elif ctx.connections.total >= ctx.settings.max_sessions:
        reason = "gateway at its session limit"
    elif (capped := ctx.connections.refusal(token_key, address)) is not None:
        reason, outcome = capped, "refused_cap"
    else:
        return True
    metrics.CONNECTIONS.labels(outcome).inc()
    await websocket.send_denial_response(
        JSONResponse({"error": reason}, status_code=503, headers={"Retry-After": "5"})
    )
    return False


async def serve_device(ctx: GatewayContext, websocket: WebSocket) -> None:
    token_key, address = credential_key(websocket), client_address(ctx, websocket)
    if not await admit(ctx, websocket, token_key, address):
        return
    ctx.connections.add(token_key, address)
    try:
        await _serve_admitted(ctx, websocket)
    finally:
        ctx.connections.remove(token_key, address)


async def _serve_admitted(ctx: GatewayContext, websocket: WebSocket) -> None:
    await websocket.accept()
    session: DeviceSession | None = None
    try:
        handshake = read_handshake(websocket)
        await authorize(ctx, handshake)
        hello = await _await_hello(ctx, websocket, handshake.protocol_version)
        validate_audio_params(hello)
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
        replaced = ctx.hub.add(session)
        if replaced is not None:
            await ctx.hub.replace(replaced)
        else:
            await ctx.hub.announce(session)
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
        guard = InputGuard(
            InputLimits(
                frames_per_s=settings.max_frames_per_s,
                audio_realtime_factor=settings.max_audio_speed,
                text_messages_per_s=settings.max_text_messages_per_s,
                text_bytes_per_s=settings.max_text_bytes_per_s,
            )
        )
        await _receive_loop(
            websocket, session, decoder, handshake.protocol_version, guard, settings.idle_timeout_s
        )
    except ConnectionRejected as exc:
        await _reject(websocket, exc, exc.label if session else f"handshake_{exc.label}")
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("connection failed")
        await _close(websocket, INTERNAL_ERROR, "internal error")
    finally:
        if session is not None:
            ctx.hub.remove(session)
            await session.close()
            await ctx.hub.closed(session)


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


class IdleWatch:
    """Closes a connection with 1001 once ``idle_for()`` (its session's seconds
    without activity, backend replies included) reaches ``timeout_s``.

    One timer per connection, due when the session would turn idle if nothing
    happened meanwhile; when it fires it re-arms from the last activity, so a
    listening device costs one timer callback per timeout instead of a
    deadline around every receive (``asyncio.timeout`` per 60 ms packet was
    about a tenth of the gateway's CPU: a timer handle each, and under 3.11
    a getpid system call in every ``get_running_loop``).
    """

    def __init__(
        self,
        idle_for: Callable[[], float],
        timeout_s: float,
        reject: Callable[[ConnectionRejected], Awaitable[None]],
    ) -> None:
        self._idle_for = idle_for
        self._timeout_s = timeout_s
        self._reject = reject
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self._arm(timeout_s - idle_for())

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        self._timer = self._loop.call_later(max(delay, 0.0), self._check)

    def _check(self) -> None:
        remaining = self._timeout_s - self._idle_for()
        if remaining > 0:
            self._arm(remaining)
            return
        self._timer = None
        self._closing = self._loop.create_task(self._expire())

    async def _expire(self) -> None:
        # The receive loop ends on the disconnect the close brings, as for a
        # connection replaced by a newer one.
        idle = ConnectionRejected(GOING_AWAY, f"idle for {self._timeout_s:.0f} s")
        await self._reject(idle)


class Inbound:
    """What a device sends after its hello, checked and handed to its session.

    Audio frames are handled whole without awaiting, so the server's protocol
    may hand them over as it parses them (``BINARY_SINK``) while the receive
    loop waits; the loop takes text, JSON frames and the disconnect, and raises
    what a handed-over frame raised (a limit, a bad frame), so every refusal
    closes the connection the same way.
    """

    def __init__(
        self,
        session: DeviceSession,
        decoder: OpusStreamDecoder,
        version: int,
        guard: InputGuard,
    ) -> None:
        self._session = session
        self._decoder = decoder
        self._version = version
        self._guard = guard
        # The receive loop waits for the next message: frames may be taken now.
        self.parked = False
        self.failure: Exception | None = None

    def take(self, data: bytes) -> bool:
        """The sink: handle an audio frame now, or leave it (and anything else) to the loop."""
        if not self.parked or self.failure is not None:
            return False
        try:
            frame = decode_frame(self._version, data)
            if frame.type is not PayloadType.OPUS:
                return False
            self._audio(frame.payload)
        except Exception as exc:
            # Queued, the frame wakes the loop, which raises this.
            self.failure = exc
            return False
        return True

    async def binary(self, data: bytes) -> None:
        frame = decode_frame(self._version, data)
        if frame.type is PayloadType.JSON:
            await self.text(frame.payload)
        else:
            self._audio(frame.payload)

    async def text(self, text: str | bytes) -> None:
        self._guard.text(len(text))
        await self._session.handle_message(parse_message(text))

    def _audio(self, packet: bytes) -> None:
        guard = self._guard
        guard.frame()
        pcm = self._decoder.decode(packet)
        guard.audio(len(pcm) / (2 * SAMPLE_RATE))
        self._session.handle_audio(pcm)


async def _receive_loop(
    websocket: WebSocket,
    session: DeviceSession,
    decoder: OpusStreamDecoder,
    version: int,
    guard: InputGuard,
    idle_timeout_s: float,
) -> None:
    inbound = Inbound(session, decoder, version, guard)
    # Only uvicorn with GuardedWebSocketProtocol offers it (not the test client).
    register: Callable[[BinarySink | None], None] | None = websocket.scope.get(
        "extensions", {}
    ).get(BINARY_SINK)
    if register is not None:
        register(inbound.take)
    watch = IdleWatch(session.idle_for, idle_timeout_s, lambda idle: _reject(websocket, idle))
    try:
        while True:
            inbound.parked = True
            raw = await websocket.receive()
            inbound.parked = False
            if inbound.failure is not None:
                raise inbound.failure
            if raw["type"] == "websocket.disconnect":
                return
            data = raw.get("bytes")
            if data is not None:
                await inbound.binary(data)
            elif (text := raw.get("text")) is not None:
                await inbound.text(text)
    finally:
        inbound.parked = False
        watch.cancel()
        if register is not None:
            register(None)


async def _reject(websocket: WebSocket, exc: ConnectionRejected, label: str = "") -> None:
    """Close with the refusal's code and reason, counted under ``label``."""
    metrics.CLOSES.labels(label or exc.label).inc()
    log.info("closing connection: %s", exc.reason)
    await _close(websocket, exc.code, exc.reason)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.client_state is WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(code=code, reason=reason)
