"""Replicas of every service: losing one costs a retry, not an utterance.

One cluster with two replicas of every service (and a third, idle asr slot)
runs these in order; whatever a test left dead is started again after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import httpx
import numpy as np
import pytest
import redis
from conftest import ADMIN_TOKEN, DEVICE_TOKEN
from support.waiting import eventually
from support.wer import word_error_rate

from services.cluster import LocalCluster, Replica
from services.simulator.admin import enrol_speaker
from services.simulator.device import DeviceConfig, SimulatedDevice, SttResult
from services.simulator.phrases import SENTENCES, VOICES
from services.simulator.speech import silence, synthesize, trim_silence

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        tmp_path_factory.mktemp("replicated"),
        replicas={"gateway": 2, "vad": 2, "asr": 2, "speaker": 2},
        idle={"asr": 1},
        extra_env={
            "SF_GATEWAY_AUTH_TOKENS": DEVICE_TOKEN,
            "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
            "SF_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "SF_GATEWAY_SPEAKER_THRESHOLD": "0.86",
            "SF_ASR_MAX_CONNECTION_AGE_S": "5",
            "SF_ASR_MAX_CONNECTION_AGE_GRACE_S": "5",
        },
    )
    cluster.start(timeout=300)
    cluster.start_backend()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
async def restore_replicas(replicated: LocalCluster) -> AsyncIterator[None]:
    """After each test, whatever it left dead is started again, passed or failed: the
    tests share one cluster, and one failure must not take the next ones' replicas."""
    yield
    replicas = {r.name for rs in replicated.replicas.values() for r in rs} | {"redis"}
    for name, running in list(replicated.processes.items()):
        if name in replicas and running.process.poll() is not None:
            await asyncio.to_thread(replicated.respawn, name)


@pytest.fixture(scope="module")
def store(replicated: LocalCluster) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(replicated.redis_url, decode_responses=True)
    yield client
    client.close()


def device(cluster: LocalCluster, device_id: str) -> SimulatedDevice:
    return SimulatedDevice(
        DeviceConfig(url=cluster.device_url, token=DEVICE_TOKEN, device_id=device_id)
    )


def clip(i: int) -> np.ndarray:
    return synthesize(SENTENCES[i % len(SENTENCES)], VOICES[i % len(VOICES)])


def closest(text: str) -> str:
    distances = [word_error_rate([s], [text]) for s in SENTENCES]
    return SENTENCES[distances.index(min(distances))]


def assert_right_text(result: SttResult, spoken: str) -> None:
    assert closest(result.text) == spoken, json.dumps([spoken, result.message])


def enrol(cluster: LocalCluster, device_ids: list[str]) -> None:
    """Voiceprints make every utterance of these devices ask the speaker service too."""
    audio = np.concatenate([synthesize(" ".join(SENTENCES[:3]), "en+m7"), silence(0.2)])
    for device_id in device_ids:
        enrol_speaker(cluster.gateway_url, ADMIN_TOKEN, device_id, "owner", audio)


# A victim name: the VAD replica holding the most streams when the freeze comes. A
# gateway that saw a replica stall (an earlier test's kill, a slow health check on a
# busy machine) prefers the other one for a while, so a fixed name could be frozen
# with no session on it and the freeze go unfelt.
BUSIEST_VAD = "busiest vad"


def resolve_victim(cluster: LocalCluster, name: str) -> str:
    """The process ``name`` stands for: itself, or for BUSIEST_VAD the VAD replica
    holding the most streams now."""
    if name != BUSIEST_VAD:
        return name

    def streams(replica: Replica) -> float:
        url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        found = re.findall(
            r"^speechfront_vad_streams ([0-9.e+-]+)$", httpx.get(url, timeout=5).text, re.MULTILINE
        )
        return float(found[0]) if found else 0.0

    return max(cluster.replicas["vad"], key=streams).name


async def test_backend_reply_reaches_only_its_device(
    replicated: LocalCluster, store: redis.Redis
) -> None:
    a, b = device(replicated, "reply-a"), device(replicated, "reply-b")
    await a.connect()
    await b.connect()
    llm = json.dumps({"type": "llm", "emotion": "happy", "text": "hi"})
    # Subscriptions are made just after the hello; publish reports its listeners.
    await eventually(lambda: store.publish(f"sf:reply:{a.session_id}", llm) > 0, 10, "subscribe")
    message = await a.expect("llm", timeout=5)
    assert message["session_id"] == a.session_id
    store.publish(f"sf:reply:{a.session_id}", b"\x78\x01\x02\x03")  # an Opus packet
    await eventually(lambda: len(a.audio_frames) > 0, 5, "audio reply")
    assert a.audio_frames[0][4:] == b"\x78\x01\x02\x03"  # v3 header, then the packet
    # The echo backend answers each device through whichever gateway holds it.
    [said_b] = await b.speak_auto([clip(2)])
    echo = await b.expect("tts", timeout=10)
    assert echo["text"] == f"You said: {said_b.text}"
    assert a.messages.empty() and len(a.audio_frames) == 1
    assert b.audio_frames == []
    await a.close()
    await b.close()


async def test_new_asr_replica_takes_requests_within_seconds_of_starting(
    replicated: LocalCluster,
) -> None:
    talkers = [device(replicated, f"scale-{i}") for i in range(8)]
    await asyncio.gather(*(d.connect() for d in talkers))

    def talk(group: list[SimulatedDevice], count: int) -> asyncio.Future[list[list[SttResult]]]:
        return asyncio.gather(
            *(
                d.speak_auto([clip(i + k) for k in range(count)], gap_s=1.0, timeout=60)
                for i, d in enumerate(group)
            )
        )

    # Sentences while the replica starts (seconds, loading its model), and more
    # once it is ready, however long the start took: it joins the rotation at
    # the gateways' next health check and must then be given calls.
    during = talk(talkers[:4], 4)
    started = time.monotonic()
    await asyncio.to_thread(replicated.respawn, "asr-2")
    after = talk(talkers[4:], 6)
    metrics_url = f"http://127.0.0.1:{replicated.replicas['asr'][2].metrics_port}/metrics"

    def served() -> bool:
        text = httpx.get(metrics_url, timeout=5).text
        return 'speechfront_requests_total{outcome="ok",service="asr"}' in text

    await eventually(served, 15, "new asr replica got no request within 15 s of being ready")
    results = await during + await after
    assert time.monotonic() - started < 90
    assert [len(r) for r in results] == [4] * 4 + [6] * 4


async def test_compute_and_vad_replica_losses_lose_no_utterance(replicated: LocalCluster) -> None:
    ids = [f"failover-{i}" for i in range(30)]
    await asyncio.to_thread(enrol, replicated, ids)
    devices = [device(replicated, device_id) for device_id in ids]
    await asyncio.gather(*(d.connect() for d in devices))
    spoken = [[SENTENCES[(i + k) % len(SENTENCES)] for k in range(3)] for i in range(30)]
    talk = asyncio.gather(
        *(
            d.speak_auto([clip(i), clip(i + 1), clip(i + 2)], gap_s=1.5, timeout=60)
            for i, d in enumerate(devices)
        )
    )
    retries = gateway_counter(replicated, "speechfront_gateway_compute_retries_total")
    replays = gateway_counter(replicated, "speechfront_gateway_vad_replays_total")
    for name in ("asr-1", "speaker-1", BUSIEST_VAD):
        await asyncio.sleep(3.0)  # let utterances be in flight on every replica
        replicated.kill(resolve_victim(replicated, name))
    results = await talk
    # The premise: calls really were retried and sessions really moved.
    assert gateway_counter(replicated, "speechfront_gateway_compute_retries_total") > retries
    assert gateway_counter(replicated, "speechfront_gateway_vad_replays_total") > replays
    for device_results, sentences in zip(results, spoken, strict=True):
        assert len(device_results) == 3
        for result, sentence in zip(device_results, sentences, strict=True):
            assert_right_text(result, sentence)
    # Exactly one stt each: nothing more arrives for any device.
    await asyncio.sleep(1.0)
    extra = [m for d in devices for m in _drain(d) if m.get("type") == "stt"]
    assert not extra, extra


def gateway_counter(cluster: LocalCluster, name: str) -> float:
    """A gateway metric summed over every live gateway replica and label set."""
    total = 0.0
    for replica in cluster.replicas["gateway"]:
        if cluster.processes[replica.name].process.poll() is not None:
            continue
        text = httpx.get(f"http://127.0.0.1:{replica.port}/metrics", timeout=5).text
        pattern = rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$"
        total += sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))
    return total


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def talk_while_frozen(
    cluster: LocalCluster, prefix: str, victims: list[str], count: int = 30
) -> tuple[list[SimulatedDevice], list[list[SttResult]], float]:
    """``count`` devices say 3 sentences each; the victims are SIGSTOPped mid-speech.

    The victims stay frozen until every device has its results (a hung pod is
    not restarted by anyone here), then they are thawed.
    """
    ids = [f"{prefix}-{i}" for i in range(count)]
    # Sessions are pinned to a VAD replica when they connect, and calls go to the
    # compute replicas in rotation: a replica the gateways have not taken back yet
    # (respawned after an earlier test) would be frozen with nothing on it.
    gateways = len(cluster.replicas["gateway"])
    links = gateways * len(cluster.replicas["vad"])
    await eventually(
        lambda: gateway_counter(cluster, "speechfront_gateway_vad_connected") >= links,
        20,
        "gateways not connected to every VAD replica",
    )
    healthy = "speechfront_gateway_compute_replicas_healthy"
    compute = gateways * sum(
        1 for name in cluster.processes if name.split("-")[0] in ("asr", "speaker")
    )
    await eventually(
        lambda: gateway_counter(cluster, healthy) >= compute,
        20,
        "gateways do not have every asr and speaker replica in rotation",
    )
    if any(v.startswith("speaker") for v in victims):
        await asyncio.to_thread(enrol, cluster, ids)
    devices = [device(cluster, device_id) for device_id in ids]
    await asyncio.gather(*(d.connect() for d in devices))
    talk = asyncio.gather(
        *(
            d.speak_auto([clip(i), clip(i + 1), clip(i + 2)], gap_s=1.5, timeout=60)
            for i, d in enumerate(devices)
        )
    )
    await asyncio.sleep(3.0)  # utterances in flight on every replica
    victims = [resolve_victim(cluster, name) for name in victims]
    frozen_at = time.monotonic()
    pids = [cluster.processes[v].process.pid for v in victims]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        results = await talk
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    return devices, results, frozen_at


def assert_each_sentence_once(
    devices: list[SimulatedDevice], results: list[list[SttResult]], store: redis.Redis
) -> None:
    for i, device_results in enumerate(results):
        assert len(device_results) == 3
        for k, result in enumerate(device_results):
            assert_right_text(result, SENTENCES[(i + k) % len(SENTENCES)])
    entries = cast(list[tuple[str, dict[str, str]]], store.xrange("sf:transcripts"))
    ids = {d.config.device_id for d in devices}
    mine = [f for _, f in entries if f["device_id"] in ids]
    assert len(mine) == len({f["utterance_id"] for f in mine}) == 3 * len(devices)


def in_flight_latencies(results: list[list[SttResult]], frozen_at: float) -> list[float]:
    """User-perceived latency of the utterances answered after the freeze began."""
    return [
        r.latency_s
        for rs in results
        for r in rs
        if r.latency_s is not None and r.received_at >= frozen_at
    ]


async def test_frozen_asr_and_vad_replicas_cost_a_retry_not_an_utterance(
    replicated: LocalCluster, store: redis.Redis
) -> None:
    before = {
        "hedges": gateway_counter(replicated, "speechfront_gateway_compute_hedges_total"),
        "stalls": gateway_counter(replicated, "speechfront_gateway_vad_stalls_total"),
        "replays": gateway_counter(replicated, "speechfront_gateway_vad_replays_total"),
    }
    devices, results, frozen_at = await talk_while_frozen(
        replicated, "freeze", ["asr-1", BUSIEST_VAD]
    )
    assert_each_sentence_once(devices, results, store)
    latencies = in_flight_latencies(results, frozen_at)
    print(
        f"\nasr-1 + vad-1 frozen: {len(latencies)} utterances after the freeze, latency "
        f"p50 {percentile(latencies, 50):.2f} s p95 {percentile(latencies, 95):.2f} s"
    )
    for name, value in before.items():
        metric = {
            "hedges": "speechfront_gateway_compute_hedges_total",
            "stalls": "speechfront_gateway_vad_stalls_total",
            "replays": "speechfront_gateway_vad_replays_total",
        }[name]
        assert gateway_counter(replicated, metric) > value, f"no {name}: the freeze was not felt"
    for d in devices:
        await d.close()


async def test_a_frozen_speaker_replica_costs_a_retry_not_an_utterance(
    replicated: LocalCluster, store: redis.Redis
) -> None:
    hedges = gateway_counter(replicated, "speechfront_gateway_compute_hedges_total")
    devices, results, frozen_at = await talk_while_frozen(replicated, "freeze-spk", ["speaker-1"])
    assert_each_sentence_once(devices, results, store)
    latencies = in_flight_latencies(results, frozen_at)
    print(
        f"\nspeaker-1 frozen: {len(latencies)} utterances after the freeze, latency "
        f"p50 {percentile(latencies, 50):.2f} s p95 {percentile(latencies, 95):.2f} s"
    )
    assert gateway_counter(replicated, "speechfront_gateway_compute_hedges_total") > hedges
    for d in devices:
        await d.close()


async def test_devices_of_a_frozen_gateway_reconnect_elsewhere_and_lose_no_sentence(
    replicated: LocalCluster, store: redis.Redis
) -> None:
    talks = asyncio.gather(
        *(talk_through_gateway_loss(replicated, f"gw-freeze-{i}", [i, i + 1, i + 2], timeout=10)
          for i in range(8))
    )  # fmt: skip
    await asyncio.sleep(4.0)
    victim = replicated.processes["gateway-1"].process
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        outcomes = await talks
    finally:
        # A pod that stops answering its liveness probe is killed and replaced.
        replicated.kill("gateway-1")
    assert all(len(results) == 3 for results, _ in outcomes), outcomes
    assert sum(reconnects for _, reconnects in outcomes) >= 1
    for i, (results, _) in enumerate(outcomes):
        for k, result in enumerate(results):
            assert_right_text(result, SENTENCES[(i + k) % len(SENTENCES)])
    await asyncio.to_thread(replicated.respawn, "gateway-1")
    await until_the_front_uses(replicated, store, "gateway-1")


async def until_the_front_uses(cluster: LocalCluster, store: redis.Redis, gateway: str) -> None:
    """Connect through the front until a device lands on ``gateway`` (its readiness
    probe has to see a restarted gateway before it sends devices there)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        probe = device(cluster, "front-probe")
        await probe.connect()
        key = f"sf:session:{probe.session_id}"
        for _ in range(50):
            if store.hget(key, "gateway_id") is not None:
                break
            await asyncio.sleep(0.05)
        landed = store.hget(key, "gateway_id")
        await probe.close()
        if landed == gateway:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the front sent no device to {gateway} within 15 s")


async def test_a_device_connecting_through_another_gateway_closes_its_old_connection(
    replicated: LocalCluster, store: redis.Redis
) -> None:
    first_gw, second_gw = replicated.replicas["gateway"][:2]

    def direct(replica_port: int) -> SimulatedDevice:
        url = f"ws://127.0.0.1:{replica_port}/xiaozhi/v1/"
        return SimulatedDevice(DeviceConfig(url=url, token=DEVICE_TOKEN, device_id="moving"))

    old, new = direct(first_gw.port), direct(second_gw.port)
    route = lambda: store.hget("sf:device:moving", "session_id")  # noqa: E731
    await old.connect()
    # The device's route is how the second gateway finds the first session.
    await eventually(lambda: route() == old.session_id, 5, "sf:device names the first session")
    await new.connect()
    code, reason = await old.wait_closed(10)
    assert code == 1000 and "replaced" in reason
    await eventually(lambda: route() == new.session_id, 5, "sf:device names the new session")
    [result] = await new.speak_auto([clip(1)])
    assert_right_text(result, SENTENCES[1])
    await new.close()


def _drain(d: SimulatedDevice) -> list[dict[str, object]]:
    items = []
    while not d.messages.empty():
        items.append(d.messages.get_nowait())
    return items


async def talk_through_gateway_loss(
    cluster: LocalCluster, device_id: str, sentences: list[int], timeout: float = 20
) -> tuple[list[SttResult], int]:
    """Speak each sentence; on a dropped connection reconnect (via the front) and go on."""
    results: list[SttResult] = []
    reconnects, pending = 0, list(sentences)
    while pending and reconnects < 5:
        d = device(cluster, device_id)
        try:
            await d.connect()
            while pending:
                [result] = await d.speak_auto([clip(pending[0])], timeout=timeout)
                results.append(result)
                pending.pop(0)
        except Exception:
            reconnects += 1
        finally:
            await d.close()
    return results, reconnects


async def test_gateway_loss_devices_reconnect_and_each_utterance_is_recorded_once(
    replicated: LocalCluster, store: redis.Redis
) -> None:
    talks = asyncio.gather(
        *(talk_through_gateway_loss(replicated, f"gw-loss-{i}", [i, i + 1, i + 2])
          for i in range(8))
    )  # fmt: skip
    await asyncio.sleep(4.0)
    replicated.kill("gateway-1")
    outcomes = await talks
    assert all(len(results) == 3 for results, _ in outcomes), outcomes
    assert sum(reconnects for _, reconnects in outcomes) >= 1
    entries = cast(list[tuple[str, dict[str, str]]], store.xrange("sf:transcripts"))
    ids = [f["utterance_id"] for _, f in entries if f["device_id"].startswith("gw-loss-")]
    assert len(ids) == len(set(ids)), "an utterance id appears twice in the transcript stream"
    delivered = {r.message["utterance_id"] for results, _ in outcomes for r in results}
    assert delivered <= set(ids)
    await asyncio.to_thread(replicated.respawn, "gateway-1")


async def test_redis_outage_keeps_speech_recognised_and_state_is_written_after(
    replicated: LocalCluster, store: redis.Redis
) -> None:
    d = device(replicated, "redis-outage")
    await d.connect()
    replicated.kill("redis")
    during = await d.speak_auto([clip(0), clip(1)], gap_s=1.5)
    assert [r.text for r in during] and all(r.text for r in during)
    ready = httpx.get(f"{replicated.gateway_url}/readyz", timeout=5).json()
    assert ready["status"] == "degraded"
    await asyncio.sleep(max(0.0, 10.0 - 5.0))  # keep Redis down about 10 s in all
    await asyncio.to_thread(replicated.respawn, "redis")
    key = f"sf:session:{d.session_id}"
    # Writes queued during the outage are replayed in order: wait for the last one.
    await eventually(
        lambda: store.hget(key, "last_utterance_id") == during[-1].message["utterance_id"],
        15,
        "state rewritten",
    )
    assert all(p.process.poll() is None for n, p in replicated.processes.items() if n != "front")
    await d.close()


async def test_sigterm_on_a_gateway_loses_no_utterance_that_had_ended(
    replicated: LocalCluster, store: redis.Redis
) -> None:
    devices = [device(replicated, f"drain-{i}") for i in range(6)]
    await asyncio.gather(*(d.connect() for d in devices))

    def gateway_of(d: SimulatedDevice) -> str | None:
        value = store.hget(f"sf:session:{d.session_id}", "gateway_id")
        return None if value is None else str(value)

    await eventually(lambda: all(gateway_of(d) for d in devices), 10, "session records")
    on_target = [d for d in devices if gateway_of(d) == "gateway-1"]
    assert on_target, "the front spread no device onto gateway-1"
    first, second = synthesize("open the front door"), clip(4)
    talk = asyncio.gather(
        *(d.speak_auto([first, second], gap_s=1.5, timeout=30) for d in devices),
        return_exceptions=True,
    )
    # The first utterance (about 1.3 s after 0.3 s of silence) has ended by now.
    await asyncio.sleep(3.5)
    replicated.processes["gateway-1"].process.send_signal(signal.SIGTERM)
    outcomes = dict(zip(devices, await talk, strict=True))
    for d in on_target:
        code, _ = await d.wait_closed(30)
        assert code == 1012
        # The drain hands a session off once an utterance has ended: the device
        # may have heard both sentences before its socket closed.
        heard = outcomes[d]
        said = [r.text for r in heard] if isinstance(heard, list) else []
        texts = said + [str(m["text"]) for m in _drain(d) if m.get("type") == "stt"]
        assert texts and word_error_rate(["open the front door"], [texts[0]]) <= 0.25, texts
    await asyncio.to_thread(replicated.respawn, "gateway-1")


async def test_a_device_whose_hello_comes_after_the_drain_began_is_handed_off_not_cut(
    replicated: LocalCluster,
) -> None:
    """Its upgrade was accepted before the drain: the session joins the hub after
    the drain took its list, and is handed off like the others, at the end of
    what it says, rather than cut when the server stops."""
    replica = replicated.replicas["gateway"][1]
    late = SimulatedDevice(
        DeviceConfig(
            url=f"ws://127.0.0.1:{replica.port}/xiaozhi/v1/",
            token=DEVICE_TOKEN,
            device_id="drain-late",
        )
    )
    await late.connect(send_hello=False)
    replicated.processes["gateway-1"].process.send_signal(signal.SIGTERM)

    def draining() -> bool:
        try:
            ready = httpx.get(f"http://127.0.0.1:{replica.port}/readyz", timeout=5)
        except httpx.ConnectError:
            return False  # gone: it stopped without waiting for the hello
        return bool(ready.json().get("status") == "draining")

    await eventually(draining, 10, "gateway-1 did not stay up, draining, for the coming hello")
    await late.hello()
    await late.listen("start", "auto")
    speech = np.concatenate([silence(0.3), trim_silence(clip(5)), silence(1.5)])
    with contextlib.suppress(Exception):  # the hand-off may come in the silence after
        await late.stream(speech)
    stt = await late.expect("stt", timeout=30)  # delivered before the socket closed
    assert closest(str(stt["text"])) == SENTENCES[5 % len(SENTENCES)], stt
    code, reason = await late.wait_closed(30)
    assert code == 1012, (code, reason)
    await asyncio.to_thread(replicated.processes["gateway-1"].process.wait, 30)
    await asyncio.to_thread(replicated.respawn, "gateway-1")
