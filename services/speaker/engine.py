"""The interface every speaker-embedding engine implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class SpeakerEngine(Protocol):
    # Names the embedding space; voiceprints from another model never compare.
    name: str
    dim: int

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Embed 16 kHz mono float32 utterances: shape (len(batch), dim), each row L2-normalised."""
        ...
