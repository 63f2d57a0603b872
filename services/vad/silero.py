"""Silero VAD (ONNX) batched across streams, with an end-of-speech detector in audio time.

The model scores 32 ms windows (512 new samples, preceded by the previous 64
samples as context) and carries a recurrent state ``[2, batch, 128]``. Every
stream owns a slot in preallocated state/context arrays; one ``step`` gathers
the slots of all streams that still have a complete window, runs one ONNX call
for that batch, and scatters the new state back, repeating until every stream
has consumed all its complete windows. Leftover samples wait for the next step.

Detector per stream (all positions are sample counts from the stream origin):

* speech starts at a window with ``prob >= threshold``; the reported start is
  that window's start minus ``pad_ms`` (not below 0, and not before the
  previous end);
* a silence run starts at a window with ``prob < neg_threshold`` and is
  cancelled by any window with ``prob >= neg_threshold`` (probabilities between
  the two thresholds keep speech alive but never start it);
* speech ends once the silence run has lasted the stream's ``silence_ms``; the
  reported end is where the run began plus ``pad_ms``, capped at the samples
  consumed so far;
* ``min_speech_ms``: the ``start`` event is held back until the segment has
  been speech (no silence run in progress) for ``min_speech_ms`` of audio, so a
  shorter blip is dropped without any event. The cost is up to
  ``min_speech_ms`` of extra latency on the start event; its offset is still
  the true (padded) start.

``final`` streams: the leftover partial window is zero-padded and scored, then
speech in progress ends at the stream's last real sample (a segment still
shorter than ``min_speech_ms`` is dropped). The stream's detector and model
state are then reset; offsets keep counting from the same origin.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from services.common.audio import SAMPLE_RATE, ms_to_samples, samples_to_ms
from services.vad.engine import VadEvent

WINDOW = 512
CONTEXT = 64
STATE_DIM = 128
_EMPTY = np.zeros(0, dtype=np.float32)


@dataclass
class _Stream:
    slot: int
    silence_samples: int
    pending: np.ndarray = field(default_factory=lambda: _EMPTY)
    # Real samples scored so far (zero padding on flush never counts).
    consumed: int = 0
    in_speech: bool = False
    confirmed: bool = False
    speech_start: int = 0
    silence_start: int | None = None
    last_end: int = 0


class SileroVadEngine:
    """Not thread-safe, by design: only the inference thread calls it (see ``VadEngine``).

    ``open`` hands out the slot ``close`` freed last, and ``_grow`` replaces
    the state and context arrays a running ``step`` scatters into.
    """

    name = "silero"

    def __init__(
        self,
        model_path: Path,
        threshold: float = 0.5,
        neg_threshold: float = 0.35,
        min_speech_ms: int = 150,
        pad_ms: int = 30,
    ) -> None:
        if not 0.0 < neg_threshold <= threshold < 1.0:
            raise ValueError("need 0 < neg_threshold <= threshold < 1")
        opts = ort.SessionOptions()
        # Many engine processes share a host; one thread each scales by process count.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._threshold = threshold
        self._neg_threshold = neg_threshold
        self._min_speech = ms_to_samples(min_speech_ms)
        self._pad = ms_to_samples(pad_ms)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self._streams: dict[str, _Stream] = {}
        self._free: list[int] = []
        self._state = np.zeros((2, 0, STATE_DIM), dtype=np.float32)
        self._context = np.zeros((0, CONTEXT), dtype=np.float32)

    # -- stream bookkeeping -------------------------------------------------

    def open(self, stream_id: str, silence_ms: int) -> None:
        self.close(stream_id)
        slot = self._free.pop() if self._free else self._grow()
        self._reset_slot(slot)
        self._streams[stream_id] = _Stream(slot=slot, silence_samples=ms_to_samples(silence_ms))

    def close(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._free.append(stream.slot)

    def _grow(self) -> int:
        old = self._context.shape[0]
        new = max(8, old * 2)
        state = np.zeros((2, new, STATE_DIM), dtype=np.float32)
        state[:, :old] = self._state
        context = np.zeros((new, CONTEXT), dtype=np.float32)
        context[:old] = self._context
        self._state, self._context = state, context
        self._free.extend(range(new - 1, old, -1))
        return old

    def _reset_slot(self, slot: int) -> None:
        self._state[:, slot] = 0.0
        self._context[slot] = 0.0

    # -- inference ----------------------------------------------------------

    def step(self, chunks: Mapping[str, np.ndarray], final: Collection[str]) -> list[VadEvent]:
        ids = [sid for sid in dict.fromkeys([*chunks, *final]) if sid in self._streams]
        real_total: dict[str, int] = {}
        windows: dict[str, int] = {}
        for sid in ids:
            stream = self._streams[sid]
            new = np.asarray(chunks.get(sid, _EMPTY), dtype=np.float32).reshape(-1)
            if new.size:
                stream.pending = np.concatenate([stream.pending, new])
            real_total[sid] = stream.consumed + stream.pending.size
            if sid in final and stream.pending.size % WINDOW:
                pad = WINDOW - stream.pending.size % WINDOW
                stream.pending = np.concatenate([stream.pending, np.zeros(pad, np.float32)])
            windows[sid] = stream.pending.size // WINDOW

        per_stream: dict[str, list[VadEvent]] = {sid: [] for sid in ids}
        max_windows = max(windows.values(), default=0)
        for k in range(max_windows):
            active = [sid for sid in ids if windows[sid] > k]
            probs = self._score(active, k)
            for sid, prob in zip(active, probs, strict=True):
                stream = self._streams[sid]
                start = stream.consumed
                stream.consumed = min(start + WINDOW, real_total[sid])
                self._detect(sid, stream, float(prob), start, per_stream[sid])

        for sid in ids:
            stream = self._streams[sid]
            stream.pending = stream.pending[windows[sid] * WINDOW :]
            if sid in final:
                self._flush(sid, stream, per_stream[sid])
        return [event for sid in ids for event in per_stream[sid]]

    def _score(self, active: list[str], k: int) -> np.ndarray:
        slots = np.array([self._streams[sid].slot for sid in active], dtype=np.intp)
        frame = np.empty((len(active), CONTEXT + WINDOW), dtype=np.float32)
        frame[:, :CONTEXT] = self._context[slots]
        for row, sid in enumerate(active):
            frame[row, CONTEXT:] = self._streams[sid].pending[k * WINDOW : (k + 1) * WINDOW]
        out, state = self._session.run(
            None, {"input": frame, "state": self._state[:, slots], "sr": self._sr}
        )
        self._state[:, slots] = state
        self._context[slots] = frame[:, -CONTEXT:]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    # -- detector -----------------------------------------------------------

    def _detect(
        self, sid: str, stream: _Stream, prob: float, win_start: int, out: list[VadEvent]
    ) -> None:
        win_end = win_start + WINDOW
        if not stream.in_speech:
            if prob >= self._threshold:
                stream.in_speech = True
                stream.confirmed = False
                stream.speech_start = win_start
                stream.silence_start = None
                self._maybe_confirm(sid, stream, win_end, out)
            return
        if prob < self._neg_threshold:
            if stream.silence_start is None:
                stream.silence_start = win_start
            if win_end - stream.silence_start >= stream.silence_samples:
                end = min(stream.silence_start + self._pad, stream.consumed)
                self._end(sid, stream, end, out)
            return
        stream.silence_start = None
        self._maybe_confirm(sid, stream, win_end, out)

    def _maybe_confirm(self, sid: str, stream: _Stream, win_end: int, out: list[VadEvent]) -> None:
        if stream.confirmed or win_end - stream.speech_start < self._min_speech:
            return
        stream.confirmed = True
        offset = max(stream.speech_start - self._pad, stream.last_end, 0)
        out.append(self._event(sid, "start", offset))

    def _end(self, sid: str, stream: _Stream, end: int, out: list[VadEvent]) -> None:
        if stream.confirmed:
            out.append(self._event(sid, "end", end))
            stream.last_end = end
        stream.in_speech = False
        stream.confirmed = False
        stream.silence_start = None

    def _flush(self, sid: str, stream: _Stream, out: list[VadEvent]) -> None:
        if stream.in_speech:
            self._maybe_confirm(sid, stream, stream.consumed, out)
            self._end(sid, stream, stream.consumed, out)
        stream.pending = _EMPTY
        self._reset_slot(stream.slot)

    @staticmethod
    def _event(sid: str, kind: Literal["start", "end"], sample: int) -> VadEvent:
        return VadEvent(stream_id=sid, kind=kind, offset_ms=samples_to_ms(sample))
