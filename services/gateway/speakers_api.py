"""HTTP API to enrol, list and delete the speakers of a device (voiceprints in Redis)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Header, HTTPException, Request, UploadFile
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.audio import SAMPLE_RATE, float_to_pcm16, read_wav
from services.gateway.config import GatewaySettings
from services.gateway.context import GatewayContext

MAX_ENROL_BYTES = 10 * 1024 * 1024
# The WAV plus the multipart form around it.
MAX_REQUEST_BYTES = MAX_ENROL_BYTES + 64 * 1024
MIN_ENROL_SECONDS = 1.0
# Every path of the admin API starts with this.
ADMIN_PREFIX = "/v1/"

router = APIRouter(prefix="/v1/devices/{device_id}/speakers", tags=["speakers"])


def _context(request: Request) -> GatewayContext:
    ctx: GatewayContext = request.app.state.ctx
    return ctx


def admin_refusal(settings: GatewaySettings, authorization: str | None) -> tuple[int, str] | None:
    """Why a request with this Authorization header may not use the admin API, if it may not."""
    if not settings.admin_token:
        if settings.allow_anonymous:
            return None
        return 403, "speaker API disabled: set SF_GATEWAY_ADMIN_TOKEN"
    token = (authorization or "").removeprefix("Bearer ").strip()
    # Bytes: compare_digest refuses str with characters beyond ASCII.
    if not secrets.compare_digest(token.encode(), settings.admin_token.encode()):
        return 401, "invalid admin token"
    return None


def body_refusal(headers: Headers, limit: int = MAX_REQUEST_BYTES) -> tuple[int, str] | None:
    """Why the body this request announces is refused before it is read, if it is."""
    length = headers.get("content-length")
    if length is None:
        if "transfer-encoding" in headers:
            return 411, "send the body with a Content-Length"
        return None
    if not length.isdigit():
        return 400, "invalid Content-Length"
    if int(length) > limit:
        return 413, f"request body over {limit} bytes"
    return None


class AdminRequestGuard:
    """Checks an admin API request's token and size from its headers alone.

    FastAPI reads and parses a form (spooling files to disk) before it runs a
    route's dependencies, so the token check of ``_require_admin`` alone would
    come after a 100 MB upload from anyone. This middleware answers 401/403
    and 411/413 before a byte of the body is read, and closes the connection
    so that the rest of the body is never read either.
    """

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = admin_refusal(self.settings, headers.get("authorization"))
        refusal = refusal or body_refusal(headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, detail = refusal
        extra = {"Connection": "close"}
        if status == 401:
            extra["WWW-Authenticate"] = "Bearer"
        await JSONResponse({"detail": detail}, status, headers=extra)(scope, receive, send)


def _require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    refusal = admin_refusal(_context(request).settings, authorization)
    if refusal is not None:
        raise HTTPException(*refusal)


Admin = Depends(_require_admin)


@router.post("", status_code=201, dependencies=[Admin])
async def enrol_speaker(
    request: Request, device_id: str, name: Annotated[str, Form()], audio: UploadFile
) -> dict[str, Any]:
    ctx = _context(request)
    data = await audio.read(MAX_ENROL_BYTES + 1)
    if len(data) > MAX_ENROL_BYTES:
        raise HTTPException(413, f"WAV over {MAX_ENROL_BYTES} bytes")
    try:
        # Off the event loop: decoding and resampling 10 MB takes a few hundred ms.
        samples = await asyncio.to_thread(read_wav, data)
    except Exception as exc:
        raise HTTPException(400, f"not a readable PCM WAV file: {exc}") from None
    if samples.size < MIN_ENROL_SECONDS * SAMPLE_RATE:
        raise HTTPException(400, f"enrolment audio must last at least {MIN_ENROL_SECONDS} s")
    max_samples = int(ctx.settings.max_utterance_s * SAMPLE_RATE)
    embedding = await ctx.compute.embed(
        float_to_pcm16(samples[:max_samples]),
        f"enrol-{uuid.uuid4().hex[:8]}",
        ctx.settings.speaker_timeout_s,
    )
    voiceprint = await ctx.store.add_voiceprint(device_id, name, embedding.model, embedding.vector)
    return voiceprint.public()


@router.get("", dependencies=[Admin])
async def list_speakers(request: Request, device_id: str) -> dict[str, Any]:
    prints = await _context(request).store.voiceprints(device_id)
    return {"device_id": device_id, "speakers": [p.public() for p in prints]}


@router.delete("/{speaker_id}", status_code=204, dependencies=[Admin])
async def delete_speaker(request: Request, device_id: str, speaker_id: str) -> None:
    if not await _context(request).store.delete_voiceprint(device_id, speaker_id):
        raise HTTPException(404, "no such speaker for this device")
