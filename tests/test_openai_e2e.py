"""OpenAI's transcription API on the cluster, called as its SDKs and xiaozhi's provider call it."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import cast

import av
import httpx
import numpy as np
import pytest
import redis
from support.wer import word_error_rate

from services.cluster import LocalCluster
from services.common.audio import SAMPLE_RATE, write_wav
from services.gateway.compat.keys import KEYS_SET
from services.simulator.phrases import SENTENCES
from services.simulator.speech import silence, synthesize, trim_silence

pytestmark = pytest.mark.e2e

KEY = "openai-test-key"
FIRST, SECOND = "play some jazz music", "open the front door"
BOTH = f"{FIRST} {SECOND}"


def recording() -> np.ndarray:
    """Two sentences with a pause between them: the VAD cuts two segments."""
    parts = [silence(0.3), trim_silence(synthesize(FIRST)), silence(1.5)]
    return np.concatenate([*parts, trim_silence(synthesize(SECOND)), silence(0.5)])


def encoded(samples: np.ndarray, container: str, codec: str, rate: int) -> bytes:
    """The recording as a compressed file, made the way any encoder would make it."""
    out = io.BytesIO()
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    with av.open(out, "w", format=container) as file:
        stream = cast(av.AudioStream, file.add_stream(codec, rate=rate))
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate)
        for piece in resampler.resample(frame):
            for packet in stream.encode(piece):
                file.mux(packet)
        for packet in stream.encode(None):
            file.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="module")
def key(redis_client: redis.Redis) -> str:
    redis_client.sadd(KEYS_SET, KEY)
    return KEY


@pytest.fixture(scope="module")
def wav() -> bytes:
    return write_wav(recording())


@pytest.fixture
async def api(cluster: LocalCluster, key: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=cluster.gateway_url, headers=headers, timeout=60
    ) as client:
        yield client


async def transcribe(api: httpx.AsyncClient, name: str, data: bytes, **form: str) -> httpx.Response:
    fields = {"model": "gpt-4o-mini-transcribe", **form}
    return await api.post("/v1/audio/transcriptions", files={"file": (name, data)}, data=fields)


async def test_wav_upload_answers_text_as_xiaozhi_reads_it(
    api: httpx.AsyncClient, wav: bytes
) -> None:
    reply = await transcribe(api, "utterance.wav", wav)
    assert reply.status_code == 200, reply.text
    assert word_error_rate([BOTH], [reply.json()["text"]]) <= 0.2, reply.text


@pytest.mark.parametrize(
    ("name", "container", "codec", "rate"),
    [("speech.mp3", "mp3", "libmp3lame", 16000), ("speech.ogg", "ogg", "libopus", 48000)],
)
async def test_compressed_upload_is_decoded_and_recognised(
    api: httpx.AsyncClient, name: str, container: str, codec: str, rate: int
) -> None:
    reply = await transcribe(api, name, encoded(recording(), container, codec, rate))
    assert reply.status_code == 200, reply.text
    assert word_error_rate([BOTH], [reply.json()["text"]]) <= 0.2, reply.text


async def test_verbose_json_has_one_timed_segment_per_sentence(
    api: httpx.AsyncClient, wav: bytes
) -> None:
    reply = await transcribe(api, "speech.wav", wav, response_format="verbose_json")
    body = reply.json()
    segments = body["segments"]
    assert [s["id"] for s in segments] == [0, 1], body
    assert 0 <= segments[0]["start"] < segments[0]["end"] < segments[1]["start"]
    assert segments[1]["end"] <= body["duration"]
    assert word_error_rate([FIRST, SECOND], [s["text"] for s in segments]) <= 0.2
    assert body["language"] == "english" and body["task"] == "transcribe"


async def test_text_srt_and_vtt_formats_carry_the_same_words(
    api: httpx.AsyncClient, wav: bytes
) -> None:
    text, srt, vtt = await asyncio.gather(
        *(transcribe(api, "speech.wav", wav, response_format=f) for f in ("text", "srt", "vtt"))
    )
    assert text.headers["content-type"].startswith("text/plain")
    assert word_error_rate([BOTH], [text.text]) <= 0.2, text.text
    blocks = srt.text.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["1", "2"], srt.text
    assert " --> " in blocks[0].splitlines()[1] and "," in blocks[0].splitlines()[1]
    assert vtt.text.startswith("WEBVTT\n") and "00:00:00." in vtt.text, vtt.text


async def test_a_long_recording_is_cut_into_its_sentences_faster_than_real_time(
    api: httpx.AsyncClient,
) -> None:
    # Longer than an utterance may be (30 s) and than the VAD's backlog (10 s).
    parts = [silence(0.5)]
    for sentence in SENTENCES:
        parts += [trim_silence(synthesize(sentence)), silence(2.5)]
    samples = np.concatenate(parts)
    started = time.monotonic()
    reply = await transcribe(api, "long.wav", write_wav(samples), response_format="verbose_json")
    took = time.monotonic() - started
    segments = reply.json()["segments"]
    assert len(segments) == len(SENTENCES), [s["text"] for s in segments]
    assert word_error_rate(SENTENCES, [s["text"] for s in segments]) <= 0.2
    assert took < 0.8 * samples.size / SAMPLE_RATE, took  # real-time pace would be 1.0


async def test_models_lists_what_model_may_name(api: httpx.AsyncClient) -> None:
    reply = await api.get("/v1/models")
    names = [m["id"] for m in reply.json()["data"]]
    assert "gpt-4o-mini-transcribe" in names and "whisper-1" in names


async def test_a_wav_named_mp3_is_decoded_by_its_content(
    api: httpx.AsyncClient, wav: bytes
) -> None:
    reply = await transcribe(api, "actually-a-wav.mp3", wav)
    assert reply.status_code == 200, reply.text
    assert word_error_rate([BOTH], [reply.json()["text"]]) <= 0.2, reply.text


async def test_a_file_type_openai_does_not_take_is_a_400_naming_the_types(
    api: httpx.AsyncClient, wav: bytes
) -> None:
    reply = await transcribe(api, "speech.txt", wav)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_file_format"
    assert "mp3" in reply.json()["error"]["message"]


async def test_a_file_that_is_not_audio_is_a_400_in_openai_shape(api: httpx.AsyncClient) -> None:
    reply = await transcribe(api, "notes.mp3", b"these are my notes, not audio\n" * 200)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert "decode" in error["message"]


async def test_a_wrong_key_is_a_401_in_openai_shape(cluster: LocalCluster, wav: bytes) -> None:
    async with httpx.AsyncClient(base_url=cluster.gateway_url, timeout=30) as client:
        reply = await client.post(
            "/v1/audio/transcriptions",
            headers={"Authorization": "Bearer wrong"},
            files={"file": ("a.wav", wav)},
            data={"model": "whisper-1"},
        )
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "invalid_request_error"


async def test_a_50_mb_upload_is_refused_413_before_its_body_is_read(
    cluster: LocalCluster, key: str
) -> None:
    head = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {50_000_000}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.ports.gateway)
    try:
        writer.write(head + b"x" * 1024)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b'"error"' in reply and b"invalid_request_error" in reply
