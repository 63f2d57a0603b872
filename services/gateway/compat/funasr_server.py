"""FunASR's runtime WebSocket protocol on its own port, served by the cluster.

A FunASR connection is one more kind of gateway session: it is admitted and
counted with the devices (``admit``, ``ConnectionCounts``), its audio goes
through the gateway's shared VAD stream and its segments through the shared,
batched ASR and speaker services. The port has its own uvicorn server in the
gateway's process and event loop (``FunasrServer``), started and stopped by
the gateway app's lifespan.

Protocol (see FunASR's ``funasr_wss_client.py`` and xiaozhi-esp32-server's
``fun_server`` provider): a JSON config message with ``mode``, binary PCM,
then ``{"is_speaking": false}`` (optionally ``"is_end": true``, which is
acknowledged); several inputs may follow on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

from services.gateway.compat import metrics
from services.gateway.compat.audio_files import NotAudio, TooLong
from services.gateway.compat.funasr_config import parse_config, parse_text
from services.gateway.compat.funasr_input import FileTooBig, FunasrInput, PartialGate
from services.gateway.compat.keys import bearer_key, key_accepted, namespace
from services.gateway.compat.segmenter import LiveSegmenters, VadUnavailable
from services.gateway.compat.voiceprints import VoiceprintBook
from services.gateway.connection import admit, client_address
from services.gateway.context import GatewayContext
from services.gateway.errors import (
    GOING_AWAY,
    INTERNAL_ERROR,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    POLICY_VIOLATION,
    TRY_AGAIN_LATER,
    UNSUPPORTED_DATA,
    ConnectionRejected,
)
from services.gateway.http_guards import GuardedWebSocketProtocol, guarded_http_protocol, log_config
from services.gateway.limits import ConnectionCounts, InputGuard, InputLimits
from services.gateway.store import Voiceprint

log = logging.getLogger(__name__)

# A connection may send audio this many times faster than real time on
# average, after a first BURST_S at any speed (a whole utterance or file);
# faster, its reading is paused: the VAD is shared, and one client sending
# hours of audio must not take it from the rest.
MAX_SPEED = 50.0
BURST_S = 120.0


class FunasrRuntime:
    """What the FunASR port and the HTTP compatible APIs share on one gateway."""

    def __init__(self, max_partials: int) -> None:
        self.segmenters = LiveSegmenters()
        self.gate = PartialGate(max_partials)
        # FunASR inputs begun and not yet answered in full.
        self.busy = 0


class FunasrConnection:
    def __init__(
        self,
        ctx: GatewayContext,
        runtime: FunasrRuntime,
        websocket: WebSocket,
        prints: list[Voiceprint],
    ) -> None:
        self._ctx = ctx
        self._runtime = runtime
        self._ws = websocket
        self._prints = prints
        self._id = f"funasr-{uuid.uuid4().hex[:12]}"
        self._inputs = 0
        self._input: FunasrInput | None = None
        self._wav_name = "demo"
        # The last config message: later inputs may start without one.
        self._config: dict[str, Any] = {}
        self._since = time.monotonic()
        self._sent_s = 0.0  # seconds of audio received on this connection
        settings = ctx.settings
        self._guard = InputGuard(
            InputLimits(
                frames_per_s=1e9,  # audio is paced by the VAD's acknowledgements instead
                audio_realtime_factor=1e9,
                text_messages_per_s=settings.max_text_messages_per_s,
                text_bytes_per_s=settings.max_text_bytes_per_s,
            )
        )

    async def run(self) -> None:
        settings = self._ctx.settings
        timeout = settings.hello_timeout_s  # until the first config message
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        raw = await self._ws.receive()
                except TimeoutError:
                    raise ConnectionRejected(GOING_AWAY, "no message within the timeout") from None
                timeout = settings.idle_timeout_s
                if raw["type"] == "websocket.disconnect":
                    return
                if (data := raw.get("bytes")) is not None:
                    await self._audio(data)
                elif (text := raw.get("text")) is not None:
                    self._guard.text(len(text))
                    await self._message(parse_text(text))
        except ConnectionRejected as exc:
            await self._fail(exc.code, exc.reason)
        except VadUnavailable as exc:
            await self._fail(TRY_AGAIN_LATER, str(exc))
        except (NotAudio, TooLong) as exc:
            await self._fail(INVALID_PAYLOAD, str(exc))
        except FileTooBig as exc:
            await self._fail(MESSAGE_TOO_BIG, str(exc))
        finally:
            if self._input is not None:
                self._input.close()
                self._runtime.busy -= 1

    async def _audio(self, data: bytes) -> None:
        if self._input is None and self._config:
            self._begin(self._config)  # more audio after an end: the next input
        if self._input is None:
            raise ConnectionRejected(POLICY_VIOLATION, "audio before the config message")
        await self._pace(len(data) / 2 / self._input.config.audio_fs)
        await self._input.audio(data)

    async def _pace(self, seconds: float) -> None:
        """Wait while this connection's audio is ahead of its allowance."""
        now = time.monotonic()
        self._sent_s += seconds
        allowed = BURST_S + MAX_SPEED * (now - self._since)
        if self._sent_s > allowed:
            await asyncio.sleep((self._sent_s - allowed) / MAX_SPEED)

    async def _message(self, message: dict[str, Any]) -> None:
        if "mode" in message and self._input is None:
            self._begin(message)
        elif "mode" in message and message["mode"] != self._input_mode():
            raise ConnectionRejected(UNSUPPORTED_DATA, "mode changed in the middle of an input")
        elif message.get("is_speaking") is True and self._input is None and self._config:
            # A new input with the connection's last settings, as FunASR's server allows.
            self._begin({**self._config, **message})
        if message.get("is_speaking") is False:
            await self._end(bool(message.get("is_end", False)))

    def _begin(self, message: dict[str, Any]) -> None:
        settings = self._ctx.settings
        config = parse_config(
            message, settings.funasr_tags, settings.asr_language, settings.asr_use_itn
        )
        self._config = {k: v for k, v in message.items() if k not in ("is_speaking", "is_end")}
        self._wav_name = config.wav_name
        self._inputs += 1
        prints = self._prints if config.mode != "online" else []
        self._input = FunasrInput(
            self._ctx,
            self._runtime.segmenters,
            self._runtime.gate,
            config,
            f"{self._id}.{self._inputs}",
            self._send,
            prints,
            settings.openai_max_upload_bytes,
        )
        self._input.start()
        self._runtime.busy += 1

    def _input_mode(self) -> str:
        return "" if self._input is None else self._input.config.mode

    async def _end(self, is_end: bool) -> None:
        current, self._input = self._input, None
        if current is None:
            # Nothing was sent since the last end: an empty, final answer.
            reply = {"mode": "offline", "wav_name": self._wav_name, "text": "", "is_final": True}
            if is_end:
                reply["is_end"] = True
            await self._send(reply)
            return
        try:
            await current.finish(self._ctx.settings.asr_timeout_s * 2)
            await self._send(current.closing_message(is_end))
        finally:
            current.close()
            self._runtime.busy -= 1
        if current.error:
            code = TRY_AGAIN_LATER if current.overloaded else INTERNAL_ERROR
            raise ConnectionRejected(code, current.error)

    async def _send(self, message: dict[str, Any]) -> bool:
        if self._ws.client_state is not WebSocketState.CONNECTED:
            return False
        try:
            await self._ws.send_text(json.dumps(message, ensure_ascii=False))
        except Exception:
            return False
        return True

    async def _fail(self, code: int, reason: str) -> None:
        """Say what went wrong (FunASR's clients read ``error`` off an end
        acknowledgement), then close with a code and the reason."""
        label = ConnectionRejected(code, reason).label
        metrics.REQUESTS.labels("funasr", f"closed_{label}").inc()
        log.info("funasr %s: closing: %s", self._id, reason)
        mode = self._input_mode() or "offline"
        error = {
            "mode": "2pass-offline" if mode == "2pass" else mode,
            "wav_name": self._wav_name,
            "text": "",
            "is_final": False,
            "is_end": True,
            "error": reason,
        }
        if await self._send(error):
            with contextlib.suppress(Exception):
                await self._ws.close(code=code, reason=ConnectionRejected(code, reason).reason)


async def serve_funasr(ctx: GatewayContext, runtime: FunasrRuntime, websocket: WebSocket) -> None:
    key = bearer_key(websocket.headers.get("authorization"))
    token_key, address = ConnectionCounts.token_key(key), client_address(ctx, websocket)
    if not await admit(ctx, websocket, token_key, address):
        metrics.REQUESTS.labels("funasr", "refused").inc()
        return
    ctx.connections.add(token_key, address)
    metrics.FUNASR_CONNECTIONS.inc()
    try:
        if not await key_accepted(ctx.settings, ctx.store, key):
            metrics.REQUESTS.labels("funasr", "unauthorized").inc()
            await websocket.send_denial_response(
                JSONResponse(
                    {"error": "invalid or missing API key (Authorization: Bearer <key>)"},
                    status_code=401,
                )
            )
            return
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol="binary" if "binary" in offered else None)
        metrics.REQUESTS.labels("funasr", "accepted").inc()
        prints = await _voiceprints(ctx, key)
        await FunasrConnection(ctx, runtime, websocket, prints).run()
    except Exception:
        log.exception("funasr connection failed")
        if websocket.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close(code=INTERNAL_ERROR, reason="internal error")
    finally:
        metrics.FUNASR_CONNECTIONS.dec()
        ctx.connections.remove(token_key, address)


async def _voiceprints(ctx: GatewayContext, key: str) -> list[Voiceprint]:
    """The key's enrolled voices; without them (or without Redis) nobody is identified."""
    try:
        return await VoiceprintBook(ctx.store, namespace(key)).all()
    except Exception as exc:
        log.warning("funasr: reading voiceprints failed: %s", exc)
        return []


def funasr_app(ctx: GatewayContext, runtime: FunasrRuntime) -> Starlette:
    async def socket(websocket: WebSocket) -> None:
        await serve_funasr(ctx, runtime, websocket)

    async def not_websocket(_: object) -> PlainTextResponse:
        return PlainTextResponse("FunASR WebSocket endpoint: connect with ws://\n", 426)

    return Starlette(
        routes=[
            WebSocketRoute("/", socket),
            WebSocketRoute("/{path:path}", socket),
            Route("/{path:path}", not_websocket),
        ]
    )


def server_config(app: Starlette, ctx: GatewayContext) -> uvicorn.Config:
    """The gateway's HTTP and WebSocket guards, with room for a whole utterance per message."""
    settings = ctx.settings
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.funasr_port,
        http=guarded_http_protocol(settings.handshake_timeout_s),
        ws=GuardedWebSocketProtocol,
        lifespan="off",
        log_config=log_config(),
        log_level=settings.log_level.lower(),
        ws_max_size=settings.funasr_max_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=30,
        ws_ping_timeout=60,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )


class _SharedLoopServer(uvicorn.Server):
    """A uvicorn server inside another one's process: the gateway's own server
    owns the signals (and drains on SIGTERM), so this one leaves them alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class FunasrServer:
    def __init__(self, ctx: GatewayContext, runtime: FunasrRuntime) -> None:
        self._config = server_config(funasr_app(ctx, runtime), ctx)
        self._runtime = runtime
        self._drain_s = ctx.settings.drain_timeout_s
        self._server = _SharedLoopServer(self._config)
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Listen on the FunASR port; if it cannot be bound, log it and serve without.

        The socket is bound here rather than by uvicorn, which exits the
        process when a port is taken: devices on the gateway's own port must
        not lose their gateway over the FunASR port.
        """
        host, port = self._config.host, self._config.port
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=self._config.backlog)
        except OSError as exc:
            log.error("FunASR API off: cannot listen on %s:%d (%s)", host, port, exc)
            return
        self._task = asyncio.create_task(self._server.serve([sock]), name="funasr-server")
        async with asyncio.timeout(timeout):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("the FunASR server stopped while starting")
                await asyncio.sleep(0.02)
        log.info("FunASR WebSocket API on %s:%d", host, port)

    async def stop(self, timeout: float = 10.0) -> None:
        """Once the inputs in progress are answered (within the drain timeout), close."""
        if self._task is None:
            return
        # New connections are refused already (the gateway is draining).
        deadline = time.monotonic() + self._drain_s
        while self._runtime.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout)
