"""A VAD replica at its stream limit: refused sessions back off, then get a stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from conftest import DEVICE_TOKEN
from support.wer import word_error_rate

from services.cluster import LocalCluster
from services.simulator.device import DeviceConfig, SimulatedDevice
from services.simulator.speech import silence, synthesize

pytestmark = pytest.mark.e2e

SENTENCE = "turn on the kitchen lights"


@pytest.fixture(scope="module")
def one_stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(
        tmp_path_factory.mktemp("one-stream"),
        extra_env={
            "SF_GATEWAY_AUTH_TOKENS": DEVICE_TOKEN,
            "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
            "SF_VAD_MAX_STREAMS": "1",
        },
    ) as cluster:
        yield cluster


def refusals(cluster: LocalCluster) -> float:
    text = httpx.get(f"http://127.0.0.1:{cluster.ports.vad_metrics}/metrics", timeout=5).text
    name = 'speechfront_vad_stream_errors_total{reason="max_streams"} '
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(name))


async def test_a_refused_session_backs_off_and_gets_a_stream_once_one_is_free(
    one_stream: LocalCluster,
) -> None:
    holder, waiter = (
        SimulatedDevice(DeviceConfig(url=one_stream.device_url, token=DEVICE_TOKEN))
        for _ in range(2)
    )
    await holder.connect()
    await waiter.connect()
    await holder.listen("start", "auto")
    await holder.stream(silence(0.5))  # the holder's stream is open and fed
    before = refusals(one_stream)
    await waiter.listen("start", "auto")
    await waiter.stream(silence(3.0))
    refused = refusals(one_stream) - before
    # Immediately, then after 0.25, 0.5, 1 and 2 s: a handful, not a tight loop.
    assert 1 <= refused <= 6, refused
    await holder.listen("stop")
    # The waiter's next attempt (within 2 s) gets the freed stream and hears it.
    results = await asyncio.wait_for(
        waiter.speak_auto([synthesize(SENTENCE)], lead_s=2.5), timeout=40
    )
    assert word_error_rate([SENTENCE], [results[0].text]) <= 0.2, results[0].text
    await holder.close()
    await waiter.close()
