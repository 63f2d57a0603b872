"""funasr's own streaming FSMN-VAD: the reference our VAD boundaries are held to."""

from __future__ import annotations

from typing import Any

import numpy as np

from services.common.config import DEFAULT_MODELS_DIR

SILENCE_MS = 500
CHUNK = 960  # 60 ms, as devices send

Events = list[tuple[str, int]]


def load_funasr_fsmn() -> Any:
    from funasr import AutoModel

    return AutoModel(
        model=str(DEFAULT_MODELS_DIR / "fsmn-vad"), disable_update=True, disable_pbar=True
    )


def funasr_events(model: Any, audio: np.ndarray) -> Events:
    """Speech start/end offsets (ms) from feeding ``audio`` to funasr in 60 ms chunks."""
    cache: dict[str, Any] = {}
    events: Events = []
    for at in range(0, audio.size, CHUNK):
        result = model.generate(
            input=audio[at : at + CHUNK],
            cache=cache,
            is_final=at + CHUNK >= audio.size,
            chunk_size=60,
            max_end_silence_time=SILENCE_MS,
            disable_pbar=True,
        )
        for start, end in result[0]["value"] if result else []:
            if start >= 0:
                events.append(("start", int(start)))
            if end >= 0:
                events.append(("end", int(end)))
    return events
