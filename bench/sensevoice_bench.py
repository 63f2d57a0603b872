"""SenseVoiceSmall compute timing without the real weights.

No model hub is reachable here, so this builds a randomly initialised model
with SenseVoiceSmall's full encoder sizes (50 + 20 SAN-M blocks, width 512,
4 heads, FFN 2048) and loads it through the production engine
(`services/asr/sensevoice.py`), on the GPU when one is present. Timing and
memory are those of the real architecture; the text is meaningless. The
vocabulary is reduced to 300 tokens (the real one has 25 055; its output layer is
about 5 % of the encoder's compute), so the figures slightly flatter it.

    .venv/bin/python -m bench.sensevoice_bench --batches 1,4,8,16,32 --seconds 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from services.asr.engine import AsrRequest
from services.asr.sensevoice import SenseVoiceEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.tiny_models import SENSEVOICE_SMALL_SIZES, write_tiny_sensevoice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each utterance")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()

    sizes = dict(SENSEVOICE_SMALL_SIZES, vocab_size=300)
    model_dir = write_tiny_sensevoice(Path(tempfile.mkdtemp()) / "sensevoice-random", **sizes)
    engine = SenseVoiceEngine(str(model_dir), device=args.device)
    params = sum(p.numel() for p in engine.model.model.parameters())
    print(f"RANDOM WEIGHTS, full SenseVoiceSmall encoder sizes: {params / 1e6:.0f} M parameters")
    print(f"device: {engine.device}; utterances of {args.seconds} s")
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(int(args.seconds * 16000)) * 0.05).astype(np.float32)
    cuda = engine.device.startswith("cuda")
    rows = []
    for batch_size in (int(b) for b in args.batches.split(",")):
        batch = [AsrRequest(audio=audio) for _ in range(batch_size)]
        engine.transcribe(batch)  # warm-up at this shape
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(args.repeats):
            engine.transcribe(batch)
        if cuda:
            torch.cuda.synchronize()
        per_batch = (time.perf_counter() - started) / args.repeats
        row = {
            "batch": batch_size,
            "batch_ms": round(per_batch * 1000, 1),
            "per_utterance_ms": round(per_batch * 1000 / batch_size, 1),
            "audio_seconds_per_second": round(batch_size * args.seconds / per_batch, 1),
            "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20)
            if cuda
            else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"weights": "random", "device": engine.device, "params": params, "rows": rows}
    (out / "sensevoice_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
