"""Character error rate, for languages written without spaces between words."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from support.wer import corpus_error_rate


def characters(text: str) -> list[str]:
    """The letters and digits of ``text``: punctuation (。，！ and ASCII) and spaces dropped."""
    return [c for c in text if unicodedata.category(c)[0] in "LN"]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER: total character edits over total reference characters."""
    return corpus_error_rate(references, hypotheses, characters)
