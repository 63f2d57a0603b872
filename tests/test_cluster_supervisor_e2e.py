"""A supervised local cluster restarts what dies, as a pod's restart policy would.

Two replicas of every service; while simulated devices talk, one replica of
each kind gets SIGKILL from outside. Each comes back on its own ports, nothing
else exits, and every utterance spoken gets its stt.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import cast

import pytest
import redis
from conftest import ADMIN_TOKEN, DEVICE_TOKEN, SPEAKER_THRESHOLD
from test_failover_e2e import assert_right_text, clip, enrol, talk_through_gateway_loss

from services.cluster import LocalCluster
from services.probes import probe_grpc, probe_http
from services.simulator.device import DeviceConfig, SimulatedDevice
from services.simulator.phrases import SENTENCES

pytestmark = pytest.mark.e2e

VICTIMS = ("vad-1", "asr-1", "speaker-1", "gateway-1")
SENTENCES_EACH = 4


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        tmp_path_factory.mktemp("supervised"),
        replicas={"gateway": 2, "vad": 2, "asr": 2, "speaker": 2},
        extra_env={
            "SF_GATEWAY_AUTH_TOKENS": DEVICE_TOKEN,
            "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
            "SF_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "SF_GATEWAY_SPEAKER_THRESHOLD": SPEAKER_THRESHOLD,
        },
        supervise=True,
    )
    cluster.start(timeout=300)
    try:
        yield cluster
    finally:
        cluster.stop()


async def healthy_again(cluster: LocalCluster, name: str, killed_at: float) -> float:
    """Seconds from the kill until the supervisor has the restarted process healthy."""
    assert cluster.supervisor is not None
    deadline = killed_at + 90
    while True:
        status = cluster.supervisor.status(name)
        if status.restarts >= 1 and status.state == "running":
            return time.monotonic() - killed_at
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not back within 90 s: {status}")
        await asyncio.sleep(0.1)


def serves_on_its_ports(cluster: LocalCluster, name: str) -> bool:
    replica = cluster.replica(name)
    if replica.service == "gateway":
        return probe_http(f"http://127.0.0.1:{replica.port}/readyz")
    metrics = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    return probe_grpc(replica.port) and probe_http(metrics)


async def test_killed_replicas_come_back_on_their_ports_and_no_utterance_is_lost(
    supervised: LocalCluster,
) -> None:
    cluster = supervised
    direct_ids = [f"sup-direct-{i}" for i in range(6)]
    front_ids = [f"sup-front-{i}" for i in range(6)]
    # Voiceprints make every utterance ask the speaker service too.
    await asyncio.to_thread(enrol, cluster, direct_ids + front_ids)
    pids = {name: proc.process.pid for name, proc in cluster.processes.items()}

    # These talk to the gateway that survives: no reconnect, so a lost
    # utterance fails them. The others go through the front and reconnect
    # when their gateway dies, as devices do.
    survivor = cluster.replicas["gateway"][0]
    direct = [
        SimulatedDevice(
            DeviceConfig(
                url=f"ws://127.0.0.1:{survivor.port}/xiaozhi/v1/",
                token=DEVICE_TOKEN,
                device_id=device_id,
            )
        )
        for device_id in direct_ids
    ]
    await asyncio.gather(*(d.connect() for d in direct))
    said = [[i + k for k in range(SENTENCES_EACH)] for i in range(len(direct_ids + front_ids))]
    direct_talk = asyncio.gather(
        *(
            d.speak_auto([clip(k) for k in said[i]], gap_s=1.5, timeout=90)
            for i, d in enumerate(direct)
        )
    )
    front_talk = asyncio.gather(
        *(
            talk_through_gateway_loss(cluster, device_id, said[len(direct) + i], timeout=60)
            for i, device_id in enumerate(front_ids)
        )
    )

    comebacks = []
    for victim in VICTIMS:
        await asyncio.sleep(2.0)  # utterances in flight on every replica
        os.kill(cluster.processes[victim].process.pid, signal.SIGKILL)
        comebacks.append(asyncio.create_task(healthy_again(cluster, victim, time.monotonic())))
    recovery = await asyncio.gather(*comebacks)
    direct_results = await direct_talk
    front_outcomes = await front_talk
    await asyncio.gather(*(d.close() for d in direct))

    # Every utterance got its stt, with the right text.
    for results, sentences in zip(direct_results, said, strict=False):
        assert len(results) == SENTENCES_EACH
        for result, k in zip(results, sentences, strict=True):
            assert_right_text(result, SENTENCES[k % len(SENTENCES)])
    for (results, reconnects), sentences in zip(front_outcomes, said[len(direct) :], strict=True):
        assert len(results) == SENTENCES_EACH, (results, reconnects)
        assert reconnects <= 1  # only the loss of its gateway
        for result, k in zip(results, sentences, strict=True):
            assert_right_text(result, SENTENCES[k % len(SENTENCES)])
    assert sum(reconnects for _, reconnects in front_outcomes) >= 1, "gateway-1 held no device"
    store = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        entries = cast(list[tuple[str, dict[str, str]]], store.xrange("sf:transcripts"))
    finally:
        store.close()
    ids = [f["utterance_id"] for _, f in entries if f["device_id"].startswith("sup-")]
    assert len(ids) == len(set(ids)), "an utterance is in the transcript stream twice"

    # Each victim was restarted once, on its own ports; nothing else ever exited.
    restarts = cluster.restarts
    for name, pid in pids.items():
        proc = cluster.processes[name].process
        if name in VICTIMS:
            assert restarts[name] == 1 and proc.pid != pid and proc.poll() is None, name
            assert serves_on_its_ports(cluster, name), name
        else:
            assert restarts[name] == 0 and proc.pid == pid and proc.poll() is None, name

    # A test's own respawn of a process the supervisor restarted spawns nothing.
    restarted = {v: cluster.processes[v].process.pid for v in VICTIMS}
    for victim in VICTIMS:
        await asyncio.to_thread(cluster.respawn, victim, 10)
    assert {v: cluster.processes[v].process.pid for v in VICTIMS} == restarted
    assert cluster.restarts == restarts

    spoken = sum(len(s) for s in said)
    received = sum(map(len, direct_results)) + sum(len(r) for r, _ in front_outcomes)
    figures = ", ".join(f"{v} {s:.1f} s" for v, s in zip(VICTIMS, recovery, strict=True))
    print(f"\nkill -9 to healthy again: {figures}; utterances spoken {spoken}, stt {received}")
