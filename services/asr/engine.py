"""The interface every ASR engine implements: a batch of utterances in, texts out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class AsrRequest:
    # 16 kHz mono float32 in [-1, 1).
    audio: np.ndarray
    # "auto" or a language code; requests in one batch share it (and use_itn).
    language: str = "auto"
    use_itn: bool = True


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str = ""
    emotion: str = ""
    event: str = ""
    # What the model emitted before tags were turned into fields.
    raw_text: str = ""


class AsrEngine(Protocol):
    name: str

    def transcribe(self, batch: Sequence[AsrRequest]) -> list[Transcript]:
        """Recognise every request; all share one language/ITN option (the batcher groups them)."""
        ...
