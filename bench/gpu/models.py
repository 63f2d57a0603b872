"""Randomly initialised production models, laid out as their ModelScope downloads.

No model hub is reachable where this runs, so the weights are random: the
text they produce is meaningless and only timing and memory count. The
architectures are the real ones: SenseVoiceSmall's encoder (50 + 20 SAN-M
blocks, width 512) with its full 25 055-token CTC head, and ERes2NetV2 in
the w24s4ep4 variant. The real FSMN-VAD comes from `make models` (or the
wheel bundle).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support.tiny_models import (
    SENSEVOICE_BPE,
    SENSEVOICE_SMALL_SIZES,
    write_eres2netv2,
    write_tiny_sensevoice,
)

from services.common.config import DEFAULT_MODELS_DIR

RANDOM_WEIGHTS_NOTICE = (
    "RANDOM WEIGHTS: SenseVoiceSmall and ERes2NetV2 are built at full size with random "
    "parameters (no model hub is reachable), so every transcript is meaningless; only "
    "timing, throughput and memory count."
)

SPEAKER_VARIANT = "w24s4ep4"
# sentencepiece cannot train 25 055 pieces from a few sentences; a small trained model is
# widened with unreachable pieces instead, which gives the tokenizer (and so the CTC head)
# its real size.
_TRAINED_PIECES = 300
_SIZES = {
    "full": SENSEVOICE_SMALL_SIZES,
    # For the CPU smoke test: the same code path, a model small enough for a 2-core CI box.
    "tiny": {"n_blocks": 2, "tp_blocks": 1, "width": 64, "heads": 2, "ffn": 128, "vocab_size": 500},
}


@dataclass(frozen=True)
class ModelDirs:
    sensevoice: Path
    eres2netv2: Path
    fsmn_vad: Path
    size: str


def fsmn_vad_dir() -> Path:
    """The real FSMN-VAD directory: the bundle's copy when SF_BENCH_FSMN_DIR names one."""
    configured = os.environ.get("SF_BENCH_FSMN_DIR")
    path = Path(configured) if configured else DEFAULT_MODELS_DIR / "fsmn-vad"
    if not (path / "model.pt").is_file():
        raise FileNotFoundError(
            f"no FSMN-VAD weights in {path}: run `make models`, or install the GPU wheel bundle"
        )
    return path


def _widen_tokenizer(path: Path, pieces: int) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb  # generated code, no stubs

    proto: Any = pb
    model = proto.ModelProto()
    model.ParseFromString(path.read_bytes())
    lowest = min(p.score for p in model.pieces)
    for i in range(pieces - len(model.pieces)):
        piece = model.pieces.add()
        piece.piece = f"\u2581r{i}"
        piece.score = lowest - 1 - i
        piece.type = proto.ModelProto.SentencePiece.NORMAL
    model.trainer_spec.vocab_size = len(model.pieces)
    path.write_bytes(model.SerializeToString())


def _widen_ctc_head(path: Path, vocab: int, seed: int) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    width = state["ctc.ctc_lo.weight"].shape[1]
    generator = torch.Generator().manual_seed(seed)
    bound = width**-0.5
    state["ctc.ctc_lo.weight"] = (torch.rand(vocab, width, generator=generator) * 2 - 1) * bound
    state["ctc.ctc_lo.bias"] = (torch.rand(vocab, generator=generator) * 2 - 1) * bound
    torch.save(state, path)


def write_random_sensevoice(directory: Path, size: str = "full", seed: int = 0) -> Path:
    sizes = dict(_SIZES[size])
    vocab = int(sizes.pop("vocab_size"))
    write_tiny_sensevoice(directory, **sizes, vocab_size=min(vocab, _TRAINED_PIECES), seed=seed)
    if vocab > _TRAINED_PIECES:
        _widen_tokenizer(directory / SENSEVOICE_BPE, vocab)
        _widen_ctc_head(directory / "model.pt", vocab, seed)
    return directory


def build_models(work: Path, size: str = "full") -> ModelDirs:
    """Model directories under ``work``, reused when an earlier run left them complete."""
    sensevoice = work / f"sensevoice-{size}-random"
    done = sensevoice / ".complete"
    if not done.exists():
        shutil.rmtree(sensevoice, ignore_errors=True)
        write_random_sensevoice(sensevoice, size)
        done.touch()
    speaker = work / f"eres2netv2{SPEAKER_VARIANT}-random"
    if not (speaker / ".complete").exists():
        shutil.rmtree(speaker, ignore_errors=True)
        write_eres2netv2(speaker, SPEAKER_VARIANT)
        (speaker / ".complete").touch()
    return ModelDirs(sensevoice, speaker, fsmn_vad_dir(), size)
