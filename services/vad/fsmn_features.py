"""FSMN-VAD features for many streams at once: Kaldi fbank, LFR splicing and CMVN.

The spec is funasr's ``WavFrontendOnline`` as the streaming FSMN-VAD uses it
(80 mel bins, 25 ms / 10 ms Hamming frames, no dither, LFR m=5 n=1, CMVN from
``am.mvn``). Its streaming behaviour reduces to two carried states per stream:

* samples after the start of the next 10 ms frame wait for the next call, so
  frames land on the same 160-sample grid whatever the chunking;
* LFR frame ``j`` is fbank frames ``j-2 .. j+2`` stacked, the first frame
  standing in for the missing left context. It is emitted once frame ``j+2``
  exists; on the final call the remaining ones are emitted with the last
  frame standing in for the missing right context. So the last four spliced
  rows are carried between calls.

All streams' frames go through one vectorised fbank and one gather, so the
per-stream Python cost is a handful of small array operations per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FRAME_LEN = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
N_FFT = 512
N_MELS = 80
LFR_M = 5
LFR_CONTEXT = (LFR_M - 1) // 2
PREEMPH = 0.97
_FLT_EPS = float(np.finfo(np.float32).eps)
# Frames per fbank pass (see Fbank.of).
_FBANK_BLOCK = 512
_EMPTY_SAMPLES = np.zeros(0, dtype=np.float32)
_EMPTY_ROWS = np.zeros((0, N_MELS), dtype=np.float32)


def load_cmvn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``<AddShift>`` and ``<Rescale>`` vectors of a Kaldi nnet ``am.mvn``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    vectors: dict[str, np.ndarray] = {}
    for i, line in enumerate(lines[:-1]):
        head = line.split()[:1]
        nxt = lines[i + 1].split()
        if head and head[0] in ("<AddShift>", "<Rescale>") and nxt[:1] == ["<LearnRateCoef>"]:
            # "<LearnRateCoef> 0 [ v1 ... vn ]"
            vectors[head[0]] = np.array(nxt[3:-1], dtype=np.float32)
    return vectors["<AddShift>"], vectors["<Rescale>"]


def _mel(freq: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + freq / 700.0)


def kaldi_mel_matrix(
    sample_rate: int = 16000, n_fft: int = N_FFT, n_mels: int = N_MELS, low_hz: float = 20.0
) -> np.ndarray:
    """Triangular mel weights, shape (n_fft//2 + 1, n_mels), as Kaldi builds them.

    Kaldi leaves the Nyquist bin out of every filter; its row stays zero.
    """
    n_bins = n_fft // 2
    mel_low, mel_high = _mel(np.array(low_hz)), _mel(np.array(sample_rate / 2))
    delta = (mel_high - mel_low) / (n_mels + 1)
    bin_mel = _mel(np.arange(n_bins) * sample_rate / n_fft)
    left = mel_low + np.arange(n_mels) * delta
    center, right = left + delta, left + 2 * delta
    up = (bin_mel[:, None] - left) / (center - left)
    down = (right - bin_mel[:, None]) / (right - center)
    inside = (bin_mel[:, None] > left) & (bin_mel[:, None] < right)
    weights = np.where(inside, np.where(bin_mel[:, None] <= center, up, down), 0.0)
    return np.vstack([weights, np.zeros((1, n_mels))]).astype(np.float32)


class Fbank:
    """Kaldi log-mel fbank of independent 25 ms frames (snip_edges, no dither).

    Runs in torch rather than numpy: numpy's matmul goes to a BLAS thread pool
    that spins after each call, which on a one-core replica steals the time the
    encoder needs; torch keeps to the caller's thread budget.
    """

    def __init__(self) -> None:
        n = np.arange(FRAME_LEN)
        window = 0.54 - 0.46 * np.cos(2 * np.pi * n / (FRAME_LEN - 1))
        self._window = torch.from_numpy(window.astype(np.float32))
        self._mel = torch.from_numpy(kaldi_mel_matrix())

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """``frames``: (F, 400) float32 samples in [-1, 1). Returns (F, 80) float32."""
        if frames.shape[0] == 0:
            return _EMPTY_ROWS
        return self.of(torch.from_numpy(frames))

    def of(self, frames: torch.Tensor) -> np.ndarray:
        """``frames``: (..., 400), any strides (overlapping windows of one buffer,
        say). Returns (F, 80) float32, F the frames in row-major order."""
        frames = frames.reshape(-1, FRAME_LEN)
        out = torch.empty(frames.shape[0], N_MELS)
        # A few hundred frames at a time, each step's arrays in one reused
        # buffer padded to the FFT size: the spectra of a whole tick at once
        # were ~7 kB of working memory per frame (13 MB for 300 streams).
        padded = torch.zeros(min(frames.shape[0], _FBANK_BLOCK), N_FFT)
        for lo in range(0, frames.shape[0], _FBANK_BLOCK):
            block = frames[lo : lo + _FBANK_BLOCK]
            self._log_mel(block, padded[: block.shape[0]], out[lo : lo + block.shape[0]])
        return out.numpy()

    def _log_mel(self, frames: torch.Tensor, padded: torch.Tensor, out: torch.Tensor) -> None:
        # funasr scales to the int16 range before Kaldi's fbank. The product
        # is the first copy, so a strided view of the audio is read only once.
        x = frames * 32768.0
        x -= x.mean(dim=1, keepdim=True)
        emphasised = padded[:, :FRAME_LEN]
        torch.mul(x[:, :-1], PREEMPH, out=emphasised[:, 1:])
        torch.sub(x[:, 1:], emphasised[:, 1:], out=emphasised[:, 1:])
        torch.mul(x[:, 0], 1.0 - PREEMPH, out=emphasised[:, 0])
        emphasised *= self._window
        spectrum = torch.fft.rfft(padded, dim=1)
        power = spectrum.real.square()
        power += spectrum.imag.square()
        torch.matmul(power, self._mel, out=out)
        torch.log_(torch.clamp_min_(out, _FLT_EPS))


@dataclass
class FeatureState:
    """What one stream carries between calls."""

    pending: np.ndarray = field(default_factory=lambda: _EMPTY_SAMPLES)
    # Last spliced fbank rows (up to LFR_M - 1), left context included.
    context: np.ndarray = field(default_factory=lambda: _EMPTY_ROWS)


class OnlineLfrFrontend:
    def __init__(self, cmvn_file: Path) -> None:
        shift, scale = load_cmvn(cmvn_file)
        if shift.size != N_MELS * LFR_M or scale.size != N_MELS * LFR_M:
            raise ValueError(f"{cmvn_file}: expected {N_MELS * LFR_M}-dim CMVN vectors")
        self._shift, self._scale = shift, scale
        self._shift_rows = shift.reshape(LFR_M, N_MELS)
        self._fbank = Fbank()

    def extract(
        self, states: list[FeatureState], chunks: list[np.ndarray], final: list[bool]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance each stream by its chunk; returns (LFR+CMVN rows of all streams in
        order, shape (L, 400) float32, and the number of rows of each stream)."""
        if _in_step(states, chunks, final):
            return self._extract_in_step(states, chunks)
        n = len(states)
        bufs: list[np.ndarray] = []
        n_frames = np.zeros(n, dtype=np.int64)
        for i, (state, chunk) in enumerate(zip(states, chunks, strict=True)):
            buf = np.concatenate([state.pending, chunk]) if state.pending.size else chunk
            frames = (buf.size - FRAME_LEN) // FRAME_SHIFT + 1 if buf.size >= FRAME_LEN else 0
            n_frames[i] = frames
            state.pending = buf[frames * FRAME_SHIFT :].copy()
            bufs.append(buf)
        fbank = self._fbank(_frames_of(bufs, n_frames))

        pieces: list[np.ndarray] = []
        n_out = np.zeros(n, dtype=np.int64)
        at = 0
        for i, state in enumerate(states):
            new = fbank[at : at + n_frames[i]]
            at += n_frames[i]
            if new.shape[0] and state.context.shape[0] == 0:
                state.context = np.repeat(new[:1], LFR_CONTEXT, axis=0)
            if not new.shape[0] and not final[i]:
                pieces.append(_EMPTY_ROWS)
                continue
            spliced = np.concatenate([state.context, new]) if new.shape[0] else state.context
            rows = spliced.shape[0]
            if final[i]:
                # Every frame still waiting gets its LFR row; the last frame
                # repeats as right context.
                n_out[i] = max(rows - LFR_CONTEXT, 0)
                if rows:
                    spliced = np.concatenate([spliced, np.repeat(spliced[-1:], LFR_CONTEXT, 0)])
                state.context = _EMPTY_ROWS
            else:
                n_out[i] = max(rows - (LFR_M - 1), 0)
                state.context = spliced[max(rows - (LFR_M - 1), 0) :].copy()
            pieces.append(spliced)
        return self._splice(pieces, n_out), n_out

    def extract_even(
        self, states: list[FeatureState], chunks: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``extract`` for streams that share one ``even_key``: the same rows as the
        general path, from whole-batch arrays instead of a dozen small numpy
        calls per stream."""
        return self._extract_in_step(states, chunks)

    def _extract_in_step(
        self, states: list[FeatureState], chunks: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``extract`` for the usual tick, where every stream is past its start and
        brings as much audio as the others, with as much left over from before
        (``_in_step``): the same rows as the general path, from whole-batch
        arrays instead of a dozen small numpy calls per stream."""
        n = len(states)
        held = states[0].pending.size
        buf = np.empty((n, held + chunks[0].size), dtype=np.float32)
        if held:
            buf[:, :held] = np.stack([state.pending for state in states])
        buf[:, held:] = np.stack(chunks)
        frames = (buf.shape[1] - FRAME_LEN) // FRAME_SHIFT + 1
        # (n, frames, 400): every stream's 25 ms windows, a view of ``buf``.
        fbank = self._fbank.of(torch.from_numpy(buf).unfold(1, FRAME_LEN, FRAME_SHIFT))
        context = np.stack([state.context for state in states])
        spliced = np.concatenate([context, fbank.reshape(n, frames, N_MELS)], axis=1)
        # Row j of a stream is its spliced rows j .. j + LFR_M - 1, side by side;
        # adding the shift makes the one copy of that view.
        lfr = np.lib.stride_tricks.sliding_window_view(spliced, LFR_M, axis=1)[:, :frames]
        rows = np.add(lfr.transpose(0, 1, 3, 2), self._shift_rows)
        rows = rows.reshape(n * frames, N_MELS * LFR_M)
        rows *= self._scale
        # Views of one array each; never written in place, so they can be shared.
        pending = buf[:, frames * FRAME_SHIFT :].copy()
        kept = spliced[:, frames:].copy()
        for i, state in enumerate(states):
            state.pending = pending[i]
            state.context = kept[i]
        return rows, np.full(n, frames, dtype=np.int64)

    def _splice(self, pieces: list[np.ndarray], n_out: np.ndarray) -> np.ndarray:
        total = int(n_out.sum())
        if total == 0:
            return np.zeros((0, N_MELS * LFR_M), dtype=np.float32)
        rows = np.concatenate(pieces)
        sizes = np.array([p.shape[0] for p in pieces], dtype=np.int64)
        base = np.repeat(np.cumsum(sizes) - sizes, n_out)
        local = np.arange(total) - np.repeat(np.cumsum(n_out) - n_out, n_out)
        index = (base + local)[:, None] + np.arange(LFR_M)
        lfr = rows[index].reshape(total, N_MELS * LFR_M)
        lfr += self._shift
        lfr *= self._scale
        return lfr


def even_key(state: FeatureState, chunk: np.ndarray, final: bool) -> tuple[int, int] | None:
    """Streams with the same key can take ``extract_even`` together: begun (left
    context full), not ending, and bringing the same new samples to the same
    held over. None for a stream only the general path can take."""
    held = state.pending.size
    if final or held + chunk.size < FRAME_LEN or state.context.shape[0] != LFR_M - 1:
        return None
    return held, chunk.size


def _in_step(states: list[FeatureState], chunks: list[np.ndarray], final: list[bool]) -> bool:
    """Every stream has begun (its left context is full), none ends, and all bring
    the same number of new samples to the same number held over."""
    if not states or any(final):
        return False
    size, held = chunks[0].size, states[0].pending.size
    if held + size < FRAME_LEN:
        return False
    return (
        all(chunk.size == size for chunk in chunks)
        and all(state.pending.size == held for state in states)
        and all(state.context.shape[0] == LFR_M - 1 for state in states)
    )


def _frames_of(bufs: list[np.ndarray], n_frames: np.ndarray) -> np.ndarray:
    """All 25 ms frames of all buffers, in buffer order, as one (F, 400) array."""
    total = int(n_frames.sum())
    if total == 0:
        return np.zeros((0, FRAME_LEN), dtype=np.float32)
    sizes = np.array([b.size for b in bufs], dtype=np.int64)
    joined = np.concatenate(bufs)
    base = np.repeat(np.cumsum(sizes) - sizes, n_frames)
    local = np.arange(total) - np.repeat(np.cumsum(n_frames) - n_frames, n_frames)
    starts = base + local * FRAME_SHIFT
    return joined[starts[:, None] + np.arange(FRAME_LEN)]
