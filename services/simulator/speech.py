"""Synthetic speech for demos, tests and benchmarks (espeak-ng, no recorded corpus needed)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from services.common.audio import SAMPLE_RATE, read_wav

_CACHE = Path(tempfile.gettempdir()) / "speechfront-tts-cache"


def synthesize(text: str, voice: str = "en", speed_wpm: int = 160) -> np.ndarray:
    """Speak ``text`` with espeak-ng and return 16 kHz mono float32 samples.

    Results are cached on disk by (text, voice, speed) so repeated test runs
    do not pay for synthesis again.
    """
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed (make setup installs it)")
    key = hashlib.sha256(f"{voice}|{speed_wpm}|{text}".encode()).hexdigest()[:24]
    cached = _CACHE / f"{key}.wav"
    if not cached.exists():
        _CACHE.mkdir(parents=True, exist_ok=True)
        wav = subprocess.run(
            [espeak, "-v", voice, "-s", str(speed_wpm), "--stdout", text],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
        tmp = cached.with_suffix(f".{np.random.randint(1 << 30)}.tmp")
        tmp.write_bytes(wav)
        tmp.replace(cached)
    return read_wav(cached.read_bytes())


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def trim_silence(samples: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Drop leading/trailing near-silence (espeak pads both ends)."""
    voiced = np.flatnonzero(np.abs(samples) > threshold)
    if voiced.size == 0:
        return samples[:0]
    return samples[voiced[0] : voiced[-1] + 1]
