"""Devices per GPU in one command: model-only table, then both designs' sweeps.

    python -m bench.gpu                          # everything, on the GPU when there is one
    python -m bench.gpu --parts model            # one part at a time (each fits a 10-min slot)
    python -m bench.gpu --parts batched --devices 250,500,1000,2000

Parts write into one JSON (bench-results/gpu_bench.json), replacing what an
earlier run left for the same part (the model table) or the same design and N
(a step), so a long benchmark can run in pieces; the tables, the summary and
the PNG are made again from the merged result. The weights are random: the
text is meaningless and only timing counts (the output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gpu.models import RANDOM_WEIGHTS_NOTICE, build_models
from bench.gpu.monitor import GpuSampler
from bench.gpu.report import model_table, plot, summary, sweep_table
from bench.gpu.sweep import ROOT, Driver, Topology, running_cluster

PARTS = ("model", "batched", "per-session")


def machine() -> dict[str, Any]:
    """What ran it, read without touching CUDA in this process (the services own the GPU)."""
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        gpu = out.splitlines()[0] if out else None
    return {
        "gpu": gpu,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cuda_device(requested: str) -> str:
    """``auto`` asks torch in a child process, so this one never holds a CUDA context."""
    if requested != "auto":
        return requested
    probe = "import torch; print('cuda:0' if torch.cuda.is_available() else 'cpu')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout else "cpu"


def run_model_part(args: argparse.Namespace, device: str, out: Path) -> dict[str, Any]:
    table_path = out / "gpu_model_table.json"
    cmd = [
        sys.executable, "-m", "bench.gpu.model_table",
        "--work", str(args.work), "--out", str(table_path), "--size", args.size,
        "--device", device, "--batches", args.batches, "--precisions", args.precisions,
        "--utterance-s", str(args.utterance_s), "--repeats", str(args.repeats),
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=1800)
    table: dict[str, Any] = json.loads(table_path.read_text())
    return table


def run_design(args: argparse.Namespace, design: str, topo: Topology) -> list[dict[str, Any]]:
    """The design's sweeps in one cluster: devices through the gateways, then (``direct``)
    the same utterance rates sent straight to asr and speaker, recorded as ``<design>-direct``."""
    sweep = [
        int(n) for n in (args.devices if design == "batched" else args.baseline_devices).split(",")
    ]
    names = {"devices": design, "direct": f"{design}-direct"}
    modes = [names[m] for m in args.modes.split(",") if m]
    dirs = build_models(args.work, args.size)
    run_dir = Path(tempfile.mkdtemp(prefix=f"gpu-bench-{design}-", dir=args.work))
    steps = []
    print(f"{design}: starting the cluster ({topo}); logs in {run_dir}", flush=True)
    with running_cluster(dirs, topo, design, run_dir) as cluster:
        driver = Driver(cluster, topo, run_dir, GpuSampler())
        if design in modes:
            driver.enrol(max(sweep))
        if args.warmup_s > 0 and modes:
            # Kernel selection, allocator growth and lazy imports happen here, not in step 1.
            driver.step(modes[0], min(sweep[0], 32), args.warmup_s, args.duty, args.target_ms)
        for mode in modes:
            for devices in sweep:
                step = driver.step(mode, devices, args.seconds, args.duty, args.target_ms)
                steps.append(step)
                print(json.dumps(step), flush=True)
                p50 = step["processing_ms"].get("p50", float("inf"))
                if p50 > 4 * args.target_ms or step["error_share"] > 0.2:
                    print(
                        f"{mode}: saturated at {devices} devices; its sweep stops here", flush=True
                    )
                    break
    return steps


def parser() -> argparse.ArgumentParser:
    topo = Topology.for_machine("auto")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    p.add_argument("--devices", default="100,250,500,1000,1500,2000,3000", help="batched sweep")
    p.add_argument("--baseline-devices", default="10,20,40,80,160,320", help="per-session sweep")
    p.add_argument(
        "--modes",
        default="devices,direct",
        help="devices: simulated devices through the gateways; direct: their utterances "
        "straight to asr and speaker (the GPU services alone)",
    )
    p.add_argument("--seconds", type=float, default=30.0, help="talk time per step")
    p.add_argument("--warmup-s", type=float, default=15.0, help="unrecorded first step; 0: none")
    p.add_argument("--duty", type=float, default=0.3, help="fraction of time speaking")
    p.add_argument("--target-ms", type=float, default=300.0, help="p95 processing latency")
    p.add_argument("--device", default="auto", help="asr and speaker device (auto: GPU if any)")
    p.add_argument("--vad-device", default="cpu")
    p.add_argument("--gateways", type=int, default=topo.gateways)
    p.add_argument("--vad-replicas", type=int, default=topo.vad_replicas)
    p.add_argument("--load-procs", type=int, default=topo.load_procs)
    p.add_argument("--asr-replicas", type=int, default=1, help="asr processes sharing the GPU")
    p.add_argument("--speaker-replicas", type=int, default=1)
    p.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: smoke test")
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="model-only table")
    p.add_argument("--precisions", default="fp32,fp16,bf16", help="model-only table")
    p.add_argument("--utterance-s", type=float, default=3.0, help="model-only table")
    p.add_argument("--repeats", type=int, default=5, help="model-only table")
    p.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "speechfront-gpu-bench"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench-results")
    return p


def raise_open_files_limit() -> None:
    """Thousands of WebSockets per gateway and load generator outgrow the usual soft limit
    of 1024 descriptors; the processes started from here inherit the raised one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> None:
    args = parser().parse_args()
    raise_open_files_limit()
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "gpu_bench.json"
    result: dict[str, Any] = json.loads(result_path.read_text()) if result_path.is_file() else {}
    device = cuda_device(args.device)
    topo = Topology(
        args.gateways,
        args.vad_replicas,
        args.load_procs,
        device,
        args.vad_device,
        args.asr_replicas,
        args.speaker_replicas,
    )
    print(RANDOM_WEIGHTS_NOTICE, flush=True)
    if args.size == "tiny":
        print("--size tiny: SenseVoice is a toy-size model here (the smoke test's setting)")
    result.update(
        weights="random",
        notice=RANDOM_WEIGHTS_NOTICE,
        machine=machine(),
        target_ms=args.target_ms,
        size=args.size,
        topology=vars(topo),
    )
    if not device.startswith("cuda"):
        print("no CUDA device: running on the CPU (a smoke run, not a measurement)", flush=True)
    started = time.monotonic()
    for part in parts:
        if part == "model":
            result["model_table"] = run_model_part(args, device, args.out)
        else:
            new = run_design(args, part, topo)
            done = {(s["design"], s["devices"]) for s in new}
            kept = [s for s in result.get("steps", []) if (s["design"], s["devices"]) not in done]
            result["steps"] = kept + new
        result["summary"] = summary(result)
        result_path.write_text(json.dumps(result, indent=2))
    png = args.out / "gpu_bench.png"
    try:
        plot(result, png)
    except ImportError:
        # The GPU image has matplotlib; the wheel bundle leaves it out to stay small.
        png = None
        print("matplotlib is not installed: no PNG (the JSON holds every figure)")
    print(RANDOM_WEIGHTS_NOTICE)
    if result.get("model_table"):
        print(
            "\nmodels alone (production engines, random weights)\n"
            + model_table(result["model_table"])
        )
    if result.get("steps"):
        print("\nsimulated devices (whole cluster)\n" + sweep_table(result["steps"]))
    print("\n" + json.dumps(result["summary"], indent=2))
    print(f"parts {','.join(parts)} took {time.monotonic() - started:.0f} s")
    print(f"wrote {result_path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
