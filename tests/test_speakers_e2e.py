"""Enrolled voiceprints identify the speaker of later utterances of that device."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from conftest import ADMIN_TOKEN, DeviceFactory

from services.cluster import LocalCluster
from services.simulator.admin import enrol_speaker
from services.simulator.speech import silence, synthesize

pytestmark = pytest.mark.e2e

ENROLLED_VOICE, OTHER_VOICE = "en+m7", "en+f3"
ENROL_TEXT = (
    "my name is alex and this is how my voice sounds when I talk to the assistant "
    "every morning before work"
)


def enrol(cluster: LocalCluster, device_id: str, name: str, voice: str) -> dict[str, Any]:
    audio = np.concatenate([synthesize(ENROL_TEXT, voice), silence(0.2)])
    return enrol_speaker(cluster.gateway_url, ADMIN_TOKEN, device_id, name, audio)


async def test_enrolled_voice_is_reported_as_the_speaker(
    cluster: LocalCluster, make_device: DeviceFactory
) -> None:
    device = make_device(speed=2.0)
    speaker = enrol(cluster, device.config.device_id, "alex", ENROLLED_VOICE)
    await device.connect()
    clip = synthesize("could you please tell me what the weather will be like", ENROLLED_VOICE)
    [result] = await device.speak_auto([clip])
    assert result.message["speaker"] is not None, result.message
    assert result.message["speaker"]["speaker_id"] == speaker["speaker_id"]
    assert result.message["speaker"]["name"] == "alex"


async def test_a_different_voice_is_not_reported_as_the_enrolled_speaker(
    cluster: LocalCluster, make_device: DeviceFactory
) -> None:
    device = make_device(speed=2.0)
    enrol(cluster, device.config.device_id, "alex", ENROLLED_VOICE)
    await device.connect()
    clip = synthesize("could you please tell me what the weather will be like", OTHER_VOICE)
    [result] = await device.speak_auto([clip])
    assert result.message["speaker"] is None, result.message


async def test_voiceprints_of_one_device_are_not_used_for_another(
    cluster: LocalCluster, make_device: DeviceFactory
) -> None:
    enrolled = make_device()
    enrol(cluster, enrolled.config.device_id, "alex", ENROLLED_VOICE)
    other = make_device(speed=2.0)
    await other.connect()
    clip = synthesize("could you please tell me what the weather will be like", ENROLLED_VOICE)
    [result] = await other.speak_auto([clip])
    assert result.message["speaker"] is None


def test_speakers_can_be_listed_and_deleted(cluster: LocalCluster) -> None:
    device_id = "aa:bb:cc:00:11:22"
    speaker = enrol(cluster, device_id, "sam", OTHER_VOICE)
    url = f"{cluster.gateway_url}/v1/devices/{device_id}/speakers"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    listed = httpx.get(url, headers=auth, timeout=10).json()
    assert [s["name"] for s in listed["speakers"]] == ["sam"]
    assert (
        httpx.delete(f"{url}/{speaker['speaker_id']}", headers=auth, timeout=10).status_code == 204
    )
    assert httpx.get(url, headers=auth, timeout=10).json()["speakers"] == []
    assert (
        httpx.delete(f"{url}/{speaker['speaker_id']}", headers=auth, timeout=10).status_code == 404
    )


def test_speaker_api_requires_the_admin_token(cluster: LocalCluster) -> None:
    url = f"{cluster.gateway_url}/v1/devices/x/speakers"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401


def test_enrolment_rejects_audio_that_is_not_wav(cluster: LocalCluster) -> None:
    reply = httpx.post(
        f"{cluster.gateway_url}/v1/devices/x/speakers",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        data={"name": "x"},
        files={"audio": ("x.wav", b"not a wav file", "audio/wav")},
        timeout=10,
    )
    assert reply.status_code == 400
    assert "WAV" in reply.json()["detail"]
