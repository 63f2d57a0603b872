"""Dashboards, rules and autoscalers ask for metrics the running services really export,
and each alert fires when its condition is provoked.

A real Prometheus (Debian's `prometheus`) scrapes the local cluster every
second, with the recording rules and alerts of the PrometheusRule loaded, and
every dashboard panel's query must return data from it after one simulated
device utterance.

Alerts are provoked for real where the signal is ours: a gateway with a
session cap of two holds two devices, a frozen VAD replica stalls its
gateway, a frozen asr replica fails an utterance and drops out of the
scrape. Signals of exporters that only run in Kubernetes (kube-state-metrics,
dcgm-exporter, redis_exporter) come from a stand-in exporter, a static
/metrics page the test writes in those exporters' own series. Every alert's
`for` is shortened to 0 s in the loaded copy of the rules: the tests wait for
the condition, not for its duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from conftest import ADMIN_TOKEN, DEVICE_TOKEN, DeviceFactory
from prometheus_client.parser import text_string_to_metric_families
from support.deploy import (
    EXPORTER_METRICS,
    PROMETHEUS_GENERATED,
    Query,
    autoscaler_queries,
    concrete,
    dashboard_panels,
    dashboard_queries,
    metric_names,
    recorded_names,
    render,
    rule_groups,
    rule_queries,
)
from support.processes import stop_process

from services.cluster import LocalCluster
from services.common.audio import write_wav
from services.probes import free_port, probe_http
from services.simulator.device import DeviceConfig, SimulatedDevice
from services.simulator.speech import silence, synthesize

pytestmark = pytest.mark.e2e

# Panels left out of the live check, each with its reason.
KUBERNETES_ONLY = (
    "its metrics come from an exporter that only runs in a Kubernetes cluster "
    "(kube-state-metrics, dcgm-exporter, the redis_exporter sidecar)"
)
PANELS_NEEDING_KUBERNETES = {
    f"speechfront / {where}": KUBERNETES_ONLY
    for where in (
        "overview / Replicas available (kube-state-metrics)",
        "capacity / Replicas against the autoscaler's maximum (kube-state-metrics)",
        "capacity / Pods waiting for a GPU, restarts and OOM kills (kube-state-metrics)",
        "capacity / GPU memory used and utilisation (dcgm-exporter)",
        "capacity / Redis memory against maxmemory (redis_exporter)",
    )
}
SCRAPE_TIMEOUT_S = 60.0
ENROL_TEXT = "this is how my voice sounds when I talk to the assistant every single morning"


@dataclass(frozen=True)
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result


def _metrics_urls(cluster: LocalCluster) -> dict[str, str]:
    p = cluster.ports
    return {
        "gateway": f"127.0.0.1:{p.gateway}",
        "vad": f"127.0.0.1:{p.vad_metrics}",
        "asr": f"127.0.0.1:{p.asr_metrics}",
        "speaker": f"127.0.0.1:{p.speaker_metrics}",
    }


def _exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can produce, samples or not yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.update({family.name, f"{family.name}_total"})
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def _wait_until(check: Any, what: str, timeout: float = SCRAPE_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout * 4) + 1):
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


class StandIn:
    """A static /metrics page in the series of exporters that only run in Kubernetes."""

    def __init__(self) -> None:
        self.text = HEALTHY_EXPORTERS
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = page.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


POD = 'namespace="speechfront",pod="asr-7d9f-x2k"'
HPA = 'namespace="speechfront",horizontalpodautoscaler="keda-hpa-asr"'
GPU_REQUEST = 'container="asr",resource="nvidia_com_gpu",unit="integer"'
HEALTHY_EXPORTERS = f"""\
kube_pod_container_status_restarts_total{{{POD},container="asr"}} 0
kube_pod_container_status_last_terminated_reason{{{POD},\
container="asr",reason="Completed"}} 1
kube_pod_status_phase{{{POD},phase="Running"}} 1
kube_pod_status_phase{{{POD},phase="Pending"}} 0
kube_pod_container_resource_requests{{{POD},{GPU_REQUEST}}} 1
kube_horizontalpodautoscaler_status_current_replicas{{{HPA}}} 3
kube_horizontalpodautoscaler_spec_max_replicas{{{HPA}}} 8
DCGM_FI_DEV_FB_USED{{{POD},gpu="0"}} 6000
DCGM_FI_DEV_FB_FREE{{{POD},gpu="0"}} 18000
DCGM_FI_DEV_GPU_UTIL{{{POD},gpu="0"}} 40
redis_memory_used_bytes{{namespace="speechfront",pod="redis-0"}} 100000000
redis_memory_max_bytes{{namespace="speechfront",pod="redis-0"}} 1468006400
"""


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    page = StandIn()
    yield page
    page.close()


@pytest.fixture(scope="module")
def capped_gateway(cluster: LocalCluster) -> Iterator[str]:
    """A second gateway of the cluster that admits two sessions; its address."""
    port = free_port()
    env = {
        **cluster.env(),
        "SF_GATEWAY_HOST": "127.0.0.1",
        "SF_GATEWAY_PORT": str(port),
        "SF_GATEWAY_GATEWAY_ID": "capped",
        "SF_GATEWAY_MAX_SESSIONS": "2",
        "SF_GATEWAY_FUNASR_PORT": "0",
    }
    log = (cluster.run_dir / "capped-gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "gateway"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        _wait_until(
            lambda: process.poll() is None and probe_http(f"http://127.0.0.1:{port}/readyz"),
            "the capped gateway to be ready",
        )
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process, 30)
        log.close()


def _rules_for_the_test() -> list[dict[str, Any]]:
    """The PrometheusRule's groups, evaluated every second, alerts without `for`."""
    groups = []
    for group in rule_groups(render("gpu")):
        rules = [dict(r, **{"for": "0s"}) if "alert" in r else r for r in group["rules"]]
        groups.append(dict(group, interval="1s", rules=rules))
    return groups


@pytest.fixture(scope="module")
def prometheus(
    cluster: LocalCluster,
    stand_in: StandIn,
    capped_gateway: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing (Debian package prometheus; make sysdeps)"
    workdir = tmp_path_factory.mktemp("prometheus")
    groups = _rules_for_the_test()
    (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    targets = {job: [target] for job, target in _metrics_urls(cluster).items()}
    targets["gateway"].append(capped_gateway)
    targets["kubernetes-exporters"] = [stand_in.address]
    scrape_configs = [
        {
            "job_name": job,
            "honor_labels": True,  # as the ServiceMonitors
            "metrics_path": "/metrics",
            "static_configs": [{"targets": addresses}],
        }
        for job, addresses in targets.items()
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(workdir / "rules.yaml")],
        "scrape_configs": scrape_configs,
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{port}", process)
    try:

        def all_targets_up() -> bool:
            assert process.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            try:
                targets = server.api("/api/v1/targets")["activeTargets"]
            except OSError:
                return False
            return len(targets) == 6 and all(t["health"] == "up" for t in targets)

        _wait_until(all_targets_up, "Prometheus to scrape the services and the stand-in")
        yield server
    finally:
        stop_process(process, 10)
        log.close()


_spoken: set[str] = set()


@pytest.fixture
async def utterance_spoken(
    prometheus: Prometheus, cluster: LocalCluster, make_device: DeviceFactory
) -> Prometheus:
    """One utterance of a device with an enrolled voice while Prometheus watches (once).

    The gateway calls the speaker service only for devices with voiceprints,
    so the device enrols one first.
    """
    if cluster.device_url not in _spoken:
        device = make_device()
        reply = httpx.post(
            f"{cluster.gateway_url}/v1/devices/{device.config.device_id}/speakers",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            data={"name": "alex"},
            files={"audio": ("enrol.wav", write_wav(synthesize(ENROL_TEXT)), "audio/wav")},
            timeout=30,
        )
        assert reply.status_code == 201, reply.text
        await device.connect()
        [result] = await device.speak_auto([synthesize("turn on the lights")], timeout=60)
        assert result.text
        _spoken.add(cluster.device_url)
    return prometheus


def _all_queries() -> list[Query]:
    objects = render("gpu")
    return dashboard_queries() + rule_queries(objects) + autoscaler_queries(objects)


def test_kube_state_metrics_exclusions_are_exactly_the_panels_that_need_them() -> None:
    needing = {
        where
        for where, panel in dashboard_panels()
        if any(metric_names(t["expr"]) & EXPORTER_METRICS for t in panel["targets"])
    }
    assert needing == set(PANELS_NEEDING_KUBERNETES)


async def test_every_referenced_metric_is_exported_by_the_services(
    utterance_spoken: Prometheus, cluster: LocalCluster
) -> None:
    exported: set[str] = set()
    for target in _metrics_urls(cluster).values():
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as reply:
            exported |= _exported_names(reply.read().decode())
    recorded = recorded_names(render("gpu"))
    referenced = {name for q in _all_queries() for name in metric_names(q.expr)}
    ours = referenced - EXPORTER_METRICS - PROMETHEUS_GENERATED - recorded
    assert ours, "no metric names found in the queries"
    assert ours <= exported, f"not exported: {sorted(ours - exported)}"


async def test_every_dashboard_panel_query_returns_data(utterance_spoken: Prometheus) -> None:
    pending = {
        f"{where} [{t['refId']}]": concrete(t["expr"])
        for where, panel in dashboard_panels()
        if where not in PANELS_NEEDING_KUBERNETES
        for t in panel["targets"]
    }
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    for _ in range(int(SCRAPE_TIMEOUT_S) + 1):
        pending = {k: e for k, e in pending.items() if not utterance_spoken.query(e)}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not pending, "panels without data:\n" + "\n".join(
        f"{k}: {e}" for k, e in pending.items()
    )


async def test_prometheus_evaluates_every_rule_without_error(
    utterance_spoken: Prometheus,
) -> None:
    def evaluated_rules() -> list[dict[str, Any]]:
        groups = utterance_spoken.api("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else []

    rules = _wait_until(evaluated_rules, "every rule to be evaluated once")
    expected = {q.source.removeprefix("rule ") for q in rule_queries(render("gpu"))}
    assert {r["name"] for r in rules} == expected
    assert [r["name"] for r in rules if r["health"] != "ok"] == []


async def test_latency_percentile_recording_rule_sees_the_utterance(
    utterance_spoken: Prometheus,
) -> None:
    series = _wait_until(
        lambda: utterance_spoken.query("speechfront:gateway_processing_seconds:p95_5m > 0"),
        "the p95 recording rule to see the utterance",
    )
    assert 0 < float(series[0]["value"][1]) <= 10


# -- alerts, provoked -------------------------------------------------------------


def _firing(prom: Prometheus, alert: str, **labels: str) -> bool:
    return any(
        a["labels"]["alertname"] == alert
        and a["state"] == "firing"
        and all(a["labels"].get(k) == v for k, v in labels.items())
        for a in prom.api("/api/v1/alerts")["alerts"]
    )


def _failed_utterances(cluster: LocalCluster) -> float:
    """Utterances of the cluster's gateway that got no transcript (asr_error, overloaded)."""
    with urllib.request.urlopen(f"{cluster.gateway_url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "speechfront_gateway_utterances_total"
        and sample.labels.get("outcome") in ("asr_error", "overloaded")
    )


async def test_a_gateway_at_its_session_cap_fires_near_session_cap(
    prometheus: Prometheus, capped_gateway: str, make_device: DeviceFactory
) -> None:
    devices = [make_device(url=f"ws://{capped_gateway}/xiaozhi/v1/") for _ in range(2)]
    for device in devices:
        await device.connect()
    _wait_until(
        lambda: _firing(prometheus, "SpeechfrontGatewayNearSessionCap", instance=capped_gateway),
        "SpeechfrontGatewayNearSessionCap for the capped gateway",
    )
    for device in devices:
        await device.close()


# What the stand-in exporters report to provoke each alert on their signals.
EXPORTER_CONDITIONS = {
    "SpeechfrontPodsRestarting": [('container="asr"} 0', 'container="asr"} 5')],
    "SpeechfrontContainerOOMKilled": [
        ('reason="Completed"} 1', 'reason="OOMKilled"} 1'),
        ('container="asr"} 0', 'container="asr"} 1'),
    ],
    "SpeechfrontGpuPodsPending": [('phase="Running"} 1', 'phase="Running"} 0'),
                                  ('phase="Pending"} 0', 'phase="Pending"} 1')],
    "SpeechfrontAutoscalerAtMax": [('"keda-hpa-asr"} 3', '"keda-hpa-asr"} 8')],
    "SpeechfrontGpuMemoryHigh": [('} 6000', '} 23000'), ('} 18000', '} 1000')],
    "SpeechfrontGpuSaturated": [('} 40', '} 99')],
    "SpeechfrontRedisMemoryHigh": [('} 100000000', '} 1400000000')],
}  # fmt: skip


@pytest.mark.parametrize("alert", sorted(EXPORTER_CONDITIONS))
def test_an_alert_on_kubernetes_signals_fires_when_its_exporter_reports_the_condition(
    prometheus: Prometheus, stand_in: StandIn, alert: str
) -> None:
    text = HEALTHY_EXPORTERS
    for healthy, provoked in EXPORTER_CONDITIONS[alert]:
        assert text.count(healthy) == 1, healthy
        text = text.replace(healthy, provoked)
    assert not _firing(prometheus, alert)
    stand_in.text = text
    try:
        _wait_until(lambda: _firing(prometheus, alert), alert)
    finally:
        stand_in.text = HEALTHY_EXPORTERS


@pytest.fixture
async def listening_device(make_device: DeviceFactory) -> AsyncIterator[SimulatedDevice]:
    """A device of the cluster's gateway listening in auto mode, sending silence."""
    device = make_device()
    await device.connect()
    await device.listen("start", "auto")
    stream = asyncio.create_task(device.stream(silence(30.0)))
    yield device
    stream.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await stream


async def test_a_frozen_vad_replica_fires_vad_falling_behind(
    prometheus: Prometheus, cluster: LocalCluster, listening_device: SimulatedDevice
) -> None:
    assert not _firing(prometheus, "SpeechfrontVadFallingBehind")
    vad = cluster.processes["vad"].process
    os.kill(vad.pid, signal.SIGSTOP)
    try:
        # The gateway gives the replica up after SF_GATEWAY_VAD_PROGRESS_TIMEOUT_S (10 s).
        await asyncio.to_thread(
            _wait_until,
            lambda: _firing(prometheus, "SpeechfrontVadFallingBehind"),
            "SpeechfrontVadFallingBehind",
        )
    finally:
        os.kill(vad.pid, signal.SIGCONT)

    def gateway_has_vad_again() -> bool:
        reply = httpx.get(f"{cluster.gateway_url}/readyz", timeout=5).json()
        return bool(reply["checks"]["vad"])

    await asyncio.to_thread(_wait_until, gateway_has_vad_again, "the gateway to reconnect its VAD")


@dataclass
class AsrFreeze:
    metrics_missing_fired: bool


@pytest.fixture(scope="module")
async def asr_freeze(prometheus: Prometheus, cluster: LocalCluster) -> AsrFreeze:
    """The only asr replica frozen while a device says two sentences, 3 s apart.

    Both fail (asr_error after the 10 s deadline), at different scrapes, so the
    failure counter is seen to rise. Meanwhile Prometheus cannot scrape asr.
    """
    device = SimulatedDevice(DeviceConfig(url=cluster.device_url, token=DEVICE_TOKEN))
    await device.connect()
    before = _failed_utterances(cluster)
    asr = cluster.processes["asr"].process
    os.kill(asr.pid, signal.SIGSTOP)
    missing = False
    try:
        await device.listen("start", "auto")
        for sentence in ("turn on the lights", "open the door"):
            await device.stream(np.concatenate([synthesize(sentence), silence(2.0)]))
        missing = await asyncio.to_thread(
            _wait_until,
            lambda: _firing(prometheus, "SpeechfrontAutoscalerMetricsMissing", job="asr"),
            "SpeechfrontAutoscalerMetricsMissing for asr",
        )
        await asyncio.to_thread(
            _wait_until,
            lambda: _failed_utterances(cluster) >= before + 2,
            "two utterances to fail",
        )
    finally:
        os.kill(asr.pid, signal.SIGCONT)
        await device.close()
    await asyncio.to_thread(cluster.wait_healthy, "asr", 30)
    return AsrFreeze(metrics_missing_fired=bool(missing))


async def test_an_unscraped_tier_fires_autoscaler_metrics_missing(asr_freeze: AsrFreeze) -> None:
    assert asr_freeze.metrics_missing_fired


async def test_utterances_without_a_transcript_burn_the_latency_budget(
    prometheus: Prometheus, asr_freeze: AsrFreeze
) -> None:
    # Both failures count as bad events: over 14.4 % of the few utterances here.
    await asyncio.to_thread(
        _wait_until,
        lambda: _firing(prometheus, "SpeechfrontLatencyBudgetFastBurn"),
        "SpeechfrontLatencyBudgetFastBurn",
    )


async def test_utterances_without_a_transcript_burn_the_latency_budget_slowly_too(
    prometheus: Prometheus, asr_freeze: AsrFreeze
) -> None:
    await asyncio.to_thread(
        _wait_until,
        lambda: _firing(prometheus, "SpeechfrontLatencyBudgetSlowBurn"),
        "SpeechfrontLatencyBudgetSlowBurn",
    )
