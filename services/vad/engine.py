"""The interface every VAD engine implements.

Engines are batch-shaped: one ``step`` advances every stream that has new
audio. All times are audio time, counted in samples from the stream's origin,
so a slow tick never moves an utterance boundary.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np


@dataclass(frozen=True)
class VadEvent:
    stream_id: str
    kind: Literal["start", "end"]
    # Audio time from the stream origin, in ms.
    offset_ms: int


class VadEngine(Protocol):
    """A batch of live streams' detector state, and the model that advances it.

    Threading rule: every method (``open``, ``close`` and ``step`` alike) is
    called only from the engine's own thread, the process's inference thread
    (``services.common.inference``), one call at a time, never concurrently
    with another. The engine is built there too. Why: engines keep per-stream
    state in shared, slot-indexed arrays that a ``step`` reads and writes
    throughout, reuse the slot of a closed stream for the next open, and may
    replace those arrays when they grow; the models behind them are not
    thread-safe either. An ``open`` or ``close`` racing a ``step`` would hand
    a new stream the state that step is still writing for the stream that
    was closed (phantom speech) or lose the step's writes to the old arrays.
    Engines therefore do no locking of their own: callers queue opens and
    closes and run them on the inference thread just before a step (see
    ``services.vad.streams``).
    """

    name: str

    def open(self, stream_id: str, silence_ms: int) -> None:
        """Start a stream with fresh detector state and the given end-of-speech window."""
        ...

    def close(self, stream_id: str) -> None:
        """Forget a stream's state. Unknown ids are ignored."""
        ...

    def step(self, chunks: Mapping[str, np.ndarray], final: Collection[str]) -> list[VadEvent]:
        """Advance every stream in ``chunks`` by its new 16 kHz float32 samples.

        Streams named in ``final`` have no more audio: speech in progress ends
        at their last sample (an ``end`` event). Events come back in audio-time
        order per stream.
        """
        ...
