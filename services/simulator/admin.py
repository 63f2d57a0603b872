"""Client for the gateway's speaker API (enrolment), used by the simulator's users and tests."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from services.common.audio import write_wav


def enrol_speaker(
    gateway_url: str, admin_token: str, device_id: str, name: str, audio: np.ndarray
) -> dict[str, Any]:
    """Enrol 16 kHz float audio as a voiceprint of ``device_id``; returns the speaker record."""
    reply = httpx.post(
        f"{gateway_url}/v1/devices/{device_id}/speakers",
        headers={"Authorization": f"Bearer {admin_token}"},
        data={"name": name},
        files={"audio": ("enrol.wav", write_wav(audio), "audio/wav")},
        timeout=60,
    )
    reply.raise_for_status()
    body: dict[str, Any] = reply.json()
    return body
