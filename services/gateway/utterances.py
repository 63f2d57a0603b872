"""Cutting one session's audio into utterances.

Audio is addressed in samples from the first frame of the session (audio
time). The cutter holds the session's recent audio, decides whether a span
the VAD (or a listen stop) marked is worth recognising, and hands out
numbered ``Utterance`` objects. It knows nothing about where the boundaries
come from or where the utterance goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.common.audio import SAMPLE_RATE, loudest_frame_dbfs, ms_to_samples
from services.gateway import metrics
from services.gateway.audio_buffer import UtteranceBuffer
from services.gateway.config import GatewaySettings

# How far behind the newest audio a VAD replica has been through a speech
# start it has not reported yet may lie (its detector reports a start once
# 150 ms of a 200 ms window are speech and places it ~0.4 s back, so 1 s
# leaves a margin). A listening session keeps this much behind what its
# replica acknowledged, and a replay to a new replica looks back as far
# behind what the lost one had acknowledged (``SessionVad``).
PRE_ROLL = SAMPLE_RATE


@dataclass(frozen=True)
class Utterance:
    seq: int
    pcm: bytes
    # Absolute sample offsets in the session's audio.
    start: int
    end: int
    # What ended it: vad, listen_stop, max_length, vad_lost.
    cause: str
    decided_at: float

    def id(self, session_id: str) -> str:
        return f"{session_id}-{self.seq}"


@dataclass(frozen=True)
class CutLimits:
    max_utterance_s: float
    min_utterance_ms: int
    min_speech_dbfs: float
    silence_ms: int

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> CutLimits:
        return cls(
            max_utterance_s=settings.max_utterance_s,
            min_utterance_ms=settings.min_utterance_ms,
            min_speech_dbfs=settings.min_speech_dbfs,
            silence_ms=settings.vad_silence_ms,
        )


class UtteranceCutter:
    def __init__(self, limits: CutLimits) -> None:
        self._limits = limits
        self._max_utterance = ms_to_samples(int(limits.max_utterance_s * 1000))
        self._silence = ms_to_samples(limits.silence_ms)
        self.buffer = UtteranceBuffer(self._max_utterance + PRE_ROLL)
        # Replays after a VAD replica loss never reach back past this point,
        # so no finished utterance is recognised twice.
        self.replay_floor = 0
        self._seq = 0

    @property
    def end(self) -> int:
        return self.buffer.end

    def append(self, pcm: bytes) -> None:
        self.buffer.append(pcm)

    def mark_listen_start(self) -> None:
        self.replay_floor = self.buffer.end

    def too_long(self, start: int) -> bool:
        """Utterances are bounded: past the limit, cut and go on as a new one."""
        if self.buffer.end - start < self._max_utterance:
            return False
        metrics.UTTERANCES.labels("truncated").inc()
        return True

    def cut(self, start: int, end: int, cause: str) -> Utterance | None:
        """The utterance [start, end), or None when it is too short or silent."""
        decided_at = time.monotonic()
        pcm = self.buffer.slice(start, end)
        self.skip(end)
        if len(pcm) // 2 < ms_to_samples(self._limits.min_utterance_ms):
            metrics.UTTERANCES.labels("too_short").inc()
            return None
        if loudest_frame_dbfs(pcm) < self._limits.min_speech_dbfs:
            # Near-digital silence (a muted or noise-suppressed microphone) can
            # still trip the VAD, and Whisper answers silence with "you".
            metrics.UTTERANCES.labels("silent").inc()
            return None
        self._seq += 1
        return Utterance(self._seq, pcm, start, end, cause, decided_at)

    def skip(self, end: int) -> None:
        """Audio before ``end`` is done with, whether or not it was recognised."""
        # The silence window after an end is silence by definition (that is how
        # the end was decided): a replay starting there cannot cut a word in two.
        self.replay_floor = max(self.replay_floor, min(end + self._silence, self.buffer.end))
        self.buffer.discard_before(min(end, self.buffer.end))
