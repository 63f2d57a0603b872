"""The VAD connection is recycled routinely (max connection age): no session goes deaf."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from conftest import DEVICE_TOKEN
from support.wer import word_error_rate

from services.cluster import LocalCluster
from services.simulator.device import DeviceConfig, SimulatedDevice
from services.simulator.phrases import SENTENCES, VOICES
from services.simulator.speech import synthesize

pytestmark = pytest.mark.e2e

DEVICES = 6


@pytest.fixture(scope="module")
def recycling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(
        tmp_path_factory.mktemp("recycling"),
        extra_env={
            "SF_GATEWAY_AUTH_TOKENS": DEVICE_TOKEN,
            "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
            # The gateway's one VAD stream is ended by the server every ~2.5 s.
            "SF_VAD_MAX_CONNECTION_AGE_S": "2",
            "SF_VAD_MAX_CONNECTION_AGE_GRACE_S": "0.5",
        },
    ) as cluster:
        yield cluster


def reconnects(cluster: LocalCluster) -> float:
    text = httpx.get(f"{cluster.gateway_url}/metrics", timeout=5).text
    name = "speechfront_gateway_vad_reconnects_total "
    (line,) = [row for row in text.splitlines() if row.startswith(name)]
    return float(line.split()[1])


async def test_every_utterance_is_recognised_across_vad_connection_recycling(
    recycling: LocalCluster,
) -> None:
    before = reconnects(recycling)
    devices = [
        SimulatedDevice(
            DeviceConfig(url=recycling.device_url, token=DEVICE_TOKEN, device_id=f"recycle-{i}")
        )
        for i in range(DEVICES)
    ]
    await asyncio.gather(*(d.connect() for d in devices))
    spoken = [[SENTENCES[(i + k) % len(SENTENCES)] for k in range(3)] for i in range(DEVICES)]
    results = await asyncio.gather(
        *(
            d.speak_auto([synthesize(s, VOICES[i % len(VOICES)]) for s in sentences], gap_s=1.5)
            for i, (d, sentences) in enumerate(zip(devices, spoken, strict=True))
        )
    )
    await asyncio.gather(*(d.close() for d in devices))
    assert reconnects(recycling) - before >= 3
    for sentences, device_results in zip(spoken, results, strict=True):
        assert [r.message["seq"] for r in device_results] == [1, 2, 3]
        wer = word_error_rate(sentences, [r.text for r in device_results])
        assert wer <= 0.25, [r.text for r in device_results]
