"""Dispatch of the HTTP compatible APIs (OpenAI transcription, voiceprint-api).

Each API answers in its own shape, with its own keys, so requests for them
are taken here, before the admin API's guard sees their ``/v1/`` prefix. The
key and the announced body size are checked from the headers alone: a
request that will be refused is answered (and its connection closed) before
a byte of its body is read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.compat import metrics
from services.gateway.compat.keys import bearer_key, key_accepted
from services.gateway.compat.openai_api import openai_app, openai_error
from services.gateway.compat.scope import CTX, KEY, RUNTIME
from services.gateway.compat.voiceprint_api import MAX_VOICEPRINT_BYTES, voiceprint_app
from services.gateway.config import GatewaySettings
from services.gateway.context import GatewayContext
from services.gateway.limits import ConnectionCounts
from services.gateway.speakers_api import body_refusal

# The multipart form around the file.
FORM_OVERHEAD = 64 * 1024
# A refused request's body up to this size is read and dropped before the
# answer, so the client reads the answer rather than a reset; a larger one is
# left unread and the connection closed.
DRAIN_LIMIT = 2 * 1024 * 1024
DRAIN_TIMEOUT_S = 5.0


def _api(path: str) -> str | None:
    if path.startswith("/v1/audio/") or path == "/v1/models" or path.startswith("/v1/models/"):
        return "openai"
    if path == "/voiceprint" or path.startswith("/voiceprint/"):
        return "voiceprint"
    return None


async def _drained(headers: Headers, receive: Receive) -> bool:
    """Read and drop a small body; False when it is too large (or unannounced) to."""
    length = headers.get("content-length", "")
    if not length.isdigit() or int(length) > DRAIN_LIMIT:
        return False
    received = 0
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while received <= int(length):
                message = await receive()
                received += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return True
    except TimeoutError:
        pass
    return False


def _admission_refusal(ctx: GatewayContext, token_key: str, address: str) -> tuple[int, str] | None:
    """The gateway's admission (``admit``) for one request: draining, full, or this
    key's or address's share taken."""
    if ctx.draining:
        return 503, "gateway is draining, retry on another"
    if ctx.connections.total >= ctx.settings.max_sessions:
        return 429, "gateway at its session limit, retry later"
    capped = ctx.connections.refusal(token_key, address)
    return None if capped is None else (429, capped)


class CompatHttp:
    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings
        self._apps = {"openai": openai_app(), "voiceprint": voiceprint_app()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = _api(scope["path"]) if scope["type"] == "http" else None
        if api is None:
            await self.app(scope, receive, send)
            return
        ctx: GatewayContext = scope["app"].state.ctx
        headers = Headers(scope=scope)
        key = bearer_key(headers.get("authorization"))
        if api == "voiceprint" and scope["path"].rstrip("/") == "/voiceprint/health":
            key = QueryParams(scope.get("query_string", b"")).get("key", "")
        refusal: tuple[int, str] | None = None
        if not await key_accepted(self.settings, ctx.store, key):
            refusal = 401, "invalid or missing API key (Authorization: Bearer <key>)"
        else:
            limit = (
                self.settings.openai_max_upload_bytes if api == "openai" else MAX_VOICEPRINT_BYTES
            )
            refusal = body_refusal(headers, limit + FORM_OVERHEAD)
        # Work (an upload to recognise or embed) is admitted like a connection.
        working = scope["method"] == "POST"
        token_key, address = ConnectionCounts.token_key(key), self._address(headers, scope)
        if refusal is None and working:
            refusal = _admission_refusal(ctx, token_key, address)
        if refusal is not None:
            status, message = refusal
            metrics.REQUESTS.labels(api, str(status)).inc()
            extra: dict[str, str] = {}
            if not await _drained(headers, receive):
                extra["Connection"] = "close"
            if status == 401:
                extra["WWW-Authenticate"] = "Bearer"
            if status in (429, 503):
                extra["Retry-After"] = "5"
            body: dict[str, Any] = (
                openai_error(status, message) if api == "openai" else {"detail": message}
            )
            await JSONResponse(body, status, headers=extra)(scope, receive, send)
            return
        inner = dict(scope)
        inner[CTX] = ctx
        inner[RUNTIME] = scope["app"].state.compat
        inner[KEY] = key
        if not working:
            await self._apps[api](inner, receive, send)
            return
        ctx.connections.add(token_key, address)
        try:
            await self._apps[api](inner, receive, send)
        finally:
            ctx.connections.remove(token_key, address)

    def _address(self, headers: Headers, scope: Scope) -> str:
        """The client's address: the peer, or what a trusted proxy says it is."""
        header = self.settings.client_address_header
        if header and (forwarded := headers.get(header)):
            return forwarded.split(",")[0].strip()
        client = scope.get("client")
        return str(client[0]) if client else ""
