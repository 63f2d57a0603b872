"""Word error rate for checking transcripts against the text that was spoken."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize(text: str) -> list[str]:
    """Lower-case words; punctuation and hyphens count as word breaks."""
    return _NON_WORD.sub(" ", text.lower().replace("-", " ")).split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions, deletions)."""
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i]
        for j, hyp_word in enumerate(hyp, start=1):
            current.append(
                min(
                    previous[j] + 1,
                    current[j - 1] + 1,
                    previous[j - 1] + (ref_word != hyp_word),
                )
            )
        previous = current
    return previous[-1]


def corpus_error_rate(
    references: Sequence[str], hypotheses: Sequence[str], tokens: Callable[[str], list[str]]
) -> float:
    """Total token edits over total reference tokens, ``tokens`` splitting a text."""
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    errors = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_tokens = tokens(ref)
        errors += edit_distance(ref_tokens, tokens(hyp))
        total += len(ref_tokens)
    if total == 0:
        raise ValueError("no reference tokens")
    return errors / total


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: total word edits over total reference words."""
    return corpus_error_rate(references, hypotheses, normalize)
