"""End-to-end load benchmark: the batched cluster against a per-session baseline.

For each design the whole local cluster is started (real processes, lite
profile), then for each N in the sweep, N simulated devices talk at once for
a fixed time: real Opus at real-time pace, each utterance followed by a pause
that gives the configured speaking duty cycle. Reported per (design, N):
p50/p95/p99 of processing latency (VAD end decision -> stt sent, from the
gateway's timing field) and of user-perceived latency (last voiced frame sent
-> stt received), utterances/s, errors, and CPU seconds per second of each
service. The baseline mimics today's per-session servers on the same models:
one funasr VAD call per session per frame, one ASR and one speaker call per
utterance (no batching).

    .venv/bin/python -m bench.load_bench --devices 4,8,16,24 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from services.asr.config import AsrSettings
from services.cluster import ClusterPorts, LocalCluster
from services.simulator.admin import enrol_speaker
from services.simulator.device import FRAME_SAMPLES, DeviceConfig, SimulatedDevice
from services.simulator.phrases import SENTENCES, VOICES
from services.simulator.speech import silence, synthesize, trim_silence

TOKEN, ADMIN = "bench-token", "bench-admin"
HAS_GPU = shutil.which("nvidia-smi") is not None

DESIGNS: dict[str, dict[str, str]] = {
    "batched": {},
    "per-session": {
        "SF_VAD_ENGINE": "fsmn-stream",
        "SF_VAD_TICK_MS": "10",
        "SF_ASR_MAX_BATCH": "1",
        "SF_SPEAKER_MAX_BATCH": "1",
    },
}


@dataclass
class Clip:
    packets: list[bytes]
    # Index of the packet holding the last voiced sample.
    last_voiced: int


@dataclass
class StepResult:
    design: str
    devices: int
    seconds: float
    duty_cycle: float
    utterances_sent: int = 0
    utterances_recognised: int = 0
    errors: int = 0
    utterances_per_s: float = 0.0
    processing_ms: dict[str, float] = field(default_factory=dict)
    user_perceived_ms: dict[str, float] = field(default_factory=dict)
    cpu_per_s: dict[str, float] = field(default_factory=dict)
    # Share of 100 ms loop timers that fired more than 50 ms late on the gateway.
    gateway_loop_lag_over_50ms: float = 0.0
    # Only where nvidia-smi exists: mean utilisation and peak memory during the step.
    gpu: dict[str, float] = field(default_factory=dict)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "p99": round(float(p99), 1)}


def histogram_counts(url: str, name: str) -> dict[str, float]:
    """Cumulative bucket counts of one histogram series from a /metrics page."""
    counts: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            counts[le] = float(line.rsplit(" ", 1)[1])
    return counts


def share_over(before: dict[str, float], after: dict[str, float], bound: str) -> float:
    total = after.get("+Inf", 0) - before.get("+Inf", 0)
    within = after.get(bound, 0) - before.get(bound, 0)
    return round(1 - within / total, 4) if total else 0.0


async def sample_gpu(samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """(utilisation %, memory MiB) once a second while a step runs, where a GPU exists."""
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        for line in out.decode().splitlines():
            util, memory = (float(v) for v in line.split(","))
            samples.append((util, memory))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_clips(encoder: SimulatedDevice) -> tuple[list[Clip], bytes]:
    clips = []
    for i, sentence in enumerate(SENTENCES):
        speech = trim_silence(synthesize(sentence, VOICES[i % len(VOICES)]))
        packets = encoder.encode(speech)
        clips.append(Clip(packets, (speech.size - 1) // FRAME_SAMPLES))
    quiet = encoder.encode(silence(FRAME_SAMPLES / 16000))[0]
    return clips, quiet


@dataclass
class DeviceRun:
    utterances: int
    answers: list[dict[str, Any]]
    # Packet index of each utterance's last voiced frame -> when it was sent.
    sent_at: dict[str, float]
    # Set when the gateway closed the connection (load shedding) or it failed.
    close: str | None = None


async def run_device(
    cluster: LocalCluster,
    clips: list[Clip],
    quiet: bytes,
    seconds: float,
    duty: float,
    seed: int,
) -> DeviceRun:
    """One device talking for ``seconds``: utterances with pauses, then its answers."""
    rng = random.Random(seed)
    device = SimulatedDevice(
        DeviceConfig(url=cluster.device_url, token=TOKEN, device_id=f"bench-{seed}")
    )
    packets: list[bytes] = [quiet] * rng.randint(3, 30)  # stagger the devices
    marks: dict[int, str] = {}
    frames_total = int(seconds * 1000 / 60)
    count = 0
    while len(packets) < frames_total:
        clip = clips[rng.randrange(len(clips))]
        last_voiced = len(packets) + clip.last_voiced
        marks[last_voiced] = str(last_voiced)
        packets.extend(clip.packets)
        pause = max(17, round(len(clip.packets) * (1 - duty) / duty))  # >= 1 s of silence
        packets.extend([quiet] * pause)
        count += 1
    run = DeviceRun(count, [], {})
    try:
        await device.connect()
        await device.listen("start", "auto")
        run.sent_at = await device.stream_packets(packets, marks)
        deadline = time.monotonic() + 30
        while len(run.answers) < count and time.monotonic() < deadline:
            remaining = deadline - time.monotonic()
            message = await asyncio.wait_for(device.messages.get(), remaining)
            if message.get("type") in ("stt", "alert"):
                run.answers.append(message)
    except TimeoutError:
        pass
    except Exception as exc:
        run.close = f"{device.close_code} {device.close_reason}" if device.close_code else repr(exc)
    finally:
        await device.close()
    return run


async def run_step(
    cluster: LocalCluster, design: str, devices: int, seconds: float, duty: float
) -> StepResult:
    encoder = SimulatedDevice(DeviceConfig(url=cluster.device_url))
    clips, quiet = build_clips(encoder)
    pids = {name: proc.process.pid for name, proc in cluster.processes.items()}
    pids["load-generator"] = os.getpid()
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    metrics_url = f"{cluster.gateway_url}/metrics"
    lag_before = histogram_counts(metrics_url, "speechfront_event_loop_lag_seconds")
    gpu_samples: list[tuple[float, float]] = []
    gpu_stop = asyncio.Event()
    gpu_task = asyncio.create_task(sample_gpu(gpu_samples, gpu_stop)) if HAS_GPU else None
    started = time.monotonic()
    runs = await asyncio.gather(
        *(run_device(cluster, clips, quiet, seconds, duty, seed) for seed in range(devices))
    )
    wall = time.monotonic() - started
    gpu_stop.set()
    if gpu_task is not None:
        await gpu_task
    result = StepResult(design, devices, seconds, duty)
    lag_after = histogram_counts(metrics_url, "speechfront_event_loop_lag_seconds")
    result.gateway_loop_lag_over_50ms = share_over(lag_before, lag_after, "0.05")
    if gpu_samples:
        result.gpu = {
            "utilisation_mean_pct": round(float(np.mean([u for u, _ in gpu_samples])), 1),
            "memory_peak_mib": max(m for _, m in gpu_samples),
        }
    result.cpu_per_s = {
        name: round((cpu_seconds(pid) - cpu_before[name]) / wall, 3) for name, pid in pids.items()
    }
    processing, perceived = [], []
    for run in runs:
        result.utterances_sent += run.utterances
        # Marks are packet indexes: the voiced end in session audio time, as stt reports it.
        marks_ms = {name: (int(name) + 1) * 60 for name in run.sent_at}
        matched: set[str] = set()
        for message in run.answers:
            if message["type"] != "stt":
                result.errors += 1
                continue
            result.utterances_recognised += 1
            processing.append(float(message["timing"]["processing_ms"]))
            end_ms = int(message["timing"]["end_ms"])
            name = min(marks_ms, key=lambda n: abs(marks_ms[n] - end_ms), default=None)
            if name is not None and name not in matched and abs(marks_ms[name] - end_ms) < 1000:
                matched.add(name)
                perceived.append((message["_received_at"] - run.sent_at[name]) * 1000)
        result.errors += max(0, run.utterances - len(run.answers))
    result.utterances_per_s = round(result.utterances_recognised / wall, 3)
    result.processing_ms = percentiles(processing)
    result.user_perceived_ms = percentiles(perceived)
    return result


def enrol_speakers(cluster: LocalCluster, devices: int) -> None:
    """Give every device a voiceprint so each utterance also asks the speaker service."""
    audio = np.concatenate([synthesize(" ".join(SENTENCES[:3]), "en+m7"), silence(0.2)])
    for seed in range(devices):
        enrol_speaker(cluster.gateway_url, ADMIN, f"bench-{seed}", "bench", audio)


def largest_within(results: list[StepResult], design: str, target_ms: float) -> int:
    ok = [
        r.devices
        for r in results
        if r.design == design
        and r.user_perceived_ms
        and r.user_perceived_ms["p95"] <= target_ms
        and r.errors == 0
    ]
    return max(ok, default=0)


def plot(results: list[StepResult], path: Path, target_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for design, colour in zip(DESIGNS, ("tab:blue", "tab:red"), strict=False):
        rows = sorted((r for r in results if r.design == design), key=lambda r: r.devices)
        n = [r.devices for r in rows]
        for pct, style in (("p50", ":"), ("p95", "-"), ("p99", "--")):
            lat.plot(
                n,
                [r.user_perceived_ms.get(pct, np.nan) / 1000 for r in rows],
                style,
                color=colour,
                marker="o",
                label=f"{design} {pct}",
            )
        thr.plot(n, [r.utterances_per_s for r in rows], "-o", color=colour, label=design)
    lat.axhline(target_ms / 1000, color="grey", linewidth=0.8, label="p95 target")
    lat.set(xlabel="concurrent devices", ylabel="user-perceived latency (s)", yscale="log")
    lat.legend(fontsize=7)
    thr.set(xlabel="concurrent devices", ylabel="utterances recognised / s")
    thr.legend()
    fig.suptitle("speechfront lite profile: batched cluster vs per-session baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def main_async(args: argparse.Namespace) -> None:
    sweep = [int(n) for n in args.devices.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[StepResult] = []
    for design in args.designs.split(","):
        extra = {
            # One shared token for every simulated device (testing opt-in).
            "SF_GATEWAY_AUTH_TOKENS": TOKEN,
            "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
            "SF_GATEWAY_ADMIN_TOKEN": ADMIN,
            "SF_GATEWAY_MAX_INFLIGHT_UTTERANCES": "16",
            **DESIGNS[design],
        }
        run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{design}-"))
        cluster = LocalCluster(
            run_dir, ClusterPorts(), extra_env=extra, replicas={"asr": args.asr_replicas}
        )
        cluster.start()
        try:
            enrol_speakers(cluster, max(sweep))
            for devices in sweep:
                step = await run_step(cluster, design, devices, args.seconds, args.duty)
                results.append(step)
                print(json.dumps(asdict(step)), flush=True)
                if step.user_perceived_ms.get("p50", 0) > 4 * args.target_ms:
                    print(f"{design}: saturated at {devices} devices; stopping its sweep")
                    break
        finally:
            cluster.stop()
    summary = {
        "target_p95_user_perceived_ms": args.target_ms,
        "asr_replicas": args.asr_replicas,
        # The clusters' ASR reads the same environment: SF_ASR_WHISPER_MODEL=base|tiny.en.
        "whisper_model": AsrSettings().whisper_model,
        "largest_devices_within_target": {
            d: largest_within(results, d, args.target_ms) for d in DESIGNS if d in args.designs
        },
    }
    batched, baseline = (summary["largest_devices_within_target"].get(d, 0) for d in DESIGNS)
    summary["ratio"] = round(batched / baseline, 2) if baseline else None
    (out / "load_bench.json").write_text(
        json.dumps({"summary": summary, "steps": [asdict(r) for r in results]}, indent=2)
    )
    plot(results, out / "load_bench.png", args.target_ms)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'load_bench.json'} and {out / 'load_bench.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="4,8,16,24,32,40,50,64", help="sweep of N")
    parser.add_argument("--seconds", type=float, default=40.0, help="talk time per step")
    parser.add_argument("--duty", type=float, default=0.3, help="fraction of time speaking")
    parser.add_argument("--target-ms", type=float, default=1500.0, help="p95 user-perceived")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument(
        "--asr-replicas", type=int, default=1, help="asr processes (one thread each), both designs"
    )
    parser.add_argument("--out", default="bench-results")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
