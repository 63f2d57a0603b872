"""Whisper tiny.en through CTranslate2 (faster-whisper's model), one ``generate`` per batch.

faster-whisper's own ``transcribe`` handles one file at a time; here every
utterance's log-mel features are computed with the model's feature extractor,
padded to a common encoder window, stacked, and decoded together by a single
CTranslate2 ``generate`` call.

The encoder window is the longest utterance of the batch plus a margin, but
never under ``min_window_s`` (10 s) nor over Whisper's 30 s. faster-whisper
always pads to 30 s; for voice-assistant utterances of a few seconds that is
most of the encoder's work spent on silence. Measured on this project's
espeak-ng test sentences (2-core CPU, tiny.en int8): 0.39 s per utterance at
30 s, 0.12 s at 10 s (0.076 s per utterance in a batch of 12), with no loss of
accuracy (WER 0.14 at 30 s, 0.11 at 10 s). Below about 8 s the model starts
to repeat itself, hence the floor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer

from services.asr.engine import AsrRequest, Transcript
from services.common.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

_FRAMES_PER_SECOND = 100  # 10 ms hop
MIN_AUDIO_SAMPLES = SAMPLE_RATE // 10
MAX_TOKENS = 448  # Whisper's decoder context
TOKENS_PER_SECOND = 8  # generous: fast English speech is about 4
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
# Look for the quietest 100 ms in the last 5 s before a 30 s boundary to cut there.
_CUT_SEARCH = 5 * SAMPLE_RATE
_CUT_FRAME = SAMPLE_RATE // 10
# Whisper's own no-speech rule (as in openai-whisper / faster-whisper defaults).
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0


def split_long(audio: np.ndarray) -> list[np.ndarray]:
    """Cut audio longer than 30 s into pieces of at most 30 s, each at a quiet spot.

    Words spanning a cut that falls in speech can be garbled; upstream VAD
    segments are expected to stay under 30 s, so this is a fallback.
    """
    pieces: list[np.ndarray] = []
    while audio.size > CHUNK_SAMPLES:
        window = audio[CHUNK_SAMPLES - _CUT_SEARCH : CHUNK_SAMPLES]
        n = window.size // _CUT_FRAME
        energy = (window[: n * _CUT_FRAME].reshape(n, _CUT_FRAME) ** 2).mean(axis=1)
        cut = CHUNK_SAMPLES - _CUT_SEARCH + (int(np.argmin(energy)) + 1) * _CUT_FRAME
        pieces.append(audio[:cut])
        audio = audio[cut:]
    pieces.append(audio)
    return pieces


class WhisperEngine:
    """English transcription with Whisper tiny.en.

    Language: tiny.en is English-only. ``"auto"`` and ``"en"`` are the expected
    values; any other language code is still transcribed as English (no error),
    and the transcript reports ``language="en"``. ``use_itn`` is ignored: Whisper
    already writes numbers and punctuation in written form.

    Long audio: an utterance over 30 s is split into pieces of at most 30 s (cut
    at the quietest 100 ms of the last 5 s before each boundary); all pieces go
    into the same ``generate`` call and their texts are joined with a space.

    Silence: when Whisper's no-speech probability is above 0.6 and the average
    log-probability of the text is below -1 (its standard rule), ``text`` is
    empty; ``raw_text`` keeps what was decoded.
    """

    name = "whisper-tiny.en"

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        compute_type: str = "int8",
        beam_size: int = 1,
        cpu_threads: int = 0,
        min_window_s: float = 10.0,
    ) -> None:
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        if device == "cuda" and compute_type == "int8":
            # int8 GEMMs on GPU lose accuracy for little gain on a model this small.
            compute_type = "float16"
        self.device = device
        # Public so callers can instrument it; transcribe() looks up
        # ``self.model.model.generate`` on every call.
        self.model = WhisperModel(
            str(model_dir), device=device, compute_type=compute_type, cpu_threads=cpu_threads
        )
        self._beam_size = beam_size
        self._tokenizer = Tokenizer(
            self.model.hf_tokenizer,
            self.model.model.is_multilingual,
            task="transcribe",
            language="en",
        )
        # English-only models take no language/task tokens: just SOT, then no timestamps.
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self._max_frames = self.model.feature_extractor.nb_max_frames
        self._min_frames = min(self._max_frames, round(min_window_s * _FRAMES_PER_SECOND))

    def _window_frames(self, longest_samples: int) -> int:
        """Encoder frames for a batch: the longest piece plus 1 s, in whole seconds."""
        seconds = -(-longest_samples // SAMPLE_RATE) + 1
        frames = seconds * _FRAMES_PER_SECOND
        return max(self._min_frames, min(self._max_frames, frames))

    def _features(self, audio: np.ndarray, frames: int) -> np.ndarray:
        mel = self.model.feature_extractor(np.asarray(audio, dtype=np.float32).reshape(-1))
        # The extractor yields one frame past the audio (it pads 160 samples); drop it
        # like faster-whisper does, then pad with zeros to the batch's encoder window.
        return np.asarray(pad_or_trim(mel[..., :-1], frames), dtype=np.float32)

    def transcribe(self, batch: Sequence[AsrRequest]) -> list[Transcript]:
        if not batch:
            return []
        owners: list[int] = []
        pieces: list[np.ndarray] = []
        for index, request in enumerate(batch):
            audio = np.asarray(request.audio, dtype=np.float32).reshape(-1)
            if audio.size < MIN_AUDIO_SAMPLES:
                continue  # nothing to hear; the model would only invent text
            split = split_long(audio)
            if len(split) > 1:
                log.info("utterance %d is %d pieces of <= 30 s", index, len(split))
            owners.extend([index] * len(split))
            pieces.extend(split)
        raw: list[list[str]] = [[] for _ in batch]
        text: list[list[str]] = [[] for _ in batch]
        if not pieces:
            return [Transcript(text="", language="en") for _ in batch]
        longest = max(piece.size for piece in pieces)
        frames = self._window_frames(longest)
        features = [self._features(piece, frames) for piece in pieces]
        stacked = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(features)))
        results = self.model.model.generate(
            stacked,
            [self._prompt] * len(features),
            beam_size=self._beam_size,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
            # Speech runs at a few tokens per second; a cap in proportion to
            # the audio stops a hallucinated repetition early.
            max_length=min(MAX_TOKENS, 16 + int(longest / SAMPLE_RATE * TOKENS_PER_SECOND)),
        )
        for owner, result in zip(owners, results, strict=True):
            tokens = result.sequences_ids[0]
            decoded = self._tokenizer.decode(tokens)
            raw[owner].append(decoded)
            # generate's score is the length-normalised sum of log-probs (penalty 1).
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            silent = result.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD
            if not silent and decoded.strip():
                text[owner].append(decoded.strip())
        return [
            Transcript(text=" ".join(t), language="en", raw_text="".join(r))
            for t, r in zip(text, raw, strict=True)
        ]
