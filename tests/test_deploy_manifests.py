"""The Kubernetes deployment renders offline, matches its schemas and agrees with the code.

Needs `kubectl` (kustomize), `promtool` (Debian `prometheus`), `node` and the
npm packages of deploy/schema-check (`make deploy-tools`); `make setup`
installs all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor
from pydantic import BaseModel
from pydantic_settings import BaseSettings
from support.deploy import (
    DASHBOARDS,
    OVERLAYS,
    REPO,
    SCHEMA_CHECK,
    Manifest,
    Query,
    autoscaler_queries,
    by_kind,
    concrete,
    dashboard_queries,
    named,
    render,
    rule_groups,
)

from services.asr.config import AsrSettings
from services.cli import SERVICES
from services.common.grpc_service import LIVENESS
from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.probes import free_port, probe_redis
from services.speaker.config import SpeakerSettings
from services.vad.config import VadSettings

KUBERNETES_VERSION = "1.30"
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "vad": VadSettings,
    "asr": AsrSettings,
    "speaker": SpeakerSettings,
}
# Custom resources and the schema each is checked against (none is skipped).
CRD_MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
    ("monitoring.coreos.com/v1", "PodMonitor"): PodMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
}
GATEWAY_API = "gateway.networking.k8s.io/v1"
# Checked by deploy/schema-check (the @kubernetes-models schemas, in node).
NODE_CHECKED = {GATEWAY_API, "networking.gke.io/v1", "networking.istio.io/v1"}
# Fields newer than the installed models, checked by hand in their own tests:
# KEDA 2.17's fallback.behavior (test_autoscalers_hold_their_ground_without_metrics).
NEWER_THAN_THE_MODELS = {".spec.fallback.behavior"}
FALLBACK_BEHAVIORS = {
    "static",
    "currentReplicas",
    "currentReplicasIfHigher",
    "currentReplicasIfLower",
}

overlays = pytest.mark.parametrize("overlay", OVERLAYS)


def _is_custom(obj: Manifest) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CRD_MODELS or obj["apiVersion"] in NODE_CHECKED


def _pod_specs(objects: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def _service_container(objects: list[Manifest], service: str) -> Manifest:
    spec = named(objects, "Deployment", service)["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == service]
    return container


def _container_env(objects: list[Manifest], container: Manifest) -> dict[str, str | None]:
    """Environment of a container: its ConfigMaps (envFrom), then env (None = valueFrom)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def _settings(objects: list[Manifest], service: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's settings as the pod would load them from its environment."""
    env = _container_env(objects, _service_container(objects, service))
    for var in [v for v in os.environ if v.startswith("SF_")]:
        monkeypatch.delenv(var)
    for name, value in env.items():
        if value is not None and name.startswith("SF_"):
            monkeypatch.setenv(name, value)
    return SETTINGS[service]()


def _unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Keys present in the manifest but dropped by the model (the models ignore extras)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        missing = [f"{path}.{k}" for k in given if k not in kept]
        return missing + [
            e for k in given if k in kept for e in _unknown_fields(given[k], kept[k], f"{path}.{k}")
        ]
    if isinstance(given, list) and isinstance(kept, list):
        return [
            e for i, (g, k) in enumerate(zip(given, kept, strict=False))
            for e in _unknown_fields(g, k, f"{path}[{i}]")
        ]  # fmt: skip
    return []


def _promtool(
    tmp_path: Path, groups: list[Manifest], name: str
) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing (Debian package prometheus; make sysdeps)"
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


# -- rendering and schemas ----------------------------------------------------


@overlays
def test_overlay_renders_offline(overlay: str) -> None:
    kinds = {o["kind"] for o in render(overlay)}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "ConfigMap"} <= kinds


@overlays
def test_every_object_lands_in_the_speechfront_namespace(overlay: str) -> None:
    for obj in render(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "speechfront", obj["metadata"]["name"]


@overlays
def test_core_objects_pass_strict_schema_validation(overlay: str) -> None:
    errors = []
    for obj in render(overlay):
        if _is_custom(obj):
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e}")
    assert not errors, "\n".join(errors)


@overlays
def test_prometheus_operator_and_keda_objects_match_their_schemas(overlay: str) -> None:
    checked = 0
    for obj in render(overlay):
        model = CRD_MODELS.get((obj["apiVersion"], obj["kind"]))
        if model is None:
            continue
        parsed = model.model_validate(obj)
        kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
        unknown = set(_unknown_fields(obj, kept)) - NEWER_THAN_THE_MODELS
        assert not unknown, f"{obj['kind']}/{obj['metadata']['name']}: {sorted(unknown)}"
        checked += 1
    assert checked >= 9  # 4 ServiceMonitors, 4 ScaledObjects, 1 PrometheusRule


@overlays
def test_gateway_api_routes_and_load_balancer_policies_match_their_schemas(overlay: str) -> None:
    assert (SCHEMA_CHECK / "node_modules").is_dir(), "run `make deploy-tools`"
    checked = [o for o in render(overlay) if o["apiVersion"] in NODE_CHECKED]
    if overlay != "gpu-ingress-nginx":
        assert any(o["apiVersion"] == GATEWAY_API for o in checked), "the device route is missing"
    result = subprocess.run(
        ["node", str(SCHEMA_CHECK / "validate.mjs")],
        input=json.dumps(checked),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=SCHEMA_CHECK,
        check=True,
    )
    failures = [r for r in json.loads(result.stdout) if not r["ok"]]
    assert not failures, failures


def test_schema_check_rejects_a_policy_field_of_the_wrong_type() -> None:
    [policy] = by_kind(render("gpu-gke"), "GCPBackendPolicy")
    broken = json.loads(json.dumps(policy))
    broken["spec"]["default"]["timeoutSec"] = "an hour"
    result = subprocess.run(
        ["node", str(SCHEMA_CHECK / "validate.mjs")],
        input=json.dumps([broken]),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=SCHEMA_CHECK,
        check=True,
    )
    [verdict] = json.loads(result.stdout)
    assert not verdict["ok"] and "timeoutSec" in verdict["error"]


def test_gke_overlay_keeps_device_sockets_an_hour_and_checks_health_on_readyz() -> None:
    objects = render("gpu-gke")
    backend = named(objects, "GCPBackendPolicy", "gateway")["spec"]
    assert backend["targetRef"] == {"group": "", "kind": "Service", "name": "gateway"}
    # GKE's default of 30 s would end every device WebSocket after 30 s.
    assert backend["default"]["timeoutSec"] >= 3600
    assert backend["default"]["sessionAffinity"]["type"] == "CLIENT_IP"
    health = named(objects, "HealthCheckPolicy", "gateway")["spec"]
    assert health["targetRef"] == backend["targetRef"]
    assert health["default"]["config"]["httpHealthCheck"]["requestPath"] == "/readyz"


def test_istio_overlay_keeps_device_sockets_an_hour_and_hashes_on_the_device_id() -> None:
    objects = render("gpu-istio")
    rule = named(objects, "DestinationRule", "gateway")["spec"]
    assert rule["host"] == "gateway.speechfront.svc.cluster.local"
    policy = rule["trafficPolicy"]
    assert policy["connectionPool"]["http"]["idleTimeout"] == "3600s"
    assert policy["loadBalancer"]["consistentHash"]["httpHeaderName"] == "Device-Id"


def test_ingress_nginx_overlay_routes_devices_with_device_id_affinity() -> None:
    objects = render("gpu-ingress-nginx")
    assert not [o for o in objects if o["apiVersion"] == GATEWAY_API]
    [ingress] = by_kind(objects, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    # Header devices hash on their id, query-parameter devices on their query.
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_device_id$args"
    # Far above the device's own 120 s silence limit.
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) >= 600
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    assert paths[0]["path"] == "/xiaozhi/v1"
    assert {p["backend"]["service"]["name"] for p in paths} == {"gateway"}


@pytest.mark.parametrize("overlay", ["gpu", "gpu-ingress-nginx"])
def test_the_compatible_apis_are_routed_to_the_gateway(overlay: str) -> None:
    """OpenAI transcription and voiceprint-api on the http port, FunASR on its own."""
    objects = render(overlay)
    routed = {
        match["path"]["value"]
        for route in by_kind(objects, "HTTPRoute")
        for rule in route["spec"]["rules"]
        for match in rule["matches"]
    } | {
        path["path"]
        for ingress in by_kind(objects, "Ingress")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert {"/v1/audio", "/v1/models", "/voiceprint"} <= routed
    [service] = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "gateway"]
    assert {"name": "funasr", "port": 10095, "targetPort": "funasr"} in service["spec"]["ports"]


def test_ingress_nginx_overlay_terminates_tls_for_the_device_host() -> None:
    [ingress] = by_kind(render("gpu-ingress-nginx"), "Ingress")
    [tls] = ingress["spec"]["tls"]
    [rule] = ingress["spec"]["rules"]
    assert tls["secretName"] and rule["host"] in tls["hosts"]
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/force-ssl-redirect"]
        == "true"
    )


@pytest.mark.parametrize("overlay", ["gpu", "cpu-lite"])
def test_device_route_attaches_only_to_the_tls_listener_without_a_request_timeout(
    overlay: str,
) -> None:
    [route] = [o for o in render(overlay) if o["apiVersion"] == GATEWAY_API]
    assert [p["sectionName"] for p in route["spec"]["parentRefs"]] == ["https"]
    [devices] = [
        r for r in route["spec"]["rules"] if r["matches"][0]["path"]["value"] == "/xiaozhi/v1"
    ]
    assert devices["timeouts"]["request"] == "0s"


@overlays
def test_every_custom_resource_kind_has_a_schema_check(overlay: str) -> None:
    for obj in render(overlay):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=False)
        except kubernetes_validate.SchemaNotFoundError:
            assert _is_custom(obj), f"no schema checks {obj['apiVersion']} {obj['kind']}"
        except kubernetes_validate.ValidationError:
            pass  # reported by the strict test


# -- agreement with the code --------------------------------------------------


@overlays
def test_service_commands_are_speechfront_subcommands(overlay: str) -> None:
    objects = render(overlay)
    for service in SERVICES:
        assert _service_container(objects, service)["command"] == ["speechfront", service]


@overlays
def test_every_sf_variable_is_a_field_of_the_services_settings(overlay: str) -> None:
    objects = render(overlay)
    for service, settings in SETTINGS.items():
        env = _container_env(objects, _service_container(objects, service))
        for name in [n for n in env if n.startswith("SF_")]:
            prefix = f"SF_{service.upper()}_"
            assert name.startswith(prefix), f"{service} is given {name}"
            field = name.removeprefix(prefix).lower()
            assert field in settings.model_fields, f"{name}: {settings.__name__} has no {field}"


@overlays
def test_settings_load_from_the_manifests_environment(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    for service in SETTINGS:
        _settings(objects, service, monkeypatch)  # raises on an invalid value


@overlays
def test_container_ports_are_the_ports_the_services_listen_on(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    for service in SETTINGS:
        settings = _settings(objects, service, monkeypatch)
        ports = {
            p["name"]: p["containerPort"] for p in _service_container(objects, service)["ports"]
        }
        if service == "gateway":
            assert ports == {"http": settings.port, "funasr": settings.funasr_port}
        else:
            assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}


@overlays
def test_grpc_probes_use_the_grpc_port(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(overlay)
    for service in ("vad", "asr", "speaker"):
        container = _service_container(objects, service)
        port = _settings(objects, service, monkeypatch).port
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{service} {probe}"


@overlays
def test_gateway_probes_use_health_routes_of_the_app(overlay: str) -> None:
    container = _service_container(render(overlay), "gateway")
    routes = {getattr(r, "path", None) for r in create_app(GatewaySettings()).routes}
    probes = {
        p: container[p]["httpGet"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in routes
        assert probe["port"] in {p["name"] for p in container["ports"]}


@overlays
def test_gateway_targets_resolve_the_headless_services(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    settings = _settings(objects, "gateway", monkeypatch)
    for service in ("vad", "asr", "speaker"):
        svc = named(objects, "Service", service)
        assert svc["spec"]["clusterIP"] == "None", f"{service} must be headless for gRPC"
        grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        target = getattr(settings, f"{service}_target")
        assert target == f"dns:///{service}.speechfront.svc.cluster.local:{grpc_port}"


@overlays
def test_gateway_reaches_redis_through_its_service(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    url = urlsplit(_settings(objects, "gateway", monkeypatch).redis_url)
    port = named(objects, "Service", "redis")["spec"]["ports"][0]["port"]
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "redis",
        "redis.speechfront.svc.cluster.local",
        port,
        "/0",
    )


REDIS_SECRET = {"name": "redis-auth", "key": "password"}


def _redis_container(objects: list[Manifest]) -> Manifest:
    spec = named(objects, "StatefulSet", "redis")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "redis"]
    return container


def _secret_refs(container: Manifest) -> dict[str, Manifest]:
    """The container's variables that come from a Secret key: name -> secretKeyRef."""
    return {
        var["name"]: var["valueFrom"]["secretKeyRef"]
        for var in container.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }


@overlays
def test_redis_requires_the_password_of_its_secret(overlay: str) -> None:
    objects = render(overlay)
    container = _redis_container(objects)
    refs = _secret_refs(container)
    # Required (not optional): without the Secret the pod waits instead of
    # starting an open Redis.
    assert refs["REDIS_PASSWORD"] == REDIS_SECRET
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    # The readiness probe's redis-cli authenticates from REDISCLI_AUTH.
    assert container["readinessProbe"]["exec"]["command"][0] == "redis-cli"
    assert refs["REDISCLI_AUTH"] == REDIS_SECRET
    # The operator creates the Secret: no password is in the repository.
    assert not [o for o in by_kind(objects, "Secret") if o["metadata"]["name"] == "redis-auth"]


@overlays
def test_gateway_redis_url_carries_the_password_of_the_secret(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    container = _service_container(objects, "gateway")
    names = [var["name"] for var in container["env"]]
    assert _secret_refs(container)["REDIS_PASSWORD"] == REDIS_SECRET
    # Kubernetes expands $(VAR) only from variables listed before it.
    assert names.index("REDIS_PASSWORD") < names.index("SF_GATEWAY_REDIS_URL")
    url = urlsplit(_settings(objects, "gateway", monkeypatch).redis_url)
    assert url.password == "$(REDIS_PASSWORD)"
    # ConfigMaps are no place for it (nor are values from envFrom expanded).
    for source in container["envFrom"]:
        if "configMapRef" in source:
            data = named(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
            assert "SF_GATEWAY_REDIS_URL" not in data


@overlays
def test_service_ports_target_named_container_ports(overlay: str) -> None:
    objects = render(overlay)
    for svc in by_kind(objects, "Service"):
        selector = svc["spec"]["selector"]
        pods = [
            spec
            for _, spec in _pod_specs(objects)
            for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")
            and o["spec"]["template"]["spec"] is spec
            and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        names = {p["name"] for spec in pods for c in spec["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"{svc['metadata']['name']}:{port['name']}"


@overlays
def test_every_service_is_scraped_on_its_metrics_port(overlay: str) -> None:
    objects = render(overlay)
    for service, port_name, path in (
        ("gateway", "http", "/metrics"),
        ("vad", "metrics", "/metrics"),
        ("asr", "metrics", "/metrics"),
        ("speaker", "metrics", "/metrics"),
    ):
        monitor = named(objects, "ServiceMonitor", service)
        svc = named(objects, "Service", service)
        labels = monitor["spec"]["selector"]["matchLabels"]
        assert labels.items() <= svc["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == (port_name, path)
        assert port_name in {p["name"] for p in svc["spec"]["ports"]}
        # Keep the metrics' own `service` label (see docs/metrics.md).
        assert endpoint["honorLabels"] is True


# -- operability --------------------------------------------------------------


@overlays
def test_pods_run_non_root_without_capabilities_on_read_only_roots(overlay: str) -> None:
    for where, spec in _pod_specs(render(overlay)):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
        for container in spec["containers"]:
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: no writable /tmp"


def _budget_for(objects: list[Manifest], deployment: Manifest) -> Manifest:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [budget] = [
        b
        for b in by_kind(objects, "PodDisruptionBudget")
        if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    return budget


def _min_available(budget: Manifest, replicas: int) -> int:
    """Pods a PodDisruptionBudget keeps at ``replicas`` (percentages round up)."""
    value = budget["spec"]["minAvailable"]
    if isinstance(value, str) and value.endswith("%"):
        return -(-replicas * int(value[:-1]) // 100)
    return int(value)


@overlays
def test_keda_alone_owns_the_replica_counts(overlay: str) -> None:
    """No Deployment that a ScaledObject scales sets spec.replicas: applying the
    rendered objects again (twice, or after any change) leaves the counts to KEDA."""
    objects = render(overlay)
    scaled = {so["spec"]["scaleTargetRef"]["name"] for so in by_kind(objects, "ScaledObject")}
    assert scaled == {d["metadata"]["name"] for d in by_kind(objects, "Deployment")}
    for name in scaled:
        assert "replicas" not in named(objects, "Deployment", name)["spec"], name
    again = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert [d for d in yaml.safe_load_all(again) if d] == objects  # rendering is repeatable


@overlays
def test_every_tier_keeps_two_replicas_and_a_budget_that_lets_a_drain_through(
    overlay: str,
) -> None:
    objects = render(overlay)
    for scaled in by_kind(objects, "ScaledObject"):
        name = scaled["spec"]["scaleTargetRef"]["name"]
        budget = _budget_for(objects, named(objects, "Deployment", name))
        assert "maxUnavailable" not in budget["spec"], name
        for replicas in range(scaled["spec"]["minReplicaCount"], 9):
            kept = _min_available(budget, replicas)
            assert 1 <= kept < replicas, f"{name} at {replicas}: keeps {kept}"
        assert scaled["spec"]["minReplicaCount"] >= 2, name
        # A crash-looping pod never holds a node drain up.
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@overlays
def test_every_tier_spreads_over_zones_then_nodes(overlay: str) -> None:
    objects = render(overlay)
    for deployment in by_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        by_key = {c["topologyKey"]: c for c in constraints}
        zone = by_key["topology.kubernetes.io/zone"]
        assert zone["whenUnsatisfiable"] == "DoNotSchedule", name
        # Zones without a node the pod tolerates (no GPU nodes there) do not count.
        assert zone["nodeTaintsPolicy"] == "Honor", name
        assert by_key["kubernetes.io/hostname"]["maxSkew"] == 1, name
        for constraint in constraints:
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


@overlays
def test_gateway_rolls_out_with_surge_and_never_below_its_count(overlay: str) -> None:
    strategy = named(render(overlay), "Deployment", "gateway")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] == "25%"


@overlays
def test_gateway_grace_period_outlasts_its_pre_stop_its_drain_and_an_utterance(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    spec = named(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    sleep = _service_container(objects, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    settings = _settings(objects, "gateway", monkeypatch)
    assert int(sleep[1]) >= 10, "endpoint removal takes several seconds"
    # preStop, the drain (sessions handed off), their last results, uvicorn's own close.
    needed = int(sleep[1]) + settings.drain_timeout_s + settings.asr_timeout_s + 5
    assert spec["terminationGracePeriodSeconds"] >= needed


@overlays
def test_vad_streams_are_not_recycled_by_connection_age(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gateways re-resolve VAD replicas themselves; an age-out would replay every session."""
    assert _settings(render(overlay), "vad", monkeypatch).max_connection_age_s >= 86400


def test_cpu_lite_gateway_uses_the_d_vector_speaker_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(render("cpu-lite"), "gateway", monkeypatch)
    assert settings.speaker_threshold == pytest.approx(0.86)


@overlays
def test_only_the_gateway_reaches_compute_and_redis(overlay: str) -> None:
    objects = render(overlay)
    deny = named(objects, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for name in ("compute-from-gateway", "redis-from-gateway"):
        policy = named(objects, "NetworkPolicy", name)
        peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"]]
        pod_peers = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
        assert pod_peers == [{"app.kubernetes.io/name": "gateway"}], name


@overlays
def test_the_dialogue_backend_reaches_redis_under_its_own_user(overlay: str) -> None:
    objects = render(overlay)
    policy = named(objects, "NetworkPolicy", "redis-from-backend")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    assert peer["podSelector"]["matchLabels"] == {"speechfront.io/redis-client": "backend"}
    container = _redis_container(objects)
    assert _secret_refs(container)["BACKEND_PASSWORD"] == {
        "name": "redis-backend-auth",
        "key": "password",
    }
    args = container["args"]
    user = args[args.index("--user") + 1 :]
    user = user[: next(i for i, a in enumerate(user) if a.startswith("--"))]
    assert user[:3] == ["backend", "on", ">$(BACKEND_PASSWORD)"]
    # Not every key: no device tokens, no voiceprints.
    assert "~*" not in user and "+@all" not in user


@overlays
def test_redis_refuses_writes_before_its_container_is_oom_killed(overlay: str) -> None:
    container = _redis_container(render(overlay))
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = args[args.index("--maxmemory") + 1]
    assert maxmemory.endswith("mb")
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    # Room for the append-only rewrite's copy-on-write pages and client buffers.
    assert int(maxmemory[:-2]) <= 0.75 * int(limit[:-2]) * 1024


def test_gpu_overlay_gives_asr_and_speaker_a_gpu_and_the_model_volume() -> None:
    objects = render("gpu")
    for service in ("asr", "speaker"):
        resources = _service_container(objects, service)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert resources["requests"]["nvidia.com/gpu"] == "1"
    for service in ("vad", "asr", "speaker"):
        mounts = {m["mountPath"] for m in _service_container(objects, service)["volumeMounts"]}
        assert "/models" in mounts
    lock = json.loads(_models_fetch(objects)["models.lock.json"])
    ids = {m["id"] for m in lock["models"]}
    assert {"iic/SenseVoiceSmall", "iic/speech_eres2netv2_sv_zh-cn_16k-common"} <= ids


@pytest.mark.parametrize(
    ("overlay", "engines"),
    [
        ("gpu", {"vad": "fsmn", "asr": "sensevoice", "speaker": "eres2netv2"}),
        ("cpu-lite", {"vad": "fsmn", "asr": "whisper", "speaker": "dvector"}),
    ],
)
def test_overlay_selects_its_engines(
    overlay: str, engines: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(overlay)
    for service, engine in engines.items():
        assert _settings(objects, service, monkeypatch).engine == engine


def test_gpu_overlay_loads_production_models_from_the_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render("gpu")
    lock = json.loads(_models_fetch(objects)["models.lock.json"])
    installed = {f"/models/{m['name']}/{m['version']}" for m in lock["models"]}
    paths = {
        _settings(objects, "asr", monkeypatch).sensevoice_model,
        _settings(objects, "speaker", monkeypatch).eres2netv2_model,
        str(_settings(objects, "vad", monkeypatch).fsmn_model_dir),
    }
    # Each service reads one locked version's directory, and nothing unlocked.
    assert paths == installed


def test_models_job_and_pods_run_the_lock_s_installer() -> None:
    objects = render("gpu")
    fetch = _models_fetch(objects)
    assert set(fetch) == {"models.lock.json", "fetch_models.py"}
    job = named(objects, "Job", "models")
    [container] = job["spec"]["template"]["spec"]["containers"]
    script = "/etc/speechfront-models/fetch_models.py"
    assert container["command"][:2] == ["python", script]
    # A finished Job goes away, so an image bump or a new lock can apply again.
    assert job["spec"]["ttlSecondsAfterFinished"] <= 3600
    for service in ("vad", "asr", "speaker"):
        spec = named(objects, "Deployment", service)["spec"]["template"]["spec"]
        [wait] = spec["initContainers"]
        assert wait["command"][:2] == ["python", script] and "--wait" in wait["command"]
        mounts = {m["name"]: m["mountPath"] for m in wait["volumeMounts"]}
        assert script.startswith(mounts["models-fetch"] + "/")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert script.startswith(mounts["models-fetch"] + "/")


def _models_fetch(objects: list[Manifest]) -> dict[str, str]:
    """The ConfigMap the models Job mounts (its name carries kustomize's hash)."""
    volumes = named(objects, "Job", "models")["spec"]["template"]["spec"]["volumes"]
    [volume] = [v for v in volumes if v["name"] == "models-fetch"]
    data: dict[str, str] = named(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    return data


FETCH_MODELS = REPO / "deploy" / "k8s" / "overlays" / "gpu" / "model-lock" / "fetch_models.py"


def _fetch_models(lock: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FETCH_MODELS), str(lock), str(root), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _model_source(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    source = tmp_path / "source"
    (source / "tiny" / "sub").mkdir(parents=True)
    files = {"model.pt": b"weights", "sub/config.yaml": b"a: 1\n"}
    for name, body in files.items():
        (source / "tiny" / name).write_bytes(body)
    hashes = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    return source, hashes


def _lock(tmp_path: Path, files: dict[str, str], revision: str = "abc123") -> Path:
    entry = {"name": "tiny", "version": "v2", "id": "org/tiny", "revision": revision}
    path = tmp_path / "models.lock.json"
    path.write_text(json.dumps({"models": [dict(entry, files=files)]}))
    return path


def test_model_installer_puts_a_verified_version_in_its_own_directory(tmp_path: Path) -> None:
    source, hashes = _model_source(tmp_path)
    lock, root = _lock(tmp_path, hashes), tmp_path / "models"
    assert _fetch_models(lock, root, "--source", str(source)).returncode == 0
    installed = root / "tiny" / "v2"
    assert (installed / "model.pt").read_bytes() == b"weights"
    assert (installed / ".verified").is_file()
    again = _fetch_models(lock, root, "--source", str(source))
    assert again.returncode == 0 and "present and verified" in again.stdout
    assert _fetch_models(lock, root, "--wait", "1").returncode == 0


def test_model_installer_installs_nothing_when_a_checksum_differs(tmp_path: Path) -> None:
    source, hashes = _model_source(tmp_path)
    lock, root = _lock(tmp_path, dict(hashes, **{"model.pt": "0" * 64})), tmp_path / "models"
    result = _fetch_models(lock, root, "--source", str(source))
    assert result.returncode != 0 and "checksum mismatch" in result.stderr
    assert not (root / "tiny" / "v2").exists()
    assert _fetch_models(lock, root, "--wait", "0").returncode != 0


def test_model_installer_refuses_a_lock_without_hashes_and_lists_what_it_fetched(
    tmp_path: Path,
) -> None:
    source, hashes = _model_source(tmp_path)
    lock, root = _lock(tmp_path, {}), tmp_path / "models"
    result = _fetch_models(lock, root, "--source", str(source))
    assert result.returncode != 0
    assert hashes["model.pt"] in result.stderr  # to review and pin
    assert not (root / "tiny" / "v2").exists()


def test_the_shipped_lock_names_every_production_model_with_a_version() -> None:
    lock = json.loads((FETCH_MODELS.parent / "models.lock.json").read_text())
    for entry in lock["models"]:
        assert set(entry) == {"name", "version", "id", "revision", "files"}
        assert entry["version"] and entry["id"].startswith("iic/")


def test_cpu_lite_overlay_requests_no_gpu_and_reads_baked_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render("cpu-lite")
    assert "nvidia.com/gpu" not in json.dumps(objects)
    assert not by_kind(objects, "PersistentVolumeClaim")
    asr = _settings(objects, "asr", monkeypatch)
    speaker = _settings(objects, "speaker", monkeypatch)
    vad = _settings(objects, "vad", monkeypatch)
    assert asr.whisper_model_dir == "/app/models/whisper-tiny.en"
    assert speaker.dvector_weights == "/app/models/resemblyzer/pretrained.pt"
    assert str(vad.fsmn_model_dir) == "/app/models/fsmn-vad"


# -- autoscaling, alerts and dashboards -----------------------------------------


@overlays
def test_each_service_autoscales_on_its_own_load_metric(overlay: str) -> None:
    objects = render(overlay)
    expected = {
        "gateway": ["speechfront_gateway_sessions"],
        "vad": ["speechfront_vad_streams"],
        "asr": ['speechfront_queue_depth{namespace="speechfront",service="asr"}'],
        "speaker": ['speechfront_queue_depth{namespace="speechfront",service="speaker"}'],
    }
    for service, metrics in expected.items():
        scaled = named(objects, "ScaledObject", service)
        assert scaled["spec"]["scaleTargetRef"]["name"] == service
        named(objects, "Deployment", service)
        queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
        for metric in metrics:
            assert any(metric in q for q in queries), f"{service}: {metric}"
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            assert trigger["metricType"] == "AverageValue"  # threshold is per replica
            float(trigger["metadata"]["threshold"])


@overlays
def test_autoscalers_hold_their_ground_without_metrics(overlay: str) -> None:
    """Missing metrics are an error, not 0: KEDA falls back to no fewer replicas."""
    objects = render(overlay)
    for scaled in by_kind(objects, "ScaledObject"):
        name = scaled["metadata"]["name"]
        fallback = scaled["spec"]["fallback"]
        assert fallback["behavior"] in FALLBACK_BEHAVIORS
        assert fallback["behavior"] == "currentReplicasIfHigher", name
        assert fallback["replicas"] >= scaled["spec"]["minReplicaCount"], name
        # Only scaling to zero uses it.
        assert "cooldownPeriod" not in scaled["spec"], name
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["metadata"]["ignoreNullValues"] == "false", name
            # 0 only while some replica of the tier is scraped; empty (an error) otherwise.
            query = trigger["metadata"]["query"]
            assert f'up{{namespace="speechfront",job="{name}"}} == 1' in query, query


@overlays
def test_monitors_and_rules_carry_the_label_prometheus_selects(overlay: str) -> None:
    objects = render(overlay)
    for obj in by_kind(objects, "ServiceMonitor") + by_kind(objects, "PrometheusRule"):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@overlays
def test_promtool_accepts_the_prometheus_rules(overlay: str, tmp_path: Path) -> None:
    result = _promtool(tmp_path, rule_groups(render(overlay)), "rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_and_autoscaler_query(tmp_path: Path) -> None:
    queries: list[Query] = dashboard_queries() + autoscaler_queries(render("gpu"))
    rules = [
        {"record": f"speechfront:check_{i}", "expr": concrete(q.expr)}
        for i, q in enumerate(queries)
    ]
    result = _promtool(tmp_path, [{"name": "queries", "rules": rules}], "queries.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


@overlays
def test_alerts_have_severity_and_an_explanation(overlay: str) -> None:
    alerts = [r for g in rule_groups(render(overlay)) for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "SpeechfrontLatencyBudgetFastBurn",
        "SpeechfrontQueueBacklog",
        "SpeechfrontComputeErrors",
        "SpeechfrontUtteranceErrors",
        "SpeechfrontReplicasUnavailable",
        "SpeechfrontRedisErrors",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_every_alert_is_explained_in_the_operations_guide() -> None:
    guide = (REPO / "docs" / "operations.md").read_text()
    for group in rule_groups(render("gpu")):
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] in guide, rule["alert"]


@overlays
def test_dashboards_are_provisioned_for_the_grafana_sidecar(overlay: str) -> None:
    configmap = named(render(overlay), "ConfigMap", "speechfront-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name for p in DASHBOARDS.glob("*.json")}
    assert set(configmap["data"]) == files
    uids = [json.loads(body)["uid"] for body in configmap["data"].values()]
    assert len(set(uids)) == len(uids)


def test_capacity_dashboard_draws_the_autoscaling_targets() -> None:
    capacity = json.loads((DASHBOARDS / "speechfront-capacity.json").read_text())
    drawn = {
        float(m.group(1))
        for panel in capacity["panels"]
        for t in panel["targets"]
        if (m := re.fullmatch(r"vector\(([\d.]+)\)", t["expr"]))
    }
    thresholds = {
        float(t["metadata"]["threshold"])
        for so in by_kind(render("gpu"), "ScaledObject")
        for t in so["spec"]["triggers"]
    }
    assert drawn == thresholds


# -- the Redis users, on a real redis-server --------------------------------------


@pytest.fixture
def manifest_redis(tmp_path: Path) -> Iterator[tuple[int, str, str]]:
    """redis-server started with the redis container's own arguments (passwords
    filled in, its data in a temporary directory, on a free loopback port)."""
    server = shutil.which("redis-server")
    assert server, "redis-server is missing (make setup)"
    gateway_password, backend_password = "gw-" + os.urandom(8).hex(), "be-" + os.urandom(8).hex()
    args = [
        a.replace("$(REDIS_PASSWORD)", gateway_password).replace(
            "$(BACKEND_PASSWORD)", backend_password
        )
        for a in _redis_container(render("gpu"))["args"]
    ]
    args[args.index("--dir") + 1] = str(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [server, *args, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):
            if probe_redis(port, gateway_password):
                break
            assert process.poll() is None, "redis-server refused the manifest's arguments"
            time.sleep(0.05)
        yield port, gateway_password, backend_password
    finally:
        process.terminate()
        process.wait(10)


def test_the_dialogue_backend_user_runs_the_example_backend_and_nothing_more(
    manifest_redis: tuple[int, str, str], tmp_path: Path
) -> None:
    port, gateway_password, backend_password = manifest_redis
    gateway = redis.Redis(port=port, password=gateway_password, decode_responses=True)
    backend = redis.Redis(
        port=port, username="backend", password=backend_password, decode_responses=True
    )
    replies = gateway.pubsub()
    replies.subscribe("sf:reply:s1")
    env = {
        **os.environ,
        "SF_BACKEND_REDIS_URL": f"redis://backend:{backend_password}@127.0.0.1:{port}/0",
    }
    with (tmp_path / "backend.log").open("wb") as log:
        echo = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "echo-backend"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    try:
        # The gateway appends a transcript (as it does); the backend, under its
        # own user, reads it through its consumer group and answers the session.
        deadline = time.monotonic() + 30
        reply = None
        while reply is None and time.monotonic() < deadline:
            assert echo.poll() is None, (tmp_path / "backend.log").read_text()
            gateway.xadd(
                "sf:transcripts",
                {"utterance_id": "u1", "session_id": "s1", "device_id": "d1", "text": "hi"},
            )
            message = replies.get_message(timeout=1.0)
            while message is not None and message["type"] != "message":
                message = replies.get_message(timeout=1.0)
            reply = message
        assert reply is not None, (tmp_path / "backend.log").read_text()
        assert json.loads(reply["data"])["text"] == "You said: hi"
    finally:
        echo.terminate()
        echo.wait(10)
        replies.close()
    # What only the gateways may do.
    for refused in (
        lambda: backend.hset("sf:auth:tokens", "t", "d"),
        lambda: backend.hgetall("sf:voiceprints:d1"),
        lambda: backend.xadd("sf:transcripts", {"text": "forged"}),
        lambda: backend.publish("sf:control:gateway-1", "close"),
        lambda: backend.flushall(),
        lambda: backend.config_get("requirepass"),
        lambda: backend.client_kill_filter(skipme=True),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    assert gateway.hset("sf:auth:tokens", "t", "d") == 1


@overlays
def test_only_the_gateway_holds_a_token_and_it_may_only_patch_pods(overlay: str) -> None:
    """Its session count becomes the pod's deletion cost: scale-in removes the emptiest."""
    objects = render(overlay)
    for where, spec in _pod_specs(objects):
        mounts_token = spec.get("automountServiceAccountToken", True)
        assert mounts_token == (where == "Deployment/gateway"), where
    spec = named(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "gateway"
    [binding] = by_kind(objects, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "gateway", "namespace": "speechfront"}
    ]
    role = named(objects, "Role", binding["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    env = _container_env(objects, _service_container(objects, "gateway"))
    assert "POD_NAMESPACE" in env and "SF_GATEWAY_GATEWAY_ID" in env


@overlays
def test_model_services_liveness_asks_whether_the_model_call_has_hung(overlay: str) -> None:
    objects = render(overlay)
    for service in ("vad", "asr", "speaker"):
        probe = _service_container(objects, service)["livenessProbe"]["grpc"]
        assert probe["service"] == LIVENESS, service


def test_gpu_overlay_runs_only_asr_and_speaker_on_the_cuda_image() -> None:
    objects = render("gpu")
    for where, spec in _pod_specs(objects):
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            if not image.startswith("registry.example.com/speechfront:"):
                continue
            cuda = (
                where in ("Deployment/asr", "Deployment/speaker")
                and container in spec["containers"]
            )
            assert image.endswith("-cuda" if cuda else "-cpu"), (where, container["name"])


@overlays
def test_math_threads_match_the_cpus_each_service_requests(overlay: str) -> None:
    objects = render(overlay)
    for service in SETTINGS:
        container = _service_container(objects, service)
        env = _container_env(objects, container)
        cpus = float(container["resources"]["requests"]["cpu"])
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            threads = env[name]
            assert threads is not None and 1 <= int(threads) <= max(1.0, cpus), service


def test_the_image_pins_every_dependency_but_torch_which_its_dockerfile_pins() -> None:
    """deploy/docker/constraints.txt (make constraints) makes image builds repeatable."""
    pins = {}
    for line in (REPO / "deploy" / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", requirement)[0]).lower()
        if name != "torch":
            assert name in pins, f"{name} is not pinned (make constraints)"
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    assert "PIP_CONSTRAINT=/tmp/constraints.txt" in dockerfile
    assert re.search(r"ARG TORCH_VERSION=[\d.]+\n", dockerfile)
    assert "# syntax=" not in dockerfile  # no frontend pulled from a registry
