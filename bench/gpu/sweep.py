"""One design's sweep: the local cluster on the GPU, N simulated devices per step.

The cluster is the production profile (FSMN-VAD, SenseVoiceSmall,
ERes2NetV2) with random weights, several gateway and VAD replicas so that
neither the gateway's event loop nor the VAD's CPU caps a GPU machine, and
the load split over several load-generator processes. Devices connect
straight to the gateway replicas (round robin), not through the local TCP
front, which would be one more Python process in the path.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.gpu.clips import enrolment_audio, speech, write_packets
from bench.gpu.loadgen import Share
from bench.gpu.models import ModelDirs
from bench.gpu.monitor import GpuSampler
from bench.load_bench import ADMIN, DESIGNS, TOKEN, cpu_seconds, percentiles
from services.cluster import ClusterPorts, LocalCluster
from services.simulator.admin import enrol_speaker

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Topology:
    gateways: int
    vad_replicas: int
    load_procs: int
    device: str
    vad_device: str
    asr_replicas: int = 1
    speaker_replicas: int = 1

    @classmethod
    def for_machine(cls, device: str, vad_device: str = "cpu") -> Topology:
        # One gateway or load generator per 4 cores and one VAD per 8 keep a 16-core machine
        # busy without starving the model processes of the cores their features need.
        cores = os.cpu_count() or 2
        return cls(max(1, cores // 4), max(1, cores // 8), max(1, cores // 4), device, vad_device)


def profile(dirs: ModelDirs, topo: Topology) -> dict[str, str]:
    return {
        "SF_VAD_ENGINE": "fsmn",
        "SF_VAD_FSMN_MODEL_DIR": str(dirs.fsmn_vad),
        "SF_VAD_DEVICE": topo.vad_device,
        "SF_ASR_ENGINE": "sensevoice",
        "SF_ASR_SENSEVOICE_MODEL": str(dirs.sensevoice),
        "SF_ASR_DEVICE": topo.device,
        "SF_SPEAKER_ENGINE": "eres2netv2",
        "SF_SPEAKER_ERES2NETV2_MODEL": str(dirs.eres2netv2),
        "SF_SPEAKER_DEVICE": topo.device,
    }


def design_env(design: str) -> dict[str, str]:
    return {
        # One shared token for every simulated device (testing opt-in), with room for all.
        "SF_GATEWAY_AUTH_TOKENS": TOKEN,
        "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
        "SF_GATEWAY_ADMIN_TOKEN": ADMIN,
        "SF_GATEWAY_MAX_SESSIONS": "20000",
        "SF_GATEWAY_MAX_SESSIONS_PER_TOKEN": "100000",
        "SF_GATEWAY_MAX_INFLIGHT_UTTERANCES": "16",
        "SF_VAD_MAX_STREAMS": "20000",
        # A GPU takes far larger batches than the CPU defaults allow.
        "SF_ASR_MAX_BATCH": "64",
        "SF_SPEAKER_MAX_BATCH": "64",
        "SF_ASR_MAX_BATCH_AUDIO_S": "900",
        "SF_SPEAKER_MAX_BATCH_AUDIO_S": "900",
        "SF_ASR_MAX_QUEUE": "8192",
        "SF_SPEAKER_MAX_QUEUE": "8192",
        **DESIGNS[design],
    }


@contextmanager
def running_cluster(
    dirs: ModelDirs, topo: Topology, design: str, run_dir: Path
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        run_dir,
        ClusterPorts(),
        profile=profile(dirs, topo),
        extra_env=design_env(design),
        replicas={
            "gateway": topo.gateways,
            "vad": topo.vad_replicas,
            "asr": topo.asr_replicas,
            "speaker": topo.speaker_replicas,
        },
    )
    # Full-size models load onto the GPU in each compute process; allow for a slow disk.
    cluster.start(timeout=600)
    try:
        yield cluster
    finally:
        cluster.stop()


def enrol_all(cluster: LocalCluster, devices: int, audio: np.ndarray) -> None:
    """A voiceprint per device, so every utterance also asks the speaker service."""
    url = f"http://127.0.0.1:{cluster.replicas['gateway'][0].port}"

    def enrol(i: int) -> None:
        # A few tries: with batch size 1 (the baseline) on a busy CPU an enrolment can
        # outlast the gateway's speaker deadline while the others queue.
        for attempt in range(3):
            try:
                enrol_speaker(url, ADMIN, f"bench-{i}", "bench", audio)
                return
            except httpx.HTTPError:
                if attempt == 2:
                    raise
                time.sleep(1.0)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(enrol, range(devices)))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _service_of(name: str) -> str:
    # Replica names are "<service>" or "<service>-<index>".
    return name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name


class Driver:
    """Runs steps of N devices against one started cluster."""

    def __init__(
        self, cluster: LocalCluster, topo: Topology, work: Path, sampler: GpuSampler
    ) -> None:
        self.cluster = cluster
        self.topo = topo
        self.work = work
        self.sampler = sampler
        self.clips = speech()
        self.packets = work / "packets.json"
        write_packets(self.clips, self.packets)
        self.pcm = work / "speech.npz"
        pcm = {
            f"clip{i:02d}": np.round(c * 32767).astype(np.int16) for i, c in enumerate(self.clips)
        }
        np.savez(self.pcm, **pcm)  # type: ignore[arg-type]

    def enrol(self, devices: int) -> None:
        enrol_all(self.cluster, devices, enrolment_audio(self.clips))

    def step(
        self, design: str, devices: int, seconds: float, duty: float, target_ms: float
    ) -> dict[str, Any]:
        """One step; a design named ``<design>-direct`` sends utterances to asr and speaker
        straight (bench/gpu/direct.py) instead of streaming Opus through the gateways."""
        direct = design.endswith("-direct")
        urls = [f"ws://127.0.0.1:{r.port}/xiaozhi/v1/" for r in self.cluster.replicas["gateway"]]
        procs = min(self.topo.load_procs, devices)
        # Connects spread over up to 10 s: thousands at once would be a handshake storm.
        ramp_s = min(10.0, devices / 100)
        answer_wait_s = 30.0
        spec_dir = Path(tempfile.mkdtemp(prefix=f"step-{devices}-", dir=self.work))
        start_at = time.time() + 1.5  # every process has imported and read its spec by then
        specs = []
        for p in range(procs):
            ids = range(p, devices, procs)
            spec = {
                "clips": str(self.packets),
                "devices": [
                    {"id": f"bench-{i}", "seed": i, "url": urls[i % len(urls)]} for i in ids
                ],
                "seconds": seconds,
                "duty": duty,
                "token": TOKEN,
                "start_at": start_at,
                "ramp_s": ramp_s,
                "answer_wait_s": answer_wait_s,
                "pcm": str(self.pcm),
                "asr": [f"127.0.0.1:{r.port}" for r in self.cluster.replicas["asr"]],
                "speaker": [f"127.0.0.1:{r.port}" for r in self.cluster.replicas["speaker"]],
            }
            path = spec_dir / f"spec{p}.json"
            path.write_text(json.dumps(spec))
            specs.append(path)
        pids = {name: proc.process.pid for name, proc in self.cluster.processes.items()}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        children_before = _children_cpu()
        self.sampler.start()
        started = time.monotonic()
        module = "bench.gpu.direct" if direct else "bench.gpu.loadgen"
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", module, str(s), str(s.with_suffix(".out"))],
                cwd=ROOT,
            )
            for s in specs
        ]
        # Bounded: talk, ramp, the wait for late answers, and slack for start-up and closing.
        limit = seconds + ramp_s + answer_wait_s + 120
        for w in workers:
            try:
                w.wait(timeout=max(1.0, started + limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(10)
        wall = time.monotonic() - started
        gpu = self.sampler.stop()
        shares = [_read_share(s) for s in specs]
        cpu: dict[str, float] = {}
        for name, pid in pids.items():
            service = _service_of(name)
            cpu[service] = cpu.get(service, 0.0) + (cpu_seconds(pid) - cpu_before[name]) / wall
        cpu["load-generator"] = (_children_cpu() - children_before) / wall
        if gpu.get("memory_by_pid_mib"):
            by_pid = {str(pid): name for name, pid in pids.items()}
            gpu["memory_by_process_mib"] = {
                by_pid.get(pid, pid): mib for pid, mib in gpu.pop("memory_by_pid_mib").items()
            }
        return summarise(design, devices, seconds, duty, shares, cpu, gpu, target_ms)


def _read_share(spec: Path) -> Share:
    out = spec.with_suffix(".out")
    if out.is_file():
        return Share(**json.loads(out.read_text()))
    # A generator that died or was killed: its devices count as failed connections.
    return Share(devices=len(json.loads(spec.read_text())["devices"]))


def summarise(
    design: str,
    devices: int,
    seconds: float,
    duty: float,
    shares: list[Share],
    cpu: dict[str, float],
    gpu: dict[str, Any],
    target_ms: float,
) -> dict[str, Any]:
    def total(field: str) -> int:
        return sum(int(getattr(s, field)) for s in shares)

    def joined(field: str) -> list[float]:
        return [float(v) for s in shares for v in getattr(s, field)]

    sent, recognised = total("utterances_sent"), total("recognised")
    failed_connects = devices - total("connected")
    errors = total("alerts") + total("unanswered") + failed_connects
    closes: dict[str, int] = {}
    for s in shares:
        for reason, n in s.closes.items():
            closes[reason] = closes.get(reason, 0) + n
    batch = joined("asr_batch")
    processing = percentiles(joined("processing_ms"))
    packets = max(1, total("packets"))
    return {
        "design": design,
        "devices": devices,
        "seconds": seconds,
        "duty_cycle": duty,
        "utterances_sent": sent,
        "utterances_recognised": recognised,
        "alerts": total("alerts"),
        "unanswered": total("unanswered"),
        "failed_connections": failed_connects,
        "closes": closes,
        "error_share": round(errors / max(1, sent + failed_connects), 4),
        # Recognised utterances per second of talk (every device talks `seconds`).
        "utterances_per_s": round(recognised / seconds, 2),
        "processing_ms": processing,
        "user_perceived_ms": percentiles(joined("perceived_ms")),
        "asr_batch_mean": round(float(np.mean(batch)), 2) if batch else None,
        "asr_model_ms": percentiles(joined("asr_model_ms")),
        "asr_queue_ms": percentiles(joined("asr_queue_ms")),
        # Above a percent or so the load generators, not the cluster, set the pace.
        "late_packet_share": round(total("late_packets") / packets, 4),
        "cpu_per_s": {k: round(v, 3) for k, v in sorted(cpu.items())},
        "gpu": gpu,
        "within_target": bool(processing)
        and processing["p95"] <= target_ms
        and errors <= 0.001 * max(1, sent),
    }
