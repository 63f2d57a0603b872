"""Real recordings kept beside the repository, in ../shared/data (CI lays it out the same)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.common.audio import read_wav

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
# FunASR's example (MIT): a woman reading one sentence, 5.5 s, 16 kHz mono.
MANDARIN_WAV = DATA_DIR / "asr_example.wav"
MANDARIN_TEXT = "欢迎大家来体验达摩院推出的语音识别模型"


def mandarin() -> np.ndarray:
    """The Mandarin recording as 16 kHz float32."""
    return read_wav(MANDARIN_WAV.read_bytes())
