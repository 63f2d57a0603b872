"""Texts of FunASR results: SenseVoice's tags, and the new words of a partial."""

from __future__ import annotations

import re

from services.protos import asr_pb2

# A CJK character is a word of its own; anything else runs to the next space.
_CJK = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+\\s*")
_NOT_WORD = re.compile(r"[^\w]+")


def tagged(asr: asr_pb2.RecognizeResponse, itn: bool) -> str:
    """The text as a FunASR server running SenseVoice returns it:
    ``<|lang|><|EMOTION|><|Event|><|withitn|>text``.

    Engines without emotion or event tags (Whisper) report them as unknown and
    as speech, so a client parsing the tags by position still finds each one.
    """
    language = asr.language or "auto"
    emotion = asr.emotion or "EMO_UNKNOWN"
    event = asr.event or "Speech"
    norm = "withitn" if itn else "woitn"
    return f"<|{language}|><|{emotion}|><|{event}|><|{norm}|>{asr.text}"


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.strip())


def _same(a: str, b: str) -> bool:
    """Equal words, case and punctuation aside (a partial cut mid-sentence ends
    a word with a full stop that the next partial drops)."""
    return _NOT_WORD.sub("", a.lower()) == _NOT_WORD.sub("", b.lower())


class PartialText:
    """The words of one segment already sent as partials, which clients append.

    A word is sent once two successive re-recognitions agree on it (and on
    everything before it): re-recognising a growing segment revises its last
    words, and a client cannot take back what it has appended.
    """

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._previous: list[str] = []

    def update(self, text: str) -> str:
        """New words to send for this re-recognition ("" for none)."""
        current = tokens(text)
        agreed = 0
        for a, b in zip(self._previous, current, strict=False):
            if not _same(a, b):
                break
            agreed += 1
        self._previous = current
        if agreed <= len(self.sent):
            return ""
        new = current[len(self.sent) : agreed]
        self.sent.extend(new)
        return "".join(new)

    def rest(self, text: str) -> str:
        """What the segment's full text adds to the words already sent."""
        return "".join(tokens(text)[len(self.sent) :])
