"""The gateway pod's deletion cost: a scale-in removes the emptiest gateways first.

When a ReplicaSet scales in, Kubernetes deletes the pods with the lowest
``controller.kubernetes.io/pod-deletion-cost`` annotation first. A gateway in
a Kubernetes pod (a service account token is mounted) keeps that annotation
at its number of sessions: every ``interval_s`` it patches its own pod when
the count has changed. Outside Kubernetes nothing runs.

The pod needs RBAC to patch pods in its namespace (deploy/k8s/base/gateway.yaml:
ServiceAccount, Role and RoleBinding `gateway`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# The annotation is an int32.
MAX_COST = 2**31 - 1


@dataclass(frozen=True)
class PodRef:
    """Where this pod is and how to reach the Kubernetes API as its service account."""

    api: str
    namespace: str
    name: str
    token_path: Path
    ca_path: Path | None = None

    @property
    def url(self) -> str:
        return f"{self.api}/api/v1/namespaces/{self.namespace}/pods/{self.name}"


def in_cluster(pod_name: str, account: Path = SERVICE_ACCOUNT) -> PodRef | None:
    """This pod, when running in Kubernetes with a service account token; else None."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = account / "token"
    if not host or not token.is_file():
        return None
    namespace = os.environ.get("POD_NAMESPACE") or (account / "namespace").read_text().strip()
    api_host = f"[{host}]" if ":" in host else host
    return PodRef(f"https://{api_host}:{port}", namespace, pod_name, token, account / "ca.crt")


class DeletionCost:
    """Keeps the pod's deletion-cost annotation at ``sessions()``."""

    def __init__(
        self,
        pod: PodRef,
        sessions: Callable[[], int],
        interval_s: float = 15.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.pod = pod
        self._sessions = sessions
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self.published: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pod-deletion-cost")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        verify: str | bool = str(self.pod.ca_path) if self.pod.ca_path is not None else True
        async with httpx.AsyncClient(verify=verify, timeout=self._timeout_s) as client:
            while True:
                count = min(self._sessions(), MAX_COST)
                if count != self.published:
                    await self._publish(client, count)
                await asyncio.sleep(self._interval_s)

    async def _publish(self, client: httpx.AsyncClient, count: int) -> None:
        # The token is read each time: Kubernetes rotates projected tokens.
        token = self.pod.token_path.read_text().strip()
        body = {"metadata": {"annotations": {ANNOTATION: str(count)}}}
        try:
            reply = await client.patch(
                self.pod.url,
                json=body,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/merge-patch+json",
                },
            )
            reply.raise_for_status()
        except httpx.HTTPError as exc:
            if not self._failing:
                log.warning("cannot set %s on pod %s: %s", ANNOTATION, self.pod.name, exc)
            self._failing = True
            return
        if self._failing:
            log.info("%s of pod %s is set again", ANNOTATION, self.pod.name)
        self._failing = False
        self.published = count
