"""voiceprint-api's routes under ``/voiceprint``, answered by the cluster.

Clients: xiaozhi-esp32-server's voiceprint provider (``identify``, and
``health`` once at start-up) and its manager back end (``register``,
``delete``). Voiceprints live in Redis under the caller's key
(``VoiceprintBook``); embeddings come from the speaker service. Errors keep
the original server's ``{"detail": ...}`` shape.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from services.common.audio import SAMPLE_RATE
from services.gateway.compat import metrics
from services.gateway.compat.audio_files import NotAudio, TooLong, decode_file
from services.gateway.compat.keys import namespace
from services.gateway.compat.scope import caller_key, context
from services.gateway.compat.voiceprints import MAX_SPEAKER_ID_CHARS, VoiceprintBook, best_match
from services.gateway.compute import Embedding

log = logging.getLogger(__name__)

MAX_VOICEPRINT_BYTES = 10 * 1024 * 1024
MIN_REGISTER_S = 1.0
MIN_IDENTIFY_S = 0.3
MAX_CANDIDATES = 100


def _fail(status: int, detail: str) -> HTTPException:
    metrics.REQUESTS.labels("voiceprint", str(status)).inc()
    return HTTPException(status, detail)


def voiceprint_app() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": str(exc.errors()[:1])}, 400)

    @app.get("/voiceprint/health")
    async def health(request: Request) -> dict[str, Any]:
        # The key came as a query parameter, checked before this runs.
        key = request.query_params.get("key", "")
        try:
            total = await VoiceprintBook(context(request).store, namespace(key)).count()
        except Exception as exc:
            raise _fail(503, f"voiceprint store unavailable: {exc}") from None
        return {"total_voiceprints": total, "status": "healthy"}

    @app.post("/voiceprint/register")
    async def register(request: Request) -> dict[str, Any]:
        form = await _form(request)
        speaker_id = _speaker_id(str(form.get("speaker_id") or ""))
        pcm = await _wav(request, form.get("file"), MIN_REGISTER_S)
        embedding = await _embed(request, pcm)
        await _book(request).put(speaker_id, embedding)
        metrics.REQUESTS.labels("voiceprint", "registered").inc()
        return {"success": True, "msg": f"registered: {speaker_id}"}

    @app.post("/voiceprint/identify")
    async def identify(request: Request) -> dict[str, Any]:
        form = await _form(request)
        ids = [s.strip() for s in str(form.get("speaker_ids") or "").split(",") if s.strip()]
        if not ids:
            raise _fail(400, "speaker_ids must name at least one candidate (comma-separated)")
        if len(ids) > MAX_CANDIDATES:
            raise _fail(400, f"at most {MAX_CANDIDATES} candidate speaker_ids")
        pcm = await _wav(request, form.get("file"), MIN_IDENTIFY_S)
        prints = await _book(request).some(ids)
        if not prints:
            return {"speaker_id": "", "score": 0.0}
        embedding = await _embed(request, pcm)
        match = best_match(prints, embedding, context(request).settings.speaker_threshold)
        metrics.REQUESTS.labels("voiceprint", "identified" if match.speaker_id else "unknown").inc()
        return {"speaker_id": match.speaker_id, "score": match.score}

    @app.delete("/voiceprint/{speaker_id}")
    async def delete(request: Request, speaker_id: str) -> dict[str, Any]:
        if not await _book(request).delete(speaker_id):
            raise _fail(404, f"no voiceprint for speaker {speaker_id!r}")
        return {"success": True, "msg": f"deleted: {speaker_id}"}

    return app


def _book(request: Request) -> VoiceprintBook:
    return VoiceprintBook(context(request).store, namespace(caller_key(request)))


async def _form(request: Request) -> Any:
    try:
        return await request.form(max_files=1, max_fields=16)
    except Exception as exc:
        raise _fail(400, f"could not read the multipart form: {exc}") from None


def _speaker_id(value: str) -> str:
    value = value.strip()
    if not value or len(value) > MAX_SPEAKER_ID_CHARS:
        raise _fail(400, f"speaker_id must be 1 to {MAX_SPEAKER_ID_CHARS} characters")
    return value


async def _wav(request: Request, upload: Any, min_seconds: float) -> bytes:
    """The uploaded WAV as 16 kHz PCM, lasting at least ``min_seconds``."""
    if not isinstance(upload, UploadFile):
        raise _fail(400, "a WAV file is required (multipart field 'file')")
    if not (upload.filename or "").lower().endswith(".wav"):
        raise _fail(400, "only WAV files are accepted (the file name must end in .wav)")
    data = await upload.read(MAX_VOICEPRINT_BYTES + 1)
    if len(data) > MAX_VOICEPRINT_BYTES:
        raise _fail(413, f"WAV over {MAX_VOICEPRINT_BYTES} bytes")
    settings = context(request).settings
    try:
        pcm = await asyncio.to_thread(decode_file, data, settings.openai_max_audio_s)
    except (NotAudio, TooLong) as exc:
        raise _fail(400, f"not a usable WAV file: {exc}") from None
    seconds = len(pcm) / 2 / SAMPLE_RATE
    if seconds < min_seconds:
        raise _fail(400, f"audio too short: {seconds:.1f} s, at least {min_seconds:g} s needed")
    # A voice is known from its first stretch; longer audio adds cost, not accuracy.
    return pcm[: int(settings.max_utterance_s * SAMPLE_RATE) * 2]


async def _embed(request: Request, pcm: bytes) -> Embedding:
    ctx = context(request)
    try:
        return await ctx.compute.embed(
            pcm, f"voiceprint-{uuid.uuid4().hex[:8]}", ctx.settings.speaker_timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        log.warning("voiceprint: embedding failed: %s", exc)
        raise _fail(503, f"speaker service unavailable: {exc.code().name}") from None
