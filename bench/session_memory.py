"""Memory per session: gateway and VAD RSS with N listening and speaking devices.

Starts the local cluster, connects N devices (real WebSockets, real Opus) that
listen in auto mode, then lets a share of them speak without pausing (their
utterances stay open), then disconnects everyone. Prints the gateway's and
the VAD's resident memory at each step and per session, and whether the VAD
gives its memory back once the streams are gone.

    .venv/bin/python -m bench.session_memory --devices 1000 --speaking 200

``--env NAME=VALUE`` passes a setting to every service, e.g.
``--env SF_VAD_CHUNK_AUDIO_S=1e9`` for one engine call per VAD tick
however many streams it steps (the path before ticks were split).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.overload_bench import rss_mb
from services.cluster import ClusterPorts, LocalCluster
from services.simulator.device import DeviceConfig, SimulatedDevice
from services.simulator.phrases import SENTENCES
from services.simulator.speech import synthesize, trim_silence

TOKEN = "memory-bench-token"


def raise_fd_limit() -> None:
    """Two sockets per device (here and in the gateway) outgrow the default 1024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def send_rounds(devices: list[SimulatedDevice], packets: list[bytes], pace_s: float) -> None:
    """Every device sends packet k in round k; rounds are ``pace_s`` apart at the most."""
    for packet in packets:
        started = time.monotonic()
        await asyncio.gather(*(d.send_packet(packet) for d in devices))
        await asyncio.sleep(max(0.0, pace_s - (time.monotonic() - started)))


def snapshot(cluster: LocalCluster) -> dict[str, float]:
    return {name: rss_mb(cluster.processes[name].process.pid) for name in ("gateway", "vad")}


async def settle(cluster: LocalCluster, seconds: float = 3.0) -> dict[str, float]:
    """RSS once the services have worked through what was sent (a few ticks of quiet)."""
    await asyncio.sleep(seconds)
    return snapshot(cluster)


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    raise_fd_limit()
    run_dir = Path(tempfile.mkdtemp(prefix="memory-"))
    extra = {
        "SF_GATEWAY_AUTH_TOKENS": TOKEN,
        "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
        "SF_GATEWAY_MAX_SESSIONS_PER_TOKEN": str(args.devices + 10),
        "SF_GATEWAY_MAX_SESSIONS": str(args.devices + 10),
        "SF_VAD_MAX_STREAMS": str(args.devices + 10),
    }
    extra.update(dict(item.split("=", 1) for item in args.env))
    cluster = LocalCluster(run_dir, ClusterPorts(), extra_env=extra)
    cluster.start()
    devices: list[SimulatedDevice] = []
    try:
        steps: dict[str, dict[str, float]] = {"started": await settle(cluster, 2.0)}
        devices = [
            SimulatedDevice(DeviceConfig(url=cluster.device_url, token=TOKEN, device_id=f"mem-{i}"))
            for i in range(args.devices)
        ]
        for start in range(0, len(devices), 50):
            await asyncio.gather(*(d.connect() for d in devices[start : start + 50]))
        steps["connected"] = await settle(cluster)
        await asyncio.gather(*(d.listen("start", "auto") for d in devices))
        quiet = devices[0].encode(np.zeros(16_000 * 2, dtype=np.float32))  # 2 s
        await send_rounds(devices, quiet, 0.06)
        steps["listening"] = await settle(cluster)
        speech = trim_silence(synthesize(" ".join(SENTENCES[:3])))[: 16_000 * 4]
        speaking = devices[: args.speaking]
        await send_rounds(speaking, devices[0].encode(speech), 0.06)
        steps["speaking"] = snapshot(cluster)  # the utterances are still open
        await asyncio.gather(*(d.close() for d in devices))
        devices = []
        steps["closed"] = await settle(cluster, 5.0)
    finally:
        for d in devices:
            await d.close()
        cluster.stop()

    def per_session_kb(before: str, after: str, count: int) -> dict[str, float]:
        return {
            name: round((steps[after][name] - steps[before][name]) * 1024 / max(count, 1), 1)
            for name in ("gateway", "vad")
        }

    report = {
        "devices": args.devices,
        "speaking": args.speaking,
        "env": args.env,
        "rss_mb": {step: {k: round(v, 1) for k, v in rss.items()} for step, rss in steps.items()},
        "kb_per_connected_session": per_session_kb("started", "connected", args.devices),
        "kb_per_listening_session": per_session_kb("started", "listening", args.devices),
        "kb_per_speaking_session": per_session_kb("listening", "speaking", args.speaking),
        "mb_kept_after_close": {
            name: round(steps["closed"][name] - steps["started"][name], 1)
            for name in ("gateway", "vad")
        },
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--speaking", type=int, default=200)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every service",
    )
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "session_memory.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
