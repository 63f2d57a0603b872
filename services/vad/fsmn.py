"""FSMN-VAD (the production VAD model) through funasr's streaming inference.

funasr's streaming ``generate()`` asserts a batch of one, so this engine
advances each stream with its own detector cache, but with all the audio the
stream gathered since the previous tick in a single call: the per-call
overhead is paid once per tick instead of once per 60 ms frame, and the
boundaries are identical to feeding it frame by frame (the detector decides
per 10 ms feature frame in audio time whatever the chunking).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.common.audio import SAMPLE_RATE
from services.vad.engine import VadEvent

log = logging.getLogger(__name__)


@dataclass
class _FsmnStream:
    silence_ms: int
    cache: dict[str, Any] = field(default_factory=dict)
    consumed: int = 0
    in_speech: bool = False


class FsmnVadEngine:
    """Not thread-safe, by design: only the inference thread calls it (see ``VadEngine``).

    funasr's model is not thread-safe, and ``generate`` rewrites each stream's
    cache in place.
    """

    name = "fsmn-stream"

    def __init__(self, model_dir: Path | str, device: str = "cpu") -> None:
        from funasr import AutoModel  # heavy import, only when this engine is chosen

        self._model = AutoModel(
            model=str(model_dir), disable_update=True, device=device, disable_pbar=True
        )
        self._streams: dict[str, _FsmnStream] = {}

    def open(self, stream_id: str, silence_ms: int) -> None:
        self._streams[stream_id] = _FsmnStream(silence_ms=silence_ms)

    def close(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)

    def step(self, chunks: Mapping[str, np.ndarray], final: Collection[str]) -> list[VadEvent]:
        events: list[VadEvent] = []
        for stream_id in dict.fromkeys([*chunks, *final]):
            stream = self._streams.get(stream_id)
            if stream is None:
                continue
            samples = chunks.get(stream_id, np.zeros(0, dtype=np.float32))
            events.extend(self._advance(stream_id, stream, samples, stream_id in final))
        return events

    def _advance(
        self, stream_id: str, stream: _FsmnStream, samples: np.ndarray, is_final: bool
    ) -> list[VadEvent]:
        stream.consumed += samples.size
        if samples.size == 0 and not is_final:
            return []
        if samples.size == 0:
            # funasr returns early on empty input without flushing; one silent
            # sample lets the final call run its end-of-stream logic.
            samples = np.zeros(1, dtype=np.float32)
        # A stride equal to the chunk makes funasr process all of it now
        # rather than hold a remainder back until the next call.
        chunk_ms = samples.size * 1000 / SAMPLE_RATE
        result = self._model.generate(
            input=samples,
            cache=stream.cache,
            is_final=is_final,
            chunk_size=chunk_ms,
            max_end_silence_time=stream.silence_ms,
            disable_pbar=True,
        )
        events: list[VadEvent] = []
        for start_ms, end_ms in result[0]["value"] if result else []:
            if start_ms >= 0 and not stream.in_speech:
                events.append(VadEvent(stream_id, "start", int(start_ms)))
                stream.in_speech = True
            if end_ms >= 0 and stream.in_speech:
                events.append(VadEvent(stream_id, "end", int(end_ms)))
                stream.in_speech = False
        if is_final and stream.in_speech:
            events.append(VadEvent(stream_id, "end", stream.consumed * 1000 // SAMPLE_RATE))
            stream.in_speech = False
        return events
