"""What a VAD tick hands the inference thread, and what that thread does with it.

The event loop (``services.vad.streams``) records opens and closes and
collects each stream's new audio; ``apply_then_step`` runs on the inference
thread, the only one that touches the engine (see ``VadEngine``): the
changes in the order they were asked for, then every stream with work.

A tick's memory is bounded by ``chunk_audio_s``, not by how many streams it
steps: the engine is called once per group of streams whose new audio adds
up to about that much, each group going end to end (features, encoder,
detector) before the next, so a tick after a stall, when every stream
brings up to ``max_step_s``, costs a few groups' working memory, not a
thousand streams' at once. Pending audio waits as 16-bit samples and becomes
float only inside its group, on the inference thread.

The liveness check asks ``TimedInference`` whether the call now running
has hung.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from services.common.inference import InferenceThread
from services.common.memory import HeapTrimmer
from services.vad.engine import VadEngine, VadEvent

T = TypeVar("T")


@dataclass(frozen=True)
class Open:
    engine_id: str
    silence_ms: int


@dataclass(frozen=True)
class Close:
    engine_id: str


Change = Open | Close


@dataclass(frozen=True)
class Work:
    """One stream's share of a tick: its new audio (16-bit) and whether it ends."""

    engine_id: str
    pieces: list[np.ndarray]
    samples: int
    final: bool


# What a tick reports to the heap trimmer as freed: the working memory of an
# FSMN-VAD step per sample of new audio (frames, spectra, LFR rows, encoder
# activations; measured at ~1 MB per second of audio), and the state of a
# closed stream (its ~39 kB of float32 encoder memory, half in bfloat16,
# once the engine shrinks).
_WORK_BYTES_PER_SAMPLE = 64
_STREAM_BYTES = 40_000


def _groups(work: list[Work], chunk_samples: int) -> list[list[Work]]:
    """Consecutive runs of streams whose new audio adds up to ``chunk_samples`` at most
    (a single stream over it goes alone), as even as the streams allow: a
    group of a few streams left over would pay a whole engine call's fixed
    cost (measured: 2 ms a call, so 34 streams stepped alone cost twice as
    much per stream as 300 together)."""
    total = sum(item.samples for item in work)
    calls = max(1, -(-total // chunk_samples))
    share = -(-total // calls)
    groups: list[list[Work]] = []
    group: list[Work] = []
    size = 0
    for item in work:
        if group and size + item.samples > share:
            groups.append(group)
            group, size = [], 0
        group.append(item)
        size += item.samples
    if group:
        groups.append(group)
    return groups


def take(pending: list[np.ndarray], samples: int) -> list[np.ndarray]:
    """The first ``samples`` of ``pending`` (which holds more), taken off it in order.

    A stream that fell behind catches up over several ticks instead of in
    one huge step. The pieces are handed over as they are (no copy on the
    event loop); the group they are stepped in joins them.
    """
    taken = []
    room = samples
    while pending and room > 0:
        piece = pending[0]
        if piece.size <= room:
            taken.append(pending.pop(0))
            room -= piece.size
        else:
            taken.append(piece[:room])
            pending[0] = piece[room:]
            room = 0
    return taken


def _as_float(group: list[Work]) -> dict[str, np.ndarray]:
    """Each stream's new audio as float, converted for the whole group at once:
    one join and one scaling instead of three numpy calls per stream."""
    pieces = [piece for w in group for piece in w.pieces]
    if not pieces:
        return {}
    joined = np.concatenate(pieces).astype(np.float32)
    joined *= 1.0 / 32768.0
    chunks: dict[str, np.ndarray] = {}
    offset = 0
    for w in group:
        if w.pieces:
            chunks[w.engine_id] = joined[offset : offset + w.samples]
            offset += w.samples
    return chunks


def apply_then_step(
    engine: VadEngine,
    changes: list[Change],
    work: list[Work],
    chunk_samples: int,
    trimmer: HeapTrimmer,
) -> list[VadEvent]:
    """Runs on the inference thread: the opens and closes asked for since the
    previous tick, in order, then every stream with work, one group of
    streams per engine step (see the module docstring)."""
    for change in changes:
        if isinstance(change, Open):
            engine.open(change.engine_id, change.silence_ms)
        else:
            engine.close(change.engine_id)
            trimmer.released(_STREAM_BYTES)
    events: list[VadEvent] = []
    for group in _groups(work, chunk_samples):
        chunks = _as_float(group)
        final = [w.engine_id for w in group if w.final]
        events += engine.step(chunks, final)
    trimmer.released(sum(w.samples for w in work) * _WORK_BYTES_PER_SAMPLE)
    trimmer.maybe_trim()
    return events


# A step is taken for a hung inference thread (the liveness check) once it
# has run STUCK_FACTOR times what its audio usually costs, and at least
# STUCK_FLOOR_S: the batched services' rule (services.common.batching), with
# the usual cost scaled by the audio the step was handed, because a
# catch-up tick after a stall (every stream bringing up to ``max_step_s``)
# legitimately runs thousands of times longer than a 60 ms one. The floor
# covers a replica that has not timed a step yet and pauses no step size
# explains (a heap trim, a swap-in); a real 60 ms tick steps in milliseconds.
STUCK_FACTOR = 20.0
STUCK_FLOOR_S = 60.0
# Weight of the newest step in the running mean of cost per audio second.
_COST_SMOOTHING = 0.2


class TimedInference:
    """The inference thread as the tick loop calls it: each call timed, so a
    call that does not come back can be told from a long one."""

    def __init__(self, thread: InferenceThread) -> None:
        self._thread = thread
        # The call now running (when it began, the audio it was handed in
        # seconds) and what a second of audio usually costs.
        self._call_started: float | None = None
        self._call_audio_s = 0.0
        self._cost_per_audio_s: float | None = None

    def call_running_for(self) -> float:
        """Seconds the inference call now running has taken so far (0 between calls)."""
        started = self._call_started
        return 0.0 if started is None else time.monotonic() - started

    def stuck(self, floor_s: float = STUCK_FLOOR_S) -> bool:
        """The inference thread has not come back from a tick's call for far longer
        than that call's audio usually takes (see ``STUCK_FACTOR``)."""
        usual = self._call_audio_s * (self._cost_per_audio_s or 0.0)
        return self.call_running_for() > max(floor_s, STUCK_FACTOR * usual)

    async def run(self, audio_s: float, fn: Callable[[], T]) -> T:
        """``fn()`` on the inference thread, timed; ``audio_s``: the audio it steps."""
        self._call_audio_s = audio_s
        self._call_started = started = time.monotonic()
        try:
            result = await self._thread.run(fn)
        finally:
            self._call_started = None
        if audio_s > 0:
            cost = (time.monotonic() - started) / audio_s
            mean = self._cost_per_audio_s
            self._cost_per_audio_s = (
                cost if mean is None else mean + _COST_SMOOTHING * (cost - mean)
            )
        return result
