"""Reading the Kubernetes deployment: rendered overlays, dashboards and every PromQL query."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu-lite", "gpu-ingress-nginx", "gpu-gke", "gpu-istio")
DASHBOARDS = K8S / "base" / "dashboards"
SCHEMA_CHECK = REPO / "deploy" / "schema-check"

# Metrics the rules and dashboards use that our services do not export:
# kube-state-metrics, NVIDIA's dcgm-exporter and the redis_exporter sidecar.
KUBE_STATE_METRICS = frozenset(
    {
        "kube_deployment_status_replicas_unavailable",
        "kube_deployment_status_replicas_available",
        "kube_horizontalpodautoscaler_status_current_replicas",
        "kube_horizontalpodautoscaler_spec_max_replicas",
        "kube_pod_status_phase",
        "kube_pod_container_resource_requests",
        "kube_pod_container_status_restarts_total",
        "kube_pod_container_status_last_terminated_reason",
    }
)
DCGM_METRICS = frozenset({"DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_UTIL"})
REDIS_EXPORTER_METRICS = frozenset({"redis_memory_used_bytes", "redis_memory_max_bytes"})
EXPORTER_METRICS = KUBE_STATE_METRICS | DCGM_METRICS | REDIS_EXPORTER_METRICS
PROMETHEUS_GENERATED = frozenset({"up"})

# Grafana's variables, replaced by concrete values before Prometheus sees a query.
# `.*` also matches series without the label (no namespace label locally).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "${namespace}": ".*",
    "$namespace": ".*",
}

Manifest = dict[str, Any]


@cache
def _render(overlay: str) -> str:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay} failed:\n{result.stderr}")
    return result.stdout


def render(overlay: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(_render(overlay)) if doc]


def by_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from (for messages)."""

    source: str
    expr: str


def dashboards() -> dict[str, Manifest]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_panels() -> list[tuple[str, Manifest]]:
    panels: list[tuple[str, Manifest]] = []
    for dashboard in dashboards().values():
        stack = list(dashboard["panels"])
        while stack:
            panel = stack.pop(0)
            stack.extend(panel.get("panels", []))
            if panel.get("targets"):
                panels.append((f"{dashboard['title']} / {panel['title']}", panel))
    return panels


def dashboard_queries() -> list[Query]:
    return [
        Query(f"{where} [{t['refId']}]", t["expr"])
        for where, panel in dashboard_panels()
        for t in panel["targets"]
    ]


def rule_groups(objects: list[Manifest]) -> list[Manifest]:
    return [g for rule in by_kind(objects, "PrometheusRule") for g in rule["spec"]["groups"]]


def rule_queries(objects: list[Manifest]) -> list[Query]:
    return [
        Query(f"rule {r.get('record') or r.get('alert')}", r["expr"])
        for group in rule_groups(objects)
        for r in group["rules"]
    ]


def autoscaler_queries(objects: list[Manifest]) -> list[Query]:
    return [
        Query(f"ScaledObject {so['metadata']['name']} / {t['name']}", t["metadata"]["query"])
        for so in by_kind(objects, "ScaledObject")
        for t in so["spec"]["triggers"]
    ]


def concrete(expr: str) -> str:
    """The query with Grafana's variables replaced by values Prometheus accepts."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric (and recorded series) names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range and subquery windows
    text = _GROUPING.sub(" ", text)
    names = {m for m in _IDENTIFIER.findall(text) if m.lower() not in _KEYWORDS}
    return {n for n in names if not re.fullmatch(r"\d.*", n)}


def recorded_names(objects: list[Manifest]) -> set[str]:
    return {r["record"] for g in rule_groups(objects) for r in g["rules"] if "record" in r}
