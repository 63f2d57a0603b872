"""The VAD's bfloat16 encoder hears what its float32 encoder hears, to the frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.fsmn_reference import CHUNK
from support.recordings import mandarin
from support.vad_clips import build_clips, step_together

from services.vad.fsmn_batched import BatchedFsmnVadEngine
from services.vad.fsmn_encoder import encoder_dtype

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fsmn-vad"
FRAME_MS = 10


@pytest.mark.parametrize(
    ("capabilities", "device", "expected"),
    [
        ({"avx512_bf16": True, "amx_bf16": False}, "cpu", torch.bfloat16),
        ({"avx512_bf16": False, "amx_bf16": True}, "cpu", torch.bfloat16),
        # AVX-512 without BF16: oneDNN would convert every operand and back.
        ({"avx512_bf16": False, "amx_bf16": False, "avx512_bw": True}, "cpu", torch.float32),
        ({"avx512_bf16": True}, "cuda", torch.float32),
    ],
)
def test_auto_is_bfloat16_only_on_a_cpu_that_multiplies_it_natively(
    monkeypatch: pytest.MonkeyPatch,
    capabilities: dict[str, bool],
    device: str,
    expected: torch.dtype,
) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert encoder_dtype("auto", device) == expected
    assert encoder_dtype("fp32", device) == torch.float32
    assert encoder_dtype("bf16", device) == torch.bfloat16


@pytest.mark.skipif(not (MODEL_DIR / "model.pt").exists(), reason="no FSMN-VAD")
def test_bfloat16_moves_no_boundary_by_more_than_a_frame() -> None:
    clips = build_clips()
    rng = np.random.default_rng(3)
    recording = np.concatenate([np.zeros(8_000), mandarin(), np.zeros(16_000)]).astype(np.float32)
    clips["recording"] = recording
    clips["recording_in_noise"] = recording + rng.normal(0, 0.01, recording.size).astype(np.float32)
    fp32 = step_together(BatchedFsmnVadEngine(MODEL_DIR, precision="fp32"), clips, CHUNK)
    bf16 = step_together(BatchedFsmnVadEngine(MODEL_DIR, precision="bf16"), clips, CHUNK)
    boundaries = same = 0
    for name, want in fp32.items():
        got = bf16[name]
        assert [kind for kind, _ in got] == [kind for kind, _ in want], (name, got, want)
        for (_, got_ms), (_, want_ms) in zip(got, want, strict=True):
            assert abs(got_ms - want_ms) <= FRAME_MS, (name, got, want)
            boundaries += 1
            same += got_ms == want_ms
    assert fp32["recording"], "the recording must have speech to compare"
    assert boundaries >= 150
    # Measured: 211 of 220 in the same frame, none more than one apart.
    print(f"\n{same} of {boundaries} boundaries in the same frame")
    assert same >= 0.85 * boundaries, (same, boundaries)
