"""FSMN-VAD end-point detection for many streams, vectorised across streams.

The spec is funasr's ``FsmnVADStreaming`` in multiple-utterance mode with
``do_extend`` on, reduced to what decides event offsets:

* a frame is speech when ``exp(log(1 - p_sil)) >= exp(log(p_sil) * ratio) +
  speech_noise_thres`` (the decibel and SNR gates are configured at -100 dB,
  which a float waveform can never fall below, so they are left out);
* a sliding window of ``window_size_ms`` counts speech frames: silence turns
  to speech at ``>= sil_to_speech`` frames in it, speech to silence at
  ``<= speech_to_sil``;
* on silence -> speech outside a segment the segment starts at
  ``max(previous end frame + 1, frame - window - lookback_start)``;
* inside a segment, consecutive silence -> silence frames count up; once the
  count in ms reaches ``silence_ms - speech_to_sil_time`` the segment ends
  ``lookback`` frames back (the pinned end-silence window, no dynamic
  schedule); a segment longer than ``max_single_segment_time`` ends at the
  current frame, and so does any segment on the stream's last frame;
* after an end the window and counters reset (the frame clock does not).

Start offsets are ``start_frame * 10`` ms and end offsets ``(end_frame + 1) *
10`` ms, as funasr reports them. Per-stream state lives in slot-indexed
arrays; one call walks the new frames in lock-step across all streams, and
only the rare start/end frames fall back to per-row work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FRAME_MS = 10


@dataclass(frozen=True)
class EndpointConfig:
    window_frames: int = 20
    sil_to_speech_frames: int = 15
    speech_to_sil_frames: int = 15
    speech_to_sil_ms: int = 150
    start_latency_frames: int = 40
    lookahead_end_frames: int = 10
    max_segment_frames: float = 6000.0
    speech_noise_thres: float = 0.6
    speech_2_noise_ratio: float = 1.0

    @classmethod
    def from_model_conf(cls, conf: dict[str, Any]) -> EndpointConfig:
        frame = int(conf.get("frame_in_ms", FRAME_MS))
        if frame != FRAME_MS:
            raise ValueError(f"FSMN-VAD frame shift must be {FRAME_MS} ms, got {frame}")
        if int(conf.get("detect_mode", 1)) != 1 or not int(conf.get("do_extend", 1)):
            raise ValueError("only multiple-utterance mode with do_extend is implemented")
        window = int(conf["window_size_ms"] / frame)
        return cls(
            window_frames=window,
            sil_to_speech_frames=int(conf["sil_to_speech_time_thres"] / frame),
            speech_to_sil_frames=int(conf["speech_to_sil_time_thres"] / frame),
            speech_to_sil_ms=int(conf["speech_to_sil_time_thres"]),
            start_latency_frames=window + int(conf["lookback_time_start_point"] / frame),
            lookahead_end_frames=int(conf["lookahead_time_end_point"] / frame),
            max_segment_frames=conf["max_single_segment_time"] / frame,
            speech_noise_thres=float(conf["speech_noise_thres"]),
            speech_2_noise_ratio=float(conf["speech_2_noise_ratio"]),
        )


# The detector's arrays with a row per slot: all of a stream's state.
SLOT_STATE = ("_win", "_ints", "_bools", "_end_thresh_ms", "_lookback")

# (row in the batch, is_start, offset in ms from the stream's origin)
Boundary = tuple[int, bool, int]


class EndpointDetector:
    def __init__(self, config: EndpointConfig, capacity: int = 0) -> None:
        self.config = config
        self._capacity = 0
        self._win = np.zeros((0, config.window_frames), dtype=np.int64)
        self._ints = np.zeros((0, len(_INT_FIELDS)), dtype=np.int64)
        self._bools = np.zeros((0, 2), dtype=bool)  # previous window state, in segment
        self._end_thresh_ms = np.zeros(0, dtype=np.float64)
        self._lookback = np.zeros(0, dtype=np.int64)
        self.ensure_capacity(capacity)

    def ensure_capacity(self, capacity: int) -> None:
        if capacity <= self._capacity:
            return
        grow = capacity - self._capacity
        for name in SLOT_STATE:
            array = getattr(self, name)
            more = np.zeros((grow, *array.shape[1:]), dtype=array.dtype)
            setattr(self, name, np.concatenate([array, more]))
        self._capacity = capacity

    def compact(self, live: int, capacity: int) -> None:
        """Keep the state of the first ``live`` slots, in arrays of ``capacity``
        rows (the rest zero)."""
        for name in SLOT_STATE:
            array = getattr(self, name)
            kept = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
            kept[:live] = array[:live]
            setattr(self, name, kept)
        self._capacity = capacity

    def reset(self, slot: int, silence_ms: int) -> None:
        self._win[slot] = 0
        self._ints[slot] = 0
        self._bools[slot] = False
        # funasr keeps speech_to_sil_time out of the end-silence count.
        thresh = silence_ms - self.config.speech_to_sil_ms
        self._end_thresh_ms[slot] = thresh
        self._lookback[slot] = max(0, int(thresh / FRAME_MS) - self.config.lookahead_end_frames - 1)

    def move(self, source: int, target: int) -> None:
        """Slot ``target`` takes ``source``'s state."""
        for name in SLOT_STATE:
            array = getattr(self, name)
            array[target] = array[source]

    def in_segment(self, slot: int) -> bool:
        return bool(self._bools[slot, 1])

    def is_speech(self, p_sil: np.ndarray) -> np.ndarray:
        """Per-frame speech decision from the silence posterior, in float64 like funasr."""
        p = p_sil.astype(np.float64)
        with np.errstate(divide="ignore"):
            speech = np.exp(np.log(1.0 - p))
            noise = np.exp(np.log(p) * self.config.speech_2_noise_ratio)
        return speech >= noise + self.config.speech_noise_thres

    def advance(
        self, slots: np.ndarray, speech: np.ndarray, counts: np.ndarray, final: np.ndarray
    ) -> list[Boundary]:
        """Run ``counts[b]`` new frames ``speech[b, :counts[b]]`` through slot ``slots[b]``.

        ``final[b]`` marks the last of them as the stream's last frame. Returns
        boundaries in frame order (so in audio-time order per stream).
        """
        cfg = self.config
        n = slots.size
        rows = np.arange(n)
        win = self._win[slots]
        ints = self._ints[slots]
        pos, win_sum, frames, sil_cnt, seg_start, floor = (ints[:, k].copy() for k in range(6))
        pre_speech = self._bools[slots, 0].copy()
        in_seg = self._bools[slots, 1].copy()
        end_thresh = self._end_thresh_ms[slots]
        lookback = self._lookback[slots]
        last_k = np.where(final, counts - 1, -1)
        frame_speech = speech.astype(np.int64)
        out: list[Boundary] = []

        for k in range(int(counts.max(initial=0))):
            act = counts > k
            cur = frames + k
            old = win[rows, pos]
            new = np.where(act, frame_speech[:, k], old)
            win_sum += new - old
            win[rows, pos] = new
            pos = (pos + act) % cfg.window_frames
            to_speech = act & ~pre_speech & (win_sum >= cfg.sil_to_speech_frames)
            to_sil = act & pre_speech & (win_sum <= cfg.speech_to_sil_frames)
            sil_to_sil = act & ~pre_speech & ~to_speech
            pre_speech = (pre_speech | to_speech) & ~to_sil
            sil_cnt = np.where(sil_to_sil, sil_cnt + 1, np.where(act, 0, sil_cnt))

            seg = act & in_seg
            end_sil = seg & sil_to_sil & (sil_cnt * FRAME_MS >= end_thresh)
            too_long = seg & ~end_sil & (cur - seg_start + 1 > cfg.max_segment_frames)
            ends = end_sil | too_long | (seg & (last_k == k))
            starts = act & ~in_seg & to_speech
            if ends.any():
                hit = np.flatnonzero(ends)
                end_frame = np.where(end_sil[hit], cur[hit] - lookback[hit], cur[hit])
                out.extend(
                    (int(r), False, int(e + 1) * FRAME_MS)
                    for r, e in zip(hit, end_frame, strict=True)
                )
                win[hit] = 0
                win_sum[hit] = 0
                pos[hit] = 0
                pre_speech[hit] = False
                in_seg[hit] = False
                sil_cnt[hit] = 0
                floor[hit] = end_frame + 1
            if starts.any():
                hit = np.flatnonzero(starts)
                start_frame = np.maximum(floor[hit], cur[hit] - cfg.start_latency_frames)
                out.extend(
                    (int(r), True, int(s) * FRAME_MS) for r, s in zip(hit, start_frame, strict=True)
                )
                in_seg[hit] = True
                sil_cnt[hit] = 0
                seg_start[hit] = start_frame

        frames += counts
        self._win[slots] = win
        self._ints[slots] = np.stack([pos, win_sum, frames, sil_cnt, seg_start, floor], axis=1)
        self._bools[slots, 0] = pre_speech
        self._bools[slots, 1] = in_seg
        return out


_INT_FIELDS = ("pos", "win_sum", "frames", "sil_cnt", "seg_start", "floor")
