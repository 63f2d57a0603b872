"""A local cluster of real processes: Redis, vad, asr, speaker and the gateway.

``speechfront cluster`` runs it in the foreground for people; the end-to-end
tests start the same thing on free ports. Each service is its own process,
talking gRPC on loopback exactly as it would across pods.

With ``supervise=True`` a monitor thread restarts any process that exits, on
its old ports, with a pod's exponential back-off (see ``Supervisor``); the rest
keep serving. Without it nothing is restarted: tests kill and ``respawn``
processes themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from services.cluster_layout import (
    COMPUTE_SERVICES,
    LITE_PROFILE,
    ClusterError,
    ClusterPorts,
    Replica,
    ServiceProcess,
)
from services.local_redis import LocalRedis
from services.probes import free_port, port_free, probe_grpc, probe_http, probe_redis, probe_tcp
from services.supervisor import Backoff, Supervisor

__all__ = ["ClusterError", "ClusterPorts", "LocalCluster", "Replica"]

log = logging.getLogger("speechfront.cluster")

# -- supervision -------------------------------------------------------------


class LocalCluster:
    """Redis, N replicas of each service, and (with several gateways) a TCP front.

    The first replica of each service uses ``ports``; further replicas get free
    ports. With several gateways, devices connect to the front on
    ``ports.gateway`` and the gateways listen on ports of their own.
    ``supervise=True`` restarts whatever exits once ``start`` has succeeded.
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
        supervise: bool = False,
        backoff: Backoff | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.ports = ports or ClusterPorts()
        self.host = host
        self._profile = LITE_PROFILE if profile is None else profile
        self._extra_env = extra_env or {}
        self.processes: dict[str, ServiceProcess] = {}
        self.redis = LocalRedis(self.ports.redis, run_dir)
        self._supervise = supervise
        self._backoff = backoff
        self.supervisor: Supervisor | None = None
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
        gateways = self.replicas["gateway"]
        self.funasr_ports = {r.name: p.funasr if r.index == 0 else free_port() for r in gateways}
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
    def funasr_url(self) -> str:
        """The first gateway's FunASR WebSocket endpoint."""
        return f"ws://127.0.0.1:{self.ports.funasr}"

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def redis_password(self) -> str:
        return self.redis.password

    @property
    def has_front(self) -> bool:
        return len(self.replicas["gateway"]) > 1

    def replica(self, name: str) -> Replica:
        return next(r for rs in self.replicas.values() for r in rs if r.name == name)

    def target(self, service: str) -> str:
        """The gRPC target the gateways use: every replica, balanced client-side."""
        return ",".join(f"127.0.0.1:{r.port}" for r in self.replicas[service])

    def endpoints(self) -> list[tuple[str, str]]:
        """Every process with where it listens, for people: (name, description)."""
        rows: list[tuple[str, str]] = []
        gateways = self.replicas["gateway"]
        if self.has_front:
            spread = ", ".join(f":{r.port}" for r in gateways)
            rows.append(("front", f"devices :{self.ports.gateway} -> gateways {spread}"))
        for r in gateways:
            funasr = self.funasr_ports[r.name]
            rows.append((r.name, f"http :{r.port}  (/readyz, /metrics)  funasr ws :{funasr}"))
        for service in COMPUTE_SERVICES:
            for r in self.replicas[service]:
                if r.name not in self.idle or r.name in self.processes:
                    rows.append((r.name, f"grpc :{r.port}  metrics :{r.metrics_port}"))
        rows.append(("redis", self.redis_url))
        if "echo-backend" in self.processes:
            rows.append(("echo-backend", "reads sf:transcripts, answers on sf:reply:*"))
        return rows

    def env(self, replica: Replica | None = None) -> dict[str, str]:
        env = dict(os.environ)
        # Several model processes share the machine's cores; one thread each
        # keeps them from oversubscribing it.
        env.setdefault("OMP_NUM_THREADS", "1")
        # glibc's default of 8 malloc arenas per core lets every thread keep
        # its own peak of freed memory; two bound what a burst leaves behind.
        env.setdefault("MALLOC_ARENA_MAX", "2")
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
                # A gateway started beside the cluster's own gets a port of its own too.
                funasr = self.funasr_ports.setdefault(replica.name, free_port())
                env[prefix + "FUNASR_PORT"] = str(funasr)
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
            if self.has_front:
                backends = ",".join(f"127.0.0.1:{r.port}" for r in self.replicas["gateway"])
                argv = [sys.executable, "-m", "services.front", "--host", self.host]
                self._spawn(
                    "front", [*argv, "--listen", str(self.ports.gateway), "--backends", backends]
                )
                self._wait_http("front", f"{self.gateway_url}/healthz", deadline)
        except BaseException:
            self.stop()
            raise
        if self._supervise:
            self.supervisor = Supervisor(self, self._backoff)
            for name in self.processes:
                self.supervisor.watch(name)
            self.supervisor.start()

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts per process made by the supervisor (empty without supervision)."""
        return {} if self.supervisor is None else self.supervisor.restarts()

    def kill(self, name: str) -> None:
        """SIGKILL one process, as a node failure would."""
        proc = self.processes[name].process
        proc.kill()
        proc.wait(10)

    def terminate(self, name: str, timeout: float = 60.0) -> float:
        """SIGTERM one process and wait for it to exit, as Kubernetes stops a pod
        (its preStop aside); the seconds it took. SIGKILL after ``timeout``."""
        proc = self.processes[name].process
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        return time.monotonic() - started

    def roll(self, name: str, timeout: float = 120.0) -> float:
        """Replace one replica as a rolling update does: stop it gracefully, start
        it again on its ports, wait until it is healthy; the seconds it took."""
        started = time.monotonic()
        self.terminate(name)
        self.respawn(name, timeout)
        return time.monotonic() - started

    def respawn(self, name: str, timeout: float = 120.0) -> None:
        """Start a killed process again on its old ports (a restarted pod).

        Under supervision the supervisor restarts it (at once if it is waiting
        out a back-off); this only waits until it is healthy, so calling it for
        a process that was already restarted does no harm.
        """
        if self.supervisor is not None and self.supervisor.watching(name):
            self.supervisor.expedite(name)
            self.wait_healthy(name, timeout)
            return
        if name == "redis":
            self._start_redis()
            self._wait_redis(time.monotonic() + timeout)
            return
        replica = self.replica(name)
        self._spawn_replica(replica)
        deadline = time.monotonic() + timeout
        if replica.service == "gateway":
            self._wait_http(name, f"http://127.0.0.1:{replica.port}/readyz", deadline)
        else:
            self._wait_grpc(name, replica.port, deadline)

    def wait_healthy(self, name: str, timeout: float = 120.0) -> None:
        """Wait until ``name`` answers its health check, whichever process it is by then."""
        deadline = time.monotonic() + timeout
        while not self.healthy(name):
            self._tick(name, deadline)

    def start_backend(self) -> None:
        """The example dialogue backend, reading this cluster's transcript stream."""
        argv = [sys.executable, "-m", "services.cli", "echo-backend"]
        # In its environment: a command line (and the password in it) is public.
        self._spawn("echo-backend", argv, {**self.env(), "SF_BACKEND_REDIS_URL": self.redis_url})

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every process, SIGKILL (with anything it started) what outlives ``timeout``."""
        if self.supervisor is not None:
            self.supervisor.stop()
        for proc in reversed(list(self.processes.values())):
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Its own session: the group holds whatever it started too.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.process.pid, signal.SIGKILL)
                proc.process.kill()
                proc.process.wait(5)
        self.processes.clear()
        self.redis.remove_workdir()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the supervisor asks (Supervised) ---------------------------

    def current(self, name: str) -> subprocess.Popen[bytes] | None:
        proc = self.processes.get(name)
        return None if proc is None else proc.process

    def restart(self, name: str, note: str) -> None:
        old = self.processes[name]
        with old.log_path.open("a") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} supervisor: {note} ---\n")
        self._spawn(name, old.argv, old.env, old.stdin)

    def healthy(self, name: str) -> bool:
        if name == "redis":
            return probe_redis(self.ports.redis, self.redis_password)
        if name == "front":
            return probe_tcp(self.ports.gateway)
        if name == "echo-backend":
            proc = self.current(name)
            return proc is not None and proc.poll() is None
        replica = self.replica(name)
        if replica.service == "gateway":
            return probe_http(f"http://127.0.0.1:{replica.port}/readyz")
        return probe_grpc(replica.port)

    def ports_free(self, name: str) -> bool:
        if name == "redis":
            bound = [("127.0.0.1", self.ports.redis)]
        elif name == "front":
            bound = [(self.host, self.ports.gateway)]
        elif name == "echo-backend":
            bound = []
        else:
            replica = self.replica(name)
            ports = (replica.port, replica.metrics_port, self.funasr_ports.get(name, 0))
            bound = [(self.host, port) for port in ports if port]
        return all(port_free(host, port) for host, port in bound)

    # -- processes -------------------------------------------------------

    def _start_redis(self) -> None:
        argv, config = self.redis.command()
        self._spawn("redis", argv, stdin=config)

    def _spawn_replica(self, replica: Replica) -> None:
        argv = [sys.executable, "-m", "services.cli", replica.service]
        self._spawn(replica.name, argv, self.env(replica))

    def _spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> None:
        log_path = self.run_dir / f"{name}.log"
        env = env or self.env()
        with log_path.open("ab") as out:  # the child keeps its own copy
            process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[1],
                start_new_session=True,
            )
        if stdin is not None and process.stdin is not None:
            with contextlib.suppress(BrokenPipeError), process.stdin:
                process.stdin.write(stdin)
        self.processes[name] = ServiceProcess(name, process, log_path, argv, env, stdin)
        if self.supervisor is not None:
            self.supervisor.watch(name)

    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        if proc.process.poll() is not None:
            raise ClusterError(
                f"{name} exited with {proc.process.returncode}; last log lines:\n{proc.log_tail()}"
            )

    def _wait_until(self, name: str, probe: Callable[[], bool], deadline: float) -> None:
        while True:
            self._check_alive(name)
            if probe():
                return
            self._tick(name, deadline)

    def _wait_redis(self, deadline: float) -> None:
        self._wait_until("redis", lambda: self.healthy("redis"), deadline)

    def _wait_grpc(self, name: str, port: int, deadline: float) -> None:
        self._wait_until(name, lambda: probe_grpc(port), deadline)

    def _wait_http(self, name: str, url: str, deadline: float) -> None:
        self._wait_until(name, lambda: probe_http(url), deadline)

    def _tick(self, name: str, deadline: float) -> None:
        if time.monotonic() > deadline:
            proc = self.processes.get(name)
            tail = "" if proc is None else proc.log_tail()
            raise ClusterError(f"{name} not healthy in time; last log lines:\n{tail}")
        time.sleep(0.1)
