"""voiceprint-api on the cluster: two enrolled voices, one stranger, as xiaozhi calls it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import redis

from services.cluster import LocalCluster
from services.common.audio import float_to_pcm16, write_wav
from services.gateway.compat.keys import KEYS_SET
from services.simulator.funasr_client import FunasrClient
from services.simulator.speech import silence, synthesize

pytestmark = pytest.mark.e2e

KEY = "voiceprint-test-key"
ENROL_TEXT = (
    "my name is alex and this is how my voice sounds when I talk to the assistant "
    "every morning before work"
)
ASK = "could you please tell me what the weather will be like"
VOICES = {"alex": "en+m7", "sam": "en+f3"}
STRANGER = "en-us+f5"


def clip(text: str, voice: str) -> bytes:
    return write_wav(np.concatenate([synthesize(text, voice), silence(0.2)]))


@pytest.fixture(scope="module")
async def api(cluster: LocalCluster, redis_client: redis.Redis) -> AsyncIterator[httpx.AsyncClient]:
    """A key of its own with alex and sam registered through the API."""
    redis_client.sadd(KEYS_SET, KEY)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(
        base_url=f"{cluster.gateway_url}/voiceprint", headers=headers, timeout=30
    ) as client:
        for speaker_id, voice in VOICES.items():
            reply = await client.post(
                "/register",
                data={"speaker_id": speaker_id},
                files={"file": ("enrol.wav", clip(ENROL_TEXT, voice), "audio/wav")},
            )
            assert reply.json() == {"success": True, "msg": f"registered: {speaker_id}"}
        yield client


async def identify(api: httpx.AsyncClient, voice: str) -> dict[str, object]:
    reply = await api.post(
        "/identify",
        data={"speaker_ids": "alex,sam"},
        files={"file": ("audio.wav", clip(ASK, voice), "audio/wav")},
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, object] = reply.json()
    return body


@pytest.mark.parametrize("speaker_id", sorted(VOICES))
async def test_each_registered_voice_is_identified_by_its_id(
    api: httpx.AsyncClient, speaker_id: str
) -> None:
    found = await identify(api, VOICES[speaker_id])
    assert found["speaker_id"] == speaker_id, found
    assert isinstance(found["score"], float) and found["score"] >= 0.4


async def test_a_stranger_comes_back_with_an_empty_speaker_id(api: httpx.AsyncClient) -> None:
    found = await identify(api, STRANGER)
    assert found["speaker_id"] == "", found
    assert isinstance(found["score"], float)  # the best score, below the threshold


async def test_health_counts_the_keys_voiceprints_and_wants_the_key(
    cluster: LocalCluster, api: httpx.AsyncClient
) -> None:
    url = f"{cluster.gateway_url}/voiceprint/health"
    healthy = httpx.get(url, params={"key": KEY}, timeout=10)
    assert healthy.json() == {"total_voiceprints": 2, "status": "healthy"}
    assert httpx.get(url, params={"key": "wrong"}, timeout=10).status_code == 401


async def test_delete_removes_a_voiceprint_once(api: httpx.AsyncClient) -> None:
    reply = await api.post(
        "/register",
        data={"speaker_id": "temp"},
        files={"file": ("t.wav", clip(ENROL_TEXT, STRANGER), "audio/wav")},
    )
    assert reply.status_code == 200
    assert (await api.delete("/temp")).json()["success"] is True
    assert (await api.delete("/temp")).status_code == 404


async def test_funasr_results_name_the_speaker_from_the_keys_voiceprints(
    cluster: LocalCluster, api: httpx.AsyncClient
) -> None:
    client = FunasrClient(cluster.funasr_url, KEY)
    await client.connect()
    try:
        await client.config("offline")
        audio = np.concatenate([silence(0.3), synthesize(ASK, VOICES["sam"]), silence(0.8)])
        await client.ws.send(float_to_pcm16(audio))
        await client.end(is_end=True)
        [result] = await client.until_end()
    finally:
        await client.close()
    assert result["spk_name"] == "sam" and result["spk_score"] >= 0.4, result


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("short.wav", clip("hi", "en")[: 44 + 6400], "too short"),
        ("speech.mp3", clip(ASK, "en"), "WAV"),
        ("notes.wav", b"RIFF but not really a wave file" * 50, "not a usable WAV"),
    ],
    ids=["0.2 s of audio", "a WAV named .mp3", "not audio"],
)
async def test_register_refuses_bad_audio_with_a_reason(
    api: httpx.AsyncClient, name: str, data: bytes, problem: str
) -> None:
    reply = await api.post(
        "/register", data={"speaker_id": "bad"}, files={"file": (name, data, "audio/wav")}
    )
    assert reply.status_code == 400
    assert re.search(problem, reply.json()["detail"]), reply.text
