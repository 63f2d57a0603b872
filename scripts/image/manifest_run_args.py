"""`docker run` arguments for one container of a rendered Kubernetes overlay.

Reads `kubectl kustomize` output on stdin and prints, one per line, the
arguments that run the named workload's first container the way its pod
spec does: command and args, env (configMaps and secrets via envFrom,
literals, $(VAR) expansion, fieldRef; secret values given here), user and
group, read-only root filesystem with an emptyDir mount as a tmpfs, dropped
capabilities, no privilege escalation, the memory limit. The caller adds
`docker run -d --name ... --network ...` before them.

    kubectl kustomize deploy/k8s/overlays/cpu-lite | python manifest_run_args.py \
        --workload vad --image speechfront:cpu --pod-name vad-0 \
        [--secret redis-auth/password=...] [--entrypoint redis-server]
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml

WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _memory(quantity: str) -> str:
    """Kubernetes memory quantity -> docker's (binary units, lower case)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    if not match:
        raise SystemExit(f"memory limit {quantity!r}: unsupported quantity")
    number, unit = match.groups()
    return number + {"Ki": "k", "Mi": "m", "Gi": "g", None: "b"}[unit]


def _expand(value: str, env: dict[str, str]) -> str:
    # Kubernetes' rule: $(VAR) of a variable defined earlier, else left as is.
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def run_args(
    docs: list[dict[str, Any]],
    workload: str,
    image: str,
    pod_name: str,
    namespace: str,
    secrets: dict[str, str],
    entrypoint: str | None,
) -> list[str]:
    config_maps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d.get("kind") == "ConfigMap"
    }
    matches = [
        d for d in docs if d.get("kind") in WORKLOAD_KINDS and d["metadata"]["name"] == workload
    ]
    if len(matches) != 1:
        raise SystemExit(f"{workload}: {len(matches)} workloads of that name in the overlay")
    pod = matches[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pod_security = pod.get("securityContext", {})
    security = container.get("securityContext", {})

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
        elif "secretRef" in source:
            prefix = source["secretRef"]["name"] + "/"
            given = {k[len(prefix) :]: v for k, v in secrets.items() if k.startswith(prefix)}
            if not given and not source["secretRef"].get("optional"):
                raise SystemExit(f"{workload}: give --secret {prefix}KEY=VALUE")
            env.update(given)
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = _expand(str(item["value"]), env)
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            field = ref["fieldRef"]["fieldPath"]
            env[name] = {"metadata.name": pod_name, "metadata.namespace": namespace}[field]
        elif "secretKeyRef" in ref:
            key = f"{ref['secretKeyRef']['name']}/{ref['secretKeyRef']['key']}"
            if key not in secrets:
                raise SystemExit(f"{workload}: give --secret {key}=VALUE")
            env[name] = secrets[key]
        else:
            raise SystemExit(f"{workload}: env {name}: unsupported valueFrom {sorted(ref)}")

    args: list[str] = []
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    group = security.get("runAsGroup", pod_security.get("runAsGroup"))
    if user is not None:
        args += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in security.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in matches[0]["spec"].get("volumeClaimTemplates", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "emptyDir" in volume or mount["name"] in claims:
            # An emptyDir (and, for this check, a volume claim) as a writable,
            # executable tmpfs owned by the pod's user.
            owner = f",uid={user},gid={group}" if user is not None else ""
            args += ["--tmpfs", f"{mount['mountPath']}:rw,exec,nosuid,size=2g,mode=1777{owner}"]
        else:
            raise SystemExit(f"{workload}: volume {mount['name']}: only emptyDir is supported")
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if limit:
        args += ["--memory", _memory(str(limit))]
    for name, value in env.items():
        args += ["--env", f"{name}={value}"]

    command = [_expand(str(c), env) for c in container.get("command", [])]
    command += [_expand(str(a), env) for a in container.get("args", [])]
    if entrypoint is not None and not container.get("command"):
        command = [entrypoint, *command]
    if not command:
        raise SystemExit(f"{workload}: no command in the manifest; give --entrypoint")
    return [*args, "--entrypoint", command[0], image, *command[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--pod-name", required=True)
    parser.add_argument("--namespace", default="speechfront")
    parser.add_argument("--secret", action="append", default=[], help="NAME/KEY=VALUE")
    parser.add_argument("--entrypoint", help="the image's command when the manifest has none")
    opts = parser.parse_args()
    secrets = dict(s.split("=", 1) for s in opts.secret)
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    for arg in run_args(
        docs, opts.workload, opts.image, opts.pod_name, opts.namespace, secrets, opts.entrypoint
    ):
        if "\n" in arg:
            raise SystemExit(f"{opts.workload}: an argument spans lines: {arg!r}")
        print(arg)


if __name__ == "__main__":
    main()
