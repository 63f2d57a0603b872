"""OpenAI's ``POST /v1/audio/transcriptions`` and ``GET /v1/models``, answered by the cluster.

Clients: the OpenAI SDKs, xiaozhi-esp32-server's ``openai`` ASR provider
(posts ``file`` and ``model`` with a Bearer key, reads ``text``). Errors use
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``. The key
and the size were checked before the body was read (``CompatHttp``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import PurePath
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from services.common.audio import SAMPLE_RATE
from services.gateway.compat import metrics
from services.gateway.compat.audio_files import NotAudio, TooLong, decode_file
from services.gateway.compat.scope import context, runtime
from services.gateway.compat.segmenter import VadUnavailable
from services.gateway.compat.transcribe import Piece, transcribe_pcm

log = logging.getLogger(__name__)

FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
# What OpenAI takes; the content is probed whatever the name says.
EXTENSIONS = ("flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "oga", "opus", "wav", "webm")
LANGUAGE_NAMES = {
    "en": "english",
    "zh": "chinese",
    "yue": "cantonese",
    "ja": "japanese",
    "ko": "korean",
    "de": "german",
    "fr": "french",
    "es": "spanish",
}
# Languages written without spaces between words.
UNSPACED = ("zh", "yue", "ja")
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def openai_app() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.REQUESTS.labels("openai", str(exc.status)).inc()
        return JSONResponse(openai_error(exc.status, exc.message, exc.param, exc.code), exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(openai_error(exc.status_code, str(exc.detail)), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(openai_error(400, str(exc.errors()[:1])), 400)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        names = context(request).settings.openai_models
        owner = {"object": "model", "created": 0, "owned_by": "speechfront"}
        return {"object": "list", "data": [{"id": n, **owner} for n in names]}

    @app.post("/v1/audio/transcriptions", response_model=None)
    async def transcriptions(request: Request) -> Response:
        return await _transcriptions(request)

    return app


async def _transcriptions(request: Request) -> Response:
    ctx = context(request)
    settings = ctx.settings
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as exc:
        raise ApiError(400, f"could not read the multipart form: {exc}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "a file is required (multipart field 'file')", "file")
    model = str(form.get("model") or "")
    if not model:
        raise ApiError(400, "model is required", "model")
    if settings.openai_models and model not in settings.openai_models:
        known = ", ".join(settings.openai_models)
        message = f"unknown model {model!r}; use one of: {known}"
        raise ApiError(400, message, "model", "model_not_found")
    response_format = str(form.get("response_format") or "json")
    if response_format not in FORMATS:
        message = f"response_format must be one of {', '.join(FORMATS)}"
        raise ApiError(400, message, "response_format")
    suffix = PurePath(upload.filename or "").suffix.lower().lstrip(".")
    if suffix not in EXTENSIONS:
        raise ApiError(
            400,
            f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(EXTENSIONS)}",
            "file",
            "invalid_file_format",
        )
    language = str(form.get("language") or settings.asr_language)
    if form.get("prompt"):
        log.info("openai: prompt is not supported by the ASR engines here; ignored")
    data = await upload.read(settings.openai_max_upload_bytes + 1)
    if len(data) > settings.openai_max_upload_bytes:
        raise ApiError(413, f"file over {settings.openai_max_upload_bytes} bytes", "file")
    try:
        pcm = await asyncio.to_thread(decode_file, data, settings.openai_max_audio_s)
    except NotAudio as exc:
        raise ApiError(400, f"could not decode the file as audio: {exc}", "file") from None
    except TooLong as exc:
        raise ApiError(400, str(exc), "file", "audio_too_long") from None
    del data
    try:
        pieces = await transcribe_pcm(ctx, runtime(request).segmenters, pcm, language)
    except VadUnavailable as exc:
        raise ApiError(503, f"speech service unavailable: {exc}") from None
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise ApiError(429, "speech service busy, retry later") from None
        raise ApiError(503, f"speech recognition failed: {exc.code().name}") from None
    metrics.REQUESTS.labels("openai", "200").inc()
    duration = len(pcm) / 2 / SAMPLE_RATE
    return _render(response_format, pieces, language, duration)


def _joined(pieces: list[Piece]) -> str:
    text = ""
    for piece in pieces:
        if text and piece.language not in UNSPACED:
            text += " "
        text += piece.text
    return text


def _clock(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _render(kind: str, pieces: list[Piece], language: str, duration: float) -> Response:
    text = _joined(pieces)
    if kind == "json":
        return JSONResponse({"text": text})
    if kind == "text":
        return PlainTextResponse(text + "\n")
    if kind == "srt":
        blocks = [
            f"{i}\n{_clock(p.start_s, ',')} --> {_clock(p.end_s, ',')}\n{p.text}\n"
            for i, p in enumerate(pieces, start=1)
        ]
        return PlainTextResponse("\n".join(blocks))
    if kind == "vtt":
        cues = [f"{_clock(p.start_s, '.')} --> {_clock(p.end_s, '.')}\n{p.text}\n" for p in pieces]
        return PlainTextResponse("\n".join(["WEBVTT\n", *cues]), media_type="text/vtt")
    detected = pieces[0].language if pieces else language
    segments = [
        {
            "id": i,
            "seek": 0,
            "start": round(p.start_s, 3),
            "end": round(p.end_s, 3),
            "text": p.text,
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": 0.0,
            "compression_ratio": 0.0,
            "no_speech_prob": 0.0,
        }
        for i, p in enumerate(pieces)
    ]
    return JSONResponse(
        {
            "task": "transcribe",
            "language": LANGUAGE_NAMES.get(detected, detected),
            "duration": round(duration, 3),
            "text": text,
            "segments": segments,
        }
    )
