"""Micro-benchmark: how many real-time 16 kHz streams each VAD engine sustains on one core.

For each engine and each N in a sweep, N streams of speech and silence (each
starting at a different point of the material, so starts and ends are spread
over the ticks) are opened and stepped together in 60 ms ticks, as the VAD
service's tick loop does. The process is pinned to CPU 0 with one torch and
one onnxruntime thread, and the CPU time (process time, not wall time) per
tick is measured after a warm-up. N streams keep up when one tick costs at
most 60 ms; the streams an engine sustains is N * 60 ms / time-per-tick,
reported for the largest N that keeps up.

    .venv/bin/python -m bench.vad_bench [--seconds 6] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from services.common.audio import SAMPLE_RATE
from services.simulator.speech import silence, synthesize
from services.vad.engine import VadEngine

ROOT = Path(__file__).resolve().parents[1]
TICK_MS = 60
TICK = SAMPLE_RATE * TICK_MS // 1000
RESULTS = ROOT / "bench-results" / "vad_bench.json"

SWEEPS = {
    "fsmn (batched)": [64, 128, 256, 384, 512, 768, 1024],
    "silero (batched)": [64, 128, 256, 384, 512, 768, 1024],
    "fsmn-stream (funasr per stream)": [2, 4, 8, 12, 16, 20, 24, 32],
}


def material() -> np.ndarray:
    """About 20 s of speech with pauses, looped by every stream from its own offset."""
    parts = [
        silence(0.8),
        synthesize("hello there how are you today", "en"),
        silence(1.2),
        synthesize("please turn on the lights in the kitchen", "en+f3"),
        silence(0.6),
        synthesize("你好小智，今天天气怎么样", "cmn"),
        silence(2.0),
        synthesize("what time is it", "en+m7"),
        silence(1.0),
    ]
    rng = np.random.default_rng(0)
    audio = np.concatenate(parts)
    return (audio + rng.normal(0, 0.003, audio.size)).astype(np.float32)


def build_engines() -> dict[str, Callable[[], VadEngine]]:
    from services.vad.fsmn import FsmnVadEngine
    from services.vad.fsmn_batched import BatchedFsmnVadEngine
    from services.vad.silero import SileroVadEngine

    fsmn_dir = ROOT / "models" / "fsmn-vad"
    return {
        "fsmn (batched)": lambda: BatchedFsmnVadEngine(fsmn_dir),
        "silero (batched)": lambda: SileroVadEngine(ROOT / "models/silero-vad/silero_vad.onnx"),
        "fsmn-stream (funasr per stream)": lambda: FsmnVadEngine(fsmn_dir),
    }


def cpu_per_tick(
    engine: VadEngine, audio: np.ndarray, n: int, seconds: float, warmup_ticks: int = 5
) -> tuple[float, int]:
    """Mean CPU seconds per 60 ms tick with ``n`` live streams, and the events seen."""
    ids = [f"s{i}" for i in range(n)]
    for sid in ids:
        engine.open(sid, 500)
    offsets = np.linspace(0, audio.size, n, endpoint=False).astype(np.int64) // TICK * TICK
    looped = np.concatenate([audio, audio])
    ticks = warmup_ticks + max(1, round(seconds * 1000 / TICK_MS))
    spent, events = 0.0, 0
    for t in range(ticks):
        at = (offsets + t * TICK) % audio.size
        chunks = {sid: looped[a : a + TICK] for sid, a in zip(ids, at, strict=True)}
        started = time.process_time()
        events += len(engine.step(chunks, []))
        if t >= warmup_ticks:
            spent += time.process_time() - started
    for sid in ids:
        engine.close(sid)
    return spent / (ticks - warmup_ticks), events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="audio time per point")
    parser.add_argument("--quick", action="store_true", help="a shorter sweep")
    args = parser.parse_args()

    # One core, one thread: the figure is per core, and replicas scale by process.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    audio = material()
    results: dict[str, dict[str, object]] = {}
    for name, build in build_engines().items():
        engine = build()
        sweep = SWEEPS[name][:4] if args.quick else SWEEPS[name]
        points = []
        for n in sweep:
            per_tick, events = cpu_per_tick(engine, audio, n, args.seconds)
            capacity = n * TICK_MS / 1000 / per_tick
            points.append(
                {
                    "streams": n,
                    "cpu_ms_per_tick": round(per_tick * 1000, 3),
                    "us_per_stream_per_tick": round(per_tick * 1e6 / n, 1),
                    "keeps_up": per_tick * 1000 <= TICK_MS,
                    "sustained_streams": round(capacity, 1),
                    "events": events,
                }
            )
            print(f"  {name:34s} N={n:5d}  {per_tick * 1000:8.2f} ms/tick  -> {capacity:7.1f}")
            if per_tick * 1000 > TICK_MS:
                break  # past saturation; larger N only costs time
        keeping = [p for p in points if p["keeps_up"]]
        best = keeping[-1] if keeping else points[0]
        results[name] = {"points": points, "sustained_streams_per_core": best["sustained_streams"]}

    baseline = float(results["fsmn-stream (funasr per stream)"]["sustained_streams_per_core"])  # type: ignore[arg-type]
    print(f"\nreal-time 16 kHz streams per core ({TICK_MS} ms ticks, CPU time):")
    print(f"{'engine':34s} {'streams/core':>12s} {'vs per-stream':>14s}")
    for name, result in results.items():
        streams = float(result["sustained_streams_per_core"])  # type: ignore[arg-type]
        result["ratio_to_per_stream"] = round(streams / baseline, 1)
        print(f"{name:34s} {streams:12.1f} {streams / baseline:13.1f}x")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "tick_ms": TICK_MS,
                "audio_seconds_per_point": args.seconds,
                "cpu": "one core (sched_setaffinity {0}), torch and onnxruntime 1 thread",
                "engines": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
