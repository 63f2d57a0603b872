"""Listening devices: CPU per device-second and memory per session, gateway and VAD.

N devices (real WebSockets, real Opus at real-time pace, auto mode) stream
quiet noise, as a device does while it listens and nobody speaks, against
the local cluster, for a sweep of N. Two audio paths run in the same
invocation on the same machine, alternating:

- ``baseline``: the path before issue 15, kept as settings: Opus through
  opuslib (``SF_GATEWAY_OPUS_BINDING=opuslib``) and one AudioFrame message
  per frame to the VAD (``SF_GATEWAY_VAD_WIRE=frames``);
- ``current``: the defaults (libopus into a reused buffer, frames packed
  per 20 ms send tick).

The receive path is not a setting, so both paths run the present one: audio
taken from uvicorn's WebSocket protocol as it is parsed (``BINARY_SINK``)
and one idle timer per connection. Before those, at 300 devices, ``current``
measured 1.31 ms per device-second of gateway CPU and ``baseline`` 1.83; to
compare with an older receive path, run this from a checkout of it.

Next to each step, in the same minute, it measures the two floors (see
``bench.yardstick``): libopus alone on the devices' packets, and the VAD
engine in process on as many streams. The machine's speed drifts by a
fifth from one minute to the next; the live figures over their floors
drift much less.

For each it prints CPU milliseconds per device-second of the gateway and
per stream-second of the VAD (process CPU time over the audio sent, and for
the VAD over the audio it stepped), resident memory per listening session
for both, the VAD's memory after every device has left against before they
came, and gRPC writes per second to the VAD; then the ratios
current/baseline at each N. The load generator shares the machine's cores,
so the ratios are the figures to trust; each path runs ``--repeat`` times
and the lower CPU of the runs that kept up counts.

    .venv/bin/python -m bench.listeners [--devices 100,300,650] [--seconds 15] [--repeat 2]

Results: bench-results/listeners.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.load_bench import cpu_seconds
from bench.overload_bench import rss_mb
from bench.session_memory import raise_fd_limit
from bench.yardstick import engine_ms_per_stream_s, libopus_ms_per_device_s
from services.cluster import ClusterPorts, LocalCluster
from services.simulator.device import DeviceConfig, SimulatedDevice

TOKEN = "listeners-bench-token"
FRAME_S = 0.06
KEPT_UP = 0.95
IDLE_S = 4.0
# Devices send at their own moments within each 60 ms round, in this many slots.
SLOTS = 12
PATHS: dict[str, dict[str, str]] = {
    "baseline": {
        "SF_GATEWAY_OPUS_BINDING": "opuslib",
        "SF_GATEWAY_VAD_WIRE": "frames",
        "SF_VAD_PRECISION": "fp32",
    },
    "current": {
        "SF_GATEWAY_OPUS_BINDING": "direct",
        "SF_GATEWAY_VAD_WIRE": "ticks",
        "SF_VAD_PRECISION": "auto",
    },
}


@dataclass
class Step:
    path: str
    run: int
    devices: int
    device_seconds: float
    gateway_ms_per_device_s: float
    vad_ms_per_stream_s: float
    # Less what the process burns with nobody connected (its clocks, health
    # checks, the VAD's empty ticks), spread over the devices.
    gateway_ms_per_device_s_over_idle: float
    vad_ms_per_stream_s_over_idle: float
    gateway_kb_per_session: float
    vad_kb_per_session: float
    vad_mb_before: float
    vad_mb_after_leave: float
    vad_writes_per_s: float
    # The floors measured in the same minute (bench.yardstick): libopus alone
    # on the devices' packets, and the VAD engine in process on as many streams.
    libopus_ms_per_device_s: float
    engine_ms_per_stream_s: float
    pace: float
    # Audio the VAD stepped over audio sent: below KEPT_UP the cluster fell
    # behind (the machine's cores are shared), and its CPU figures mean little.
    vad_processed: float
    kept_up: bool
    # Operations the gateway still held for the VAD at the end: a large number
    # means the wire, not the VAD, was behind.
    gateway_vad_backlog: float


def quiet_noise(seconds: float) -> np.ndarray:
    """A quiet room: low-level noise the VAD must call silence."""
    rng = np.random.default_rng(15)
    return rng.normal(0, 0.002, int(16_000 * seconds)).astype(np.float32)


def metric(url: str, pattern: str) -> float:
    text = httpx.get(url, timeout=10).text
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def vad_writes(cluster: LocalCluster) -> float:
    return metric(f"{cluster.gateway_url}/metrics", r"^speechfront_gateway_vad_writes_total (\S+)$")


def vad_audio_s(cluster: LocalCluster) -> float:
    return metric(
        f"http://127.0.0.1:{cluster.ports.vad_metrics}/metrics",
        r'^speechfront_audio_seconds_total\{service="vad"\} (\S+)$',
    )


async def stream_rounds(
    devices: list[SimulatedDevice], packets: list[bytes], stop_at: float
) -> int:
    """Every device sends its next packet once per 60 ms round, the devices spread
    over the round; returns the packets sent. Bounded by ``stop_at`` and the packets."""
    slots = [devices[i::SLOTS] for i in range(SLOTS)]
    started = time.monotonic()
    sent = 0
    for index, packet in enumerate(packets):
        for slot, group in enumerate(slots):
            due = started + index * FRAME_S + slot * FRAME_S / SLOTS
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.gather(*(d.send_packet(packet) for d in group))
            sent += len(group)
        if time.monotonic() >= stop_at:
            break
    return sent


async def measure(cluster: LocalCluster, path: str, run: int, n: int, seconds: float) -> Step:
    gateway = cluster.processes["gateway"].process.pid
    vad = cluster.processes["vad"].process.pid
    await asyncio.sleep(2.0)
    before = {"gateway": rss_mb(gateway), "vad": rss_mb(vad)}
    idle_cpu = (cpu_seconds(gateway), cpu_seconds(vad))
    idle_started = time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle_wall = time.monotonic() - idle_started
    idle = (
        (cpu_seconds(gateway) - idle_cpu[0]) / idle_wall,
        (cpu_seconds(vad) - idle_cpu[1]) / idle_wall,
    )
    devices = [
        SimulatedDevice(
            DeviceConfig(url=cluster.device_url, token=TOKEN, device_id=f"l{run}-{n}-{i}")
        )
        for i in range(n)
    ]
    try:
        for start in range(0, n, 50):
            await asyncio.gather(*(d.connect() for d in devices[start : start + 50]))
        await asyncio.gather(*(d.listen("start", "auto") for d in devices))
        packets = devices[0].encode(quiet_noise(seconds + 5))
        warmup = int(3 / FRAME_S)
        await stream_rounds(devices, packets[:warmup], time.monotonic() + 10)
        cpu = (cpu_seconds(gateway), cpu_seconds(vad))
        writes = vad_writes(cluster)
        stepped = vad_audio_s(cluster)
        started = time.monotonic()
        sent = await stream_rounds(devices, packets[warmup:], started + seconds)
        wall = time.monotonic() - started
        used = (cpu_seconds(gateway) - cpu[0], cpu_seconds(vad) - cpu[1])
        writes = vad_writes(cluster) - writes
        # Audio still in flight at the end is at most a tick or two behind.
        await asyncio.sleep(0.5)
        stepped = vad_audio_s(cluster) - stepped
        backlog = metric(
            f"{cluster.gateway_url}/metrics", r"^speechfront_gateway_vad_backlog\{[^}]*\} (\S+)$"
        )
        listening = {"gateway": rss_mb(gateway), "vad": rss_mb(vad)}
        audio_s = sent * FRAME_S
    finally:
        await asyncio.gather(*(d.close() for d in devices))
    await asyncio.sleep(5.0)  # sessions gone, VAD streams closed, heaps trimmed
    after = rss_mb(vad)
    # The floors, in the same minute: the machine's speed drifts (see bench.yardstick).
    libopus_floor = libopus_ms_per_device_s(packets[warmup : warmup + int(seconds / FRAME_S)])
    engine_floor = engine_ms_per_stream_s(n, quiet_noise(3), PATHS[path]["SF_VAD_PRECISION"])
    return Step(
        path=path,
        run=run,
        devices=n,
        device_seconds=round(audio_s, 1),
        gateway_ms_per_device_s=round(used[0] * 1000 / audio_s, 3),
        # Over the audio the VAD stepped: a replica starved of CPU by its
        # neighbours steps less, and this still says what each second cost.
        vad_ms_per_stream_s=round(used[1] * 1000 / max(stepped, 1e-9), 3),
        gateway_ms_per_device_s_over_idle=round((used[0] - idle[0] * wall) * 1000 / audio_s, 3),
        vad_ms_per_stream_s_over_idle=round(
            (used[1] - idle[1] * wall) * 1000 / max(stepped, 1e-9), 3
        ),
        gateway_kb_per_session=round((listening["gateway"] - before["gateway"]) * 1024 / n, 1),
        vad_kb_per_session=round((listening["vad"] - before["vad"]) * 1024 / n, 1),
        vad_mb_before=round(before["vad"], 1),
        vad_mb_after_leave=round(after, 1),
        vad_writes_per_s=round(writes / wall, 1),
        libopus_ms_per_device_s=round(libopus_floor, 3),
        engine_ms_per_stream_s=round(engine_floor, 3),
        # Audio sent over wall time per device: 1.0 when the load kept real time.
        pace=round(audio_s / n / wall, 3),
        vad_processed=round(stepped / audio_s, 3),
        kept_up=stepped >= KEPT_UP * audio_s,
        gateway_vad_backlog=backlog,
    )


async def run_path(path: str, run: int, sweep: list[int], seconds: float) -> list[Step]:
    most = max(sweep)
    env = {
        "SF_GATEWAY_AUTH_TOKENS": TOKEN,
        "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
        "SF_GATEWAY_MAX_SESSIONS_PER_TOKEN": str(most + 10),
        "SF_GATEWAY_MAX_SESSIONS": str(most + 10),
        "SF_VAD_MAX_STREAMS": str(most + 10),
        **PATHS[path],
    }
    cluster = LocalCluster(
        Path(tempfile.mkdtemp(prefix="listeners-")), ClusterPorts(), extra_env=env
    )
    cluster.start()
    steps: list[Step] = []
    try:
        for n in sweep:
            step = await measure(cluster, path, run, n, seconds)
            print(json.dumps(asdict(step)), flush=True)
            steps.append(step)
    finally:
        cluster.stop()
    return steps


def summarise(steps: list[Step], sweep: list[int]) -> dict[str, dict[str, object]]:
    """Per N: each path's best run (lowest gateway CPU) among those that kept up,
    or among all when none did (then marked), and the ratios current/baseline."""
    summary: dict[str, dict[str, object]] = {}
    for n in sweep:
        best: dict[str, Step] = {}
        vad: dict[str, float] = {}
        for path in PATHS:
            runs = [s for s in steps if s.path == path and s.devices == n]
            kept = [s for s in runs if s.kept_up] or runs
            if kept:
                best[path] = min(kept, key=lambda s: s.gateway_ms_per_device_s)
                vad[path] = min(s.vad_ms_per_stream_s for s in kept)
        row: dict[str, object] = {path: asdict(step) for path, step in best.items()}
        if len(best) == 2:
            old, new = best["baseline"], best["current"]
            row["ratio_current_to_baseline"] = {
                "gateway_cpu": round(new.gateway_ms_per_device_s / old.gateway_ms_per_device_s, 3),
                "gateway_cpu_over_idle": round(
                    new.gateway_ms_per_device_s_over_idle / old.gateway_ms_per_device_s_over_idle, 3
                ),
                "vad_cpu": round(vad["current"] / vad["baseline"], 3),
                "vad_writes": round(new.vad_writes_per_s / max(old.vad_writes_per_s, 1e-9), 3),
                "from_runs_that_kept_up": old.kept_up and new.kept_up,
            }
        summary[str(n)] = row
    return summary


def print_table(summary: dict[str, dict[str, object]]) -> None:
    print()
    print(
        f"{'N':>5} {'path':>9} {'gw ms/dev-s':>12} {'(over idle)':>11} {'vad ms/str-s':>13} "
        f"{'(over idle)':>11} {'gw kB/sess':>11} "
        f"{'vad kB/sess':>12} {'vad MB before/after':>20} {'writes/s':>9} {'pace':>5} "
        f"{'stepped':>7}"
    )
    for n, row in summary.items():
        for path in PATHS:
            s = row.get(path)
            if not isinstance(s, dict):
                continue
            print(
                f"{n:>5} {path:>9} {s['gateway_ms_per_device_s']:>12} "
                f"{s['gateway_ms_per_device_s_over_idle']:>11} {s['vad_ms_per_stream_s']:>13} "
                f"{s['vad_ms_per_stream_s_over_idle']:>11} "
                f"{s['gateway_kb_per_session']:>11} {s['vad_kb_per_session']:>12} "
                f"{s['vad_mb_before']:>9}/{s['vad_mb_after_leave']:<10} "
                f"{s['vad_writes_per_s']:>9} {s['pace']:>5} {s['vad_processed']:>7}"
            )
            print(
                f"{'':>15} floors this minute: libopus {s['libopus_ms_per_device_s']} ms/dev-s "
                f"(gateway x{s['gateway_ms_per_device_s'] / s['libopus_ms_per_device_s']:.2f}), "
                f"VAD engine in process {s['engine_ms_per_stream_s']} ms/str-s "
                f"(live x{s['vad_ms_per_stream_s'] / s['engine_ms_per_stream_s']:.2f})"
            )
        ratio = row.get("ratio_current_to_baseline")
        if isinstance(ratio, dict):
            note = "" if ratio["from_runs_that_kept_up"] else " (a path fell behind)"
            print(
                f"{n:>5} {'ratio':>9} gateway CPU x{ratio['gateway_cpu']} "
                f"(over idle x{ratio['gateway_cpu_over_idle']}), "
                f"VAD CPU x{ratio['vad_cpu']}, VAD writes x{ratio['vad_writes']}{note}"
            )


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    raise_fd_limit()
    sweep = [int(n) for n in args.devices.split(",")]
    paths = [p for p in args.paths.split(",") if p in PATHS]
    steps: list[Step] = []
    for run in range(args.repeat):
        # Alternate the paths, so drift on the machine hits both alike.
        order = paths if run % 2 == 0 else paths[::-1]
        for path in order:
            steps += await run_path(path, run, sweep, args.seconds)
    summary = summarise(steps, sweep)
    behind = [s for s in steps if not s.kept_up]
    for s in behind:
        print(
            f"fell behind: {s.path} run {s.run} at N={s.devices}: the VAD stepped only "
            f"{s.vad_processed:.0%} of the audio (its CPU figure is per second stepped)"
        )
    print_table(summary)
    return {
        "devices": sweep,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "paths": {p: PATHS[p] for p in paths},
        "runs": [asdict(s) for s in steps],
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="100,300,650", help="comma-separated sweep of N")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured audio per step")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each path")
    parser.add_argument("--paths", default="baseline,current")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every service on the current path, e.g. SF_GATEWAY_VAD_SEND_TICK_MS=5",
    )
    args = parser.parse_args()
    PATHS["current"].update(dict(item.split("=", 1) for item in args.env))
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "listeners.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out / 'listeners.json'}")


if __name__ == "__main__":
    main()
