"""A result whose device left before it came reaches the device's next session.

A device that is handed off by a draining gateway, or whose network drops,
reconnects at once; its new session reads the results kept for it when it
begins. A result that comes only after that (the ASR was slow) is kept too,
and the new session is told, wherever it is.
"""

from __future__ import annotations

import os
import signal

import pytest
import redis
from conftest import DeviceFactory
from support.waiting import eventually
from support.wer import word_error_rate

from services.cluster import LocalCluster
from services.simulator.speech import synthesize, trim_silence

pytestmark = pytest.mark.e2e

SENTENCE = "turn off the lights in the hallway"


async def test_a_result_that_comes_after_the_device_reconnected_reaches_its_new_session(
    cluster: LocalCluster, make_device: DeviceFactory, redis_client: redis.Redis
) -> None:
    device_id = "redeliver-late"
    key = f"sf:undelivered:{device_id}"
    first = make_device(device_id=device_id)
    await first.connect()
    asr = cluster.processes["asr"].process
    # The recognition is held back until the device has a new session.
    os.kill(asr.pid, signal.SIGSTOP)
    try:
        await first.listen("start", "manual")
        await first.stream(trim_silence(synthesize(SENTENCE)))
        await first.listen("stop")  # the utterance is cut and sent to the frozen ASR
        await first.close()
        second = make_device(device_id=device_id)
        await second.connect()  # reads the kept results: there are none yet
        assert redis_client.llen(key) == 0
    finally:
        os.kill(asr.pid, signal.SIGCONT)
    stt = await second.expect("stt", timeout=30)
    assert stt["redelivered"] is True
    assert stt["session_id"] == second.session_id
    assert stt["original_session_id"] == first.session_id
    assert word_error_rate([SENTENCE], [str(stt["text"])]) <= 0.2, stt
    await eventually(lambda: redis_client.llen(key) == 0, 5, "the kept result was not taken")
