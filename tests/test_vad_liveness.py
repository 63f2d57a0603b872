"""A VAD replica whose inference thread hangs fails liveness, and recovers when it returns."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.processes import stop_process

from services.common.grpc_service import LIVENESS
from services.probes import free_port, probe_grpc
from services.protos import vad_pb2, vad_pb2_grpc

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# One 60 ms packet of 16-bit silence.
PACKET = b"\x00\x00" * 960
STUCK_STEP_S = 0.5

# The real VAD service (server.main: settings, batched FSMN-VAD engine, stream
# table, health and liveness) with its engine wrapped at the edge: a step that
# includes the stream named "hang" blocks until a line arrives on stdin, then
# goes on into the real engine. Nothing else is replaced.
HANGING_VAD = """
import sys
from services.vad import server

build = server.build_engine


class HangsOnRequest:
    def __init__(self, engine):
        self._engine = engine
        self.name = engine.name

    def open(self, stream_id, silence_ms):
        self._engine.open(stream_id, silence_ms)

    def close(self, stream_id):
        self._engine.close(stream_id)

    def step(self, chunks, final):
        if any(stream_id.endswith("/hang") for stream_id in chunks):
            print("hanging", flush=True)
            sys.stdin.readline()
            print("released", flush=True)
        return self._engine.step(chunks, final)


server.build_engine = lambda settings: HangsOnRequest(build(settings))
server.main()
"""


@pytest.fixture
def hanging_vad(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    env = os.environ | {
        "SF_VAD_HOST": "127.0.0.1",
        "SF_VAD_PORT": str(port),
        "SF_VAD_METRICS_PORT": "0",
        "SF_VAD_ENGINE": "fsmn",
        "SF_VAD_STUCK_STEP_S": str(STUCK_STEP_S),
    }
    log = (tmp_path / "vad.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", HANGING_VAD],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        wait_for(lambda: probe_grpc(port), 120, "the VAD never became healthy", process)
        yield port, process
    finally:
        stop_process(process, 20)
        log.close()


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    why: str,
    process: subprocess.Popen[str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"{why}: the VAD exited with {process.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(why)
        time.sleep(0.05)


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return int(reply.status)


def test_a_step_that_does_not_return_fails_liveness_and_a_returning_one_restores_it(
    hanging_vad: tuple[int, subprocess.Popen[str]],
) -> None:
    port, process = hanging_vad
    assert process.stdin is not None and process.stdout is not None
    assert health(port, LIVENESS) == SERVING

    released, answered = threading.Event(), threading.Event()

    def requests() -> Iterator[vad_pb2.VadRequest]:
        yield vad_pb2.VadRequest(
            opens=[vad_pb2.StreamOpen(stream_id="hang")],
            frames=[vad_pb2.AudioFrame(stream_id="hang", seq=1, pcm=PACKET)],
        )
        # Sent once the step has been released: the stream still works.
        released.wait(60)
        yield vad_pb2.VadRequest(closes=[vad_pb2.StreamClose(stream_id="hang", flush=True)])
        # A gateway keeps its stream open; half-closing would end the call
        # before the flush is stepped.
        answered.wait(60)

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        responses = vad_pb2_grpc.VadStub(channel).Stream(requests(), timeout=60)
        assert process.stdout.readline().strip() == "hanging"
        wait_for(
            lambda: health(port, LIVENESS) == NOT_SERVING,
            STUCK_STEP_S + 10,
            "liveness never reported the hung step",
        )
        # Readiness is the event loop's: it still answers, and still SERVING,
        # so the replica is restarted by liveness rather than merely unlisted.
        assert health(port, "") == SERVING
        assert health(port, "speechfront.vad.v1.Vad") == SERVING

        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "released"
        wait_for(
            lambda: health(port, LIVENESS) == SERVING,
            10,
            "liveness did not come back once the step returned",
        )
        released.set()
        kinds = []
        for response in responses:
            kinds += [event.kind for event in response.events if event.stream_id == "hang"]
            if vad_pb2.SpeechEvent.STREAM_CLOSED in kinds:
                break
        responses.cancel()
        assert kinds == [vad_pb2.SpeechEvent.STREAM_CLOSED]


def test_the_vad_liveness_probe_asks_whether_a_step_has_hung() -> None:
    documents = yaml.safe_load_all((ROOT / "deploy/k8s/base/vad.yaml").read_text())
    [deployment] = [d for d in documents if d and d.get("kind") == "Deployment"]
    [container] = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "vad"
    ]
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS
    assert "service" not in container["readinessProbe"]["grpc"]
