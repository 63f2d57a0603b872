"""A gateway pod keeps its deletion cost at its session count, so scale-in removes the emptiest.

The Kubernetes API is a stand-in: an HTTP server on loopback that records
each PATCH of the pod, as the API server would receive it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from services.gateway.deletion_cost import ANNOTATION, DeletionCost, PodRef, in_cluster
from services.probes import free_port


@dataclass
class ApiServer:
    url: str
    patches: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200


@pytest.fixture
def api_server() -> Iterator[ApiServer]:
    server_state = ApiServer("")

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            server_state.patches.append(
                {
                    "path": self.path,
                    "authorization": self.headers["Authorization"],
                    "content_type": self.headers["Content-Type"],
                    "body": json.loads(body),
                }
            )
            self.send_response(server_state.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server_state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server_state
    server.shutdown()
    server.server_close()


def pod(api: ApiServer, tmp_path: Path) -> PodRef:
    token = tmp_path / "token"
    token.write_text("token-1\n")
    return PodRef(api.url, "speechfront", "gateway-7c9-abc", token)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def costs(api: ApiServer) -> list[str]:
    return [p["body"]["metadata"]["annotations"][ANNOTATION] for p in api.patches]


async def test_the_pod_is_patched_with_its_session_count_when_it_changes(
    api_server: ApiServer, tmp_path: Path
) -> None:
    sessions = [3]
    cost = DeletionCost(pod(api_server, tmp_path), lambda: sessions[0], interval_s=0.02)
    cost.start()
    try:
        await until(lambda: costs(api_server) == ["3"])
        await asyncio.sleep(0.1)  # several periods, the same count: no new patch
        assert costs(api_server) == ["3"]
        sessions[0] = 41
        await until(lambda: costs(api_server) == ["3", "41"])
    finally:
        await cost.stop()
    [first, _] = api_server.patches
    assert first["path"] == "/api/v1/namespaces/speechfront/pods/gateway-7c9-abc"
    assert first["authorization"] == "Bearer token-1"
    assert first["content_type"] == "application/merge-patch+json"


async def test_a_refused_patch_is_tried_again_at_the_next_period(
    api_server: ApiServer, tmp_path: Path
) -> None:
    api_server.status = 403
    cost = DeletionCost(pod(api_server, tmp_path), lambda: 5, interval_s=0.02)
    cost.start()
    try:
        await until(lambda: len(api_server.patches) >= 2)
        assert cost.published is None
        api_server.status = 200
        await until(lambda: cost.published == 5)
    finally:
        await cost.stop()


def test_outside_kubernetes_there_is_no_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert in_cluster("gateway-1", tmp_path) is None


def test_in_a_pod_the_api_and_namespace_come_from_the_service_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "namespace").write_text("speechfront\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    found = in_cluster("gateway-1", tmp_path)
    assert found is not None
    assert found.url == "https://10.96.0.1:443/api/v1/namespaces/speechfront/pods/gateway-1"
    assert found.ca_path == tmp_path / "ca.crt"
