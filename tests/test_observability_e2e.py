"""Dashboards, rules and autoscalers ask for metrics the running services really export.

A real Prometheus (Debian's `prometheus`) scrapes the local cluster every
second, with the recording rules and alerts of the PrometheusRule loaded, and
every dashboard panel's query must return data from it after one simulated
device utterance.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml
from conftest import ADMIN_TOKEN, DeviceFactory
from prometheus_client.parser import text_string_to_metric_families
from support.deploy import (
    KUBE_STATE_METRICS,
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

from services.cluster import LocalCluster, free_port
from services.common.audio import write_wav
from services.simulator.speech import synthesize

pytestmark = pytest.mark.e2e

# Panels left out of the live check, each with its reason.
PANELS_NEEDING_KUBERNETES = {
    "speechfront / overview / Replicas available (kube-state-metrics)": (
        "kube_deployment_status_replicas_available comes from kube-state-metrics, "
        "which only runs in a Kubernetes cluster"
    ),
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


@pytest.fixture(scope="module")
def prometheus(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing (Debian package prometheus; make sysdeps)"
    workdir = tmp_path_factory.mktemp("prometheus")
    groups = [dict(g, interval="1s") for g in rule_groups(render("gpu"))]
    (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    scrape_configs = [
        {
            "job_name": job,
            "honor_labels": True,  # as the ServiceMonitors
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [target]}],
        }
        for job, target in _metrics_urls(cluster).items()
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
            return len(targets) == 4 and all(t["health"] == "up" for t in targets)

        _wait_until(all_targets_up, "Prometheus to scrape all four services")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
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
        [result] = await device.speak_auto([synthesize("turn on the lights")])
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
        if any(metric_names(t["expr"]) & KUBE_STATE_METRICS for t in panel["targets"])
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
    ours = referenced - KUBE_STATE_METRICS - PROMETHEUS_GENERATED - recorded
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
