"""Character error rate, for languages written without spaces between words."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from support.wer import edit_distance


def characters(text: str) -> list[str]:
    """The letters and digits of ``text``: punctuation (。，！ and ASCII) and spaces dropped."""
    return [c for c in text if unicodedata.category(c)[0] in "LN"]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER: total character edits over total reference characters."""
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    errors = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_chars = characters(ref)
        errors += edit_distance(ref_chars, characters(hyp))
        total += len(ref_chars)
    if total == 0:
        raise ValueError("no reference characters")
    return errors / total
