"""The models alone: utterances/s and latency by batch size, fp32 and half precision.

Each model is loaded through its production engine (`SenseVoiceEngine`,
`ERes2NetV2Engine`) and called as the batcher calls it, with a batch of
equal-length utterances. Half precision is torch autocast around that call
(the engines themselves run fp32), tried only where the device supports it;
a precision that fails is reported with its error, not fatal. Every shape is
called once before it is timed, and CUDA is synchronised around the clock.

Runs as its own process (the orchestrator starts it) so that its CUDA
context and cached memory are gone before the services take the GPU.

    python -m bench.gpu.model_table --work /tmp/sf-gpu --out bench-results/gpu_model_table.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu.models import RANDOM_WEIGHTS_NOTICE, build_models
from services.asr.engine import AsrRequest
from services.asr.sensevoice import SenseVoiceEngine
from services.common.funasr_models import resolve_device
from services.speaker.eres2net import ERes2NetV2Engine

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def precisions(device: str, wanted: list[str]) -> list[str]:
    """The precisions worth timing here: half precision only on a GPU that has it."""
    usable = ["fp32"]
    if device.startswith("cuda"):
        usable.append("fp16")
        if torch.cuda.is_bf16_supported():
            usable.append("bf16")
    return [p for p in wanted if p in usable]


@contextlib.contextmanager
def precision(device: str, name: str) -> Iterator[None]:
    dtype = DTYPES[name]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.split(":")[0], dtype=dtype):
        yield


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_batches(
    call: Callable[[int], object],
    device: str,
    batches: list[int],
    repeats: int,
) -> list[dict[str, Any]]:
    """Rows of (batch, ms per call, utterances/s, peak GPU memory) for one model/precision."""
    rows = []
    cuda = device.startswith("cuda")
    for batch in batches:
        call(batch)  # warm-up at this shape (kernel selection, allocator growth)
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(repeats):
            call(batch)
        _sync(device)
        per_call = (time.perf_counter() - started) / repeats
        rows.append(
            {
                "batch": batch,
                "latency_ms": round(per_call * 1000, 2),
                "utterances_per_s": round(batch / per_call, 1),
                "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)
                if cuda
                else None,
            }
        )
    return rows


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dirs = build_models(Path(args.work), args.size)
    rng = np.random.default_rng(0)
    # Speech-like level; the content does not matter to random weights.
    audio = (rng.standard_normal(int(args.utterance_s * 16000)) * 0.05).astype(np.float32)
    batches = [int(b) for b in args.batches.split(",")]
    asr = SenseVoiceEngine(str(dirs.sensevoice), device=device)
    speaker = ERes2NetV2Engine(str(dirs.eres2netv2), device=device)
    models: dict[str, Callable[[int], object]] = {
        "sensevoice": lambda n: asr.transcribe([AsrRequest(audio=audio) for _ in range(n)]),
        "eres2netv2": lambda n: speaker.embed([audio] * n),
    }
    params = {
        "sensevoice": sum(p.numel() for p in asr.model.model.parameters()),
        "eres2netv2": sum(p.numel() for p in speaker.network.parameters()),
    }
    table: list[dict[str, Any]] = []
    for name, call in models.items():
        for prec in precisions(device, args.precisions.split(",")):
            try:
                with precision(device, prec):
                    rows = time_batches(call, device, batches, args.repeats)
            except Exception as exc:  # a precision a kernel lacks is a result, not a crash
                table.append({"model": name, "precision": prec, "error": repr(exc)[:300]})
                print(f"{name} {prec}: failed: {exc!r}"[:300], flush=True)
                continue
            for row in rows:
                table.append({"model": name, "precision": prec, **row})
                print(json.dumps(table[-1]), flush=True)
    return {
        "weights": "random",
        "notice": RANDOM_WEIGHTS_NOTICE,
        "device": device,
        "gpu_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "size": args.size,
        "params": params,
        "utterance_s": args.utterance_s,
        "rows": table,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="where the random model directories live")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--precisions", default="fp32,fp16,bf16")
    p.add_argument("--utterance-s", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    return p


def main() -> None:
    args = parser().parse_args()
    print(RANDOM_WEIGHTS_NOTICE, flush=True)
    result = run_table(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
