"""HTTP API to enrol, list and delete the speakers of a device (voiceprints in Redis)."""

from __future__ import annotations

import secrets
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Header, HTTPException, Request, UploadFile

from services.common.audio import SAMPLE_RATE, float_to_pcm16, read_wav
from services.gateway.context import GatewayContext

MAX_ENROL_BYTES = 10 * 1024 * 1024
MIN_ENROL_SECONDS = 1.0

router = APIRouter(prefix="/v1/devices/{device_id}/speakers", tags=["speakers"])


def _context(request: Request) -> GatewayContext:
    ctx: GatewayContext = request.app.state.ctx
    return ctx


def _require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    settings = _context(request).settings
    if not settings.admin_token:
        if settings.allow_anonymous:
            return
        raise HTTPException(403, "speaker API disabled: set SF_GATEWAY_ADMIN_TOKEN")
    token = (authorization or "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(token, settings.admin_token):
        raise HTTPException(401, "invalid admin token")


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
        samples = read_wav(data)
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
