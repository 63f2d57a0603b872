"""Resemblyzer's d-vector speaker encoder (GE2E, 3-layer LSTM) on the project's own module.

The resemblyzer package is not used (it imports webrtcvad, which needs
``pkg_resources``); only its ``pretrained.pt`` is. Features are rebuilt here the
way the encoder was trained: 16 kHz, 25 ms Hann window (n_fft 400), 10 ms hop,
40-band Slaney mel filterbank over the power spectrum, no log. Audio is trimmed
of leading/trailing silence by frame energy and normalised to about -30 dBFS
(only ever made louder, as resemblyzer does). Trimming comes first so that
padding silence does not skew the loudness estimate; resemblyzer's internal
long-pause removal (webrtcvad) is not reproduced.

An utterance is cut into 160-frame (1.6 s) partials, one every 77 frames
(1.3 partials per second) with the last kept only if at least 75 % of it is
audio; its embedding is the L2-normalised mean of its partials' embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.common.audio import SAMPLE_RATE

N_FFT = 400
HOP = 160
N_MELS = 40
PARTIAL_FRAMES = 160
PARTIAL_STEP = 77
MIN_COVERAGE = 0.75
TARGET_DBFS = -30.0
EMBED_DIM = 256

# Cosine similarity above which two embeddings are taken as the same speaker.
# Measured on espeak-ng voices en, en+f3, en+m7, en-us+f5 with three ~5 s
# sentences (tests/test_dvector_engine.py): same voice, different sentence
# 0.888-0.947; different voice, different sentence 0.557-0.836; different voice,
# same sentence up to 0.874 (text overlap pulls pairs together, so enrol and
# verify on different text). 0.86 sits in the gap. Real voices are closer to each
# other than espeak's variants; retune on recorded speech before relying on it.
RECOMMENDED_THRESHOLD = 0.86


class _DVectorNet(nn.Module):
    """Parameter names match resemblyzer's ``VoiceEncoder`` so the checkpoint loads strictly."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, 256, num_layers=3, batch_first=True)
        self.linear = nn.Linear(256, EMBED_DIM)
        # Training-time GE2E scale/bias: unused at inference, present in the checkpoint.
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale: linear to 1 kHz, logarithmic above.
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mel = hz / f_sp
    high = hz >= min_log_hz
    mel[high] = min_log_mel + np.log(hz[high] / min_log_hz) / logstep
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    hz = mel * f_sp
    high = mel >= min_log_mel
    hz[high] = min_log_hz * np.exp(logstep * (mel[high] - min_log_mel))
    return hz


def slaney_mel_filterbank(
    sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS
) -> np.ndarray:
    """Triangular filters, area-normalised (librosa's ``filters.mel`` defaults): (n_mels, bins)."""
    fft_freqs = np.linspace(0.0, sr / 2, 1 + n_fft // 2)
    mel_lo, mel_hi = _hz_to_mel(np.array([0.0, sr / 2]))
    mel_pts = np.linspace(float(mel_lo), float(mel_hi), n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    return weights.astype(np.float32)


_MEL_FB = slaney_mel_filterbank()
# Periodic Hann, as scipy/librosa build it for spectral analysis.
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def mel_frames(wav: np.ndarray) -> np.ndarray:
    """Power mel spectrogram, (frames, 40), centred frames with reflect padding."""
    half = N_FFT // 2
    # Reflect padding needs more samples than the pad; tiny inputs get zeros.
    if wav.size > half:
        padded = np.pad(wav.astype(np.float32, copy=False), (half, half), mode="reflect")
    else:
        padded = np.pad(wav.astype(np.float32, copy=False), (half, half))
    n_frames = 1 + (padded.size - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    spectrum = np.abs(np.fft.rfft(padded[idx] * _WINDOW, axis=1)) ** 2
    return (spectrum.astype(np.float32) @ _MEL_FB.T).astype(np.float32)


def trim_by_energy(wav: np.ndarray, frame_ms: int = 30, floor_db: float = -40.0) -> np.ndarray:
    """Drop leading/trailing frames quieter than ``floor_db`` below the loudest frame."""
    frame = SAMPLE_RATE * frame_ms // 1000
    n = wav.size // frame
    if n == 0:
        return wav
    rms = np.sqrt(np.mean(wav[: n * frame].reshape(n, frame) ** 2, axis=1))
    floor = max(float(rms.max()) * 10 ** (floor_db / 20), 1e-4)
    voiced = np.flatnonzero(rms > floor)
    if voiced.size == 0:
        return wav[:0]
    return wav[voiced[0] * frame : (voiced[-1] + 1) * frame]


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) if wav.size else 0.0
    if rms <= 1e-9:
        return wav
    change_db = target_dbfs - 20 * np.log10(rms)
    # Only ever louder: a loud clip is already above the training level's noise floor.
    if change_db <= 0:
        return wav
    return (wav * 10 ** (change_db / 20)).astype(np.float32)


def partial_windows(n_samples: int) -> tuple[int, list[int]]:
    """Frame count the audio must be padded to, and each partial's first frame."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    starts = list(range(0, max(n_frames - PARTIAL_FRAMES + PARTIAL_STEP + 1, 1), PARTIAL_STEP))
    last_start = starts[-1]
    coverage = (n_frames - last_start) / PARTIAL_FRAMES
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts.pop()
    return max(n_frames, starts[-1] + PARTIAL_FRAMES), starts


class DVectorEngine:
    name = "resemblyzer-dvector"
    dim = EMBED_DIM

    def __init__(self, weights: Path, device: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        checkpoint = torch.load(str(weights), map_location="cpu", weights_only=True)
        state = checkpoint.get("model_state", checkpoint)
        self._net = _DVectorNet()
        self._net.load_state_dict(state, strict=True)
        self._net.to(self._device).eval()

    def preprocess(self, wav: np.ndarray) -> np.ndarray:
        return normalize_volume(trim_by_energy(np.asarray(wav, dtype=np.float32).reshape(-1)))

    def _partials(self, wav: np.ndarray) -> np.ndarray:
        wav = self.preprocess(wav)
        total_frames, starts = partial_windows(wav.size)
        # mel_frames yields 1 + len // HOP frames; pad so every partial is full.
        needed = (total_frames - 1) * HOP
        if wav.size < needed:
            wav = np.pad(wav, (0, needed - wav.size))
        mels = mel_frames(wav)
        return np.stack([mels[s : s + PARTIAL_FRAMES] for s in starts])

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        partials = [self._partials(wav) for wav in batch]
        counts = [p.shape[0] for p in partials]
        stacked = torch.from_numpy(np.concatenate(partials)).to(self._device)
        with torch.inference_mode():
            embeds = self._net(stacked).cpu().numpy()
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        start = 0
        for row, count in enumerate(counts):
            mean = embeds[start : start + count].mean(axis=0)
            out[row] = mean / max(float(np.linalg.norm(mean)), 1e-8)
            start += count
        return out
