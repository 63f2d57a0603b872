"""Overload run: far more devices than the cluster can serve, then recovery.

Shows that the cluster sheds load with clear errors (alerts to devices,
gRPC RESOURCE_EXHAUSTED / expired deadlines counted in metrics) instead of
queueing without end, that each service's memory stays bounded (peak RSS
sampled every second), and that it serves normally again once the load drops.

    .venv/bin/python -m bench.overload_bench --devices 120 --seconds 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.load_bench import ADMIN, TOKEN, build_clips, run_device
from services.cluster import ClusterPorts, LocalCluster
from services.simulator.device import DeviceConfig, SimulatedDevice
from services.simulator.speech import synthesize


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample_rss(cluster: LocalCluster, peaks: dict[str, float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for name, proc in cluster.processes.items():
            peaks[name] = max(peaks.get(name, 0.0), rss_mb(proc.process.pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def service_metrics(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def counters(url: str, pattern: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if re.match(pattern, line):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


async def wait_drained(cluster: LocalCluster, timeout: float) -> float:
    """Seconds until the asr and speaker queues are empty again (bounded poll)."""
    started = time.monotonic()
    ports = (cluster.ports.asr_metrics, cluster.ports.speaker_metrics)
    while time.monotonic() - started < timeout:
        depths = [
            depth
            for port in ports
            for depth in counters(service_metrics(port), "speechfront_queue_depth").values()
        ]
        if all(d == 0 for d in depths):
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise TimeoutError("queues did not drain")


async def recovery_check(cluster: LocalCluster) -> list[dict[str, object]]:
    """Three devices in turn, once the load is gone: each should be answered normally."""
    sentence = "turn on the kitchen lights"
    results: list[dict[str, object]] = []
    for _ in range(3):
        started = time.monotonic()
        async with SimulatedDevice(DeviceConfig(url=cluster.device_url, token=TOKEN)) as device:
            try:
                [result] = await device.speak_auto([synthesize(sentence)], timeout=60)
            except TimeoutError as exc:
                others = [m for m in _drain(device) if m.get("type") != "stt"]
                results.append({"error": str(exc), "other_messages": others})
                continue
            latency_ms = round((result.latency_s or 0) * 1000)
            results.append({"text": result.text, "latency_ms": latency_ms})
        results[-1]["wall_s"] = round(time.monotonic() - started, 1)
    return results


def _drain(device: SimulatedDevice) -> list[dict[str, object]]:
    items = []
    while not device.messages.empty():
        items.append(device.messages.get_nowait())
    return items


async def main_async(args: argparse.Namespace) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="overload-"))
    # One shared token for every simulated device (testing opt-in).
    extra = {
        "SF_GATEWAY_AUTH_TOKENS": TOKEN,
        "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
        "SF_GATEWAY_ADMIN_TOKEN": ADMIN,
    }
    cluster = LocalCluster(run_dir, ClusterPorts(), extra_env=extra)
    cluster.start()
    peaks: dict[str, float] = {}
    stop = asyncio.Event()
    try:
        baseline_rss = {n: round(rss_mb(p.process.pid), 1) for n, p in cluster.processes.items()}
        sampler = asyncio.create_task(sample_rss(cluster, peaks, stop))
        encoder = SimulatedDevice(DeviceConfig(url=cluster.device_url))
        clips, quiet = build_clips(encoder)
        started = time.monotonic()
        runs = await asyncio.gather(
            *(
                run_device(cluster, clips, quiet, args.seconds, args.duty, seed)
                for seed in range(args.devices)
            )
        )
        overload_wall = time.monotonic() - started
        drained_s = await wait_drained(cluster, 120)
        stop.set()
        await sampler
        answers = Counter(
            "stt" if m["type"] == "stt" else f"alert:{m.get('reason')}"
            for r in runs
            for m in r.answers
        )
        gateway = counters(
            f"{cluster.gateway_url}/metrics", r"speechfront_gateway_(utterances|closes)_total\{"
        )
        asr = counters(service_metrics(cluster.ports.asr_metrics), r"speechfront_requests_total\{")
        vad = counters(
            service_metrics(cluster.ports.vad_metrics),
            r"speechfront_vad_(stream_errors_total\{|tick_lag_seconds |streams )",
        )
        recovery = await recovery_check(cluster)
        report = {
            "devices": args.devices,
            "seconds": args.seconds,
            "duty_cycle": args.duty,
            "overload_wall_s": round(overload_wall, 1),
            "utterances_sent": sum(r.utterances for r in runs),
            "answers": dict(answers),
            "devices_closed_by_gateway": sum(1 for r in runs if r.close),
            "gateway_counters": gateway,
            "asr_requests": asr,
            "vad": vad,
            "rss_mb_at_start": baseline_rss,
            "rss_mb_peak": {k: round(v, 1) for k, v in peaks.items()},
            "queues_drained_after_s": round(drained_s, 1),
            "recovery": recovery,
        }
    finally:
        stop.set()
        cluster.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload_bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--duty", type=float, default=0.5)
    parser.add_argument("--out", default="bench-results")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
