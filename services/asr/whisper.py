"""Whisper through CTranslate2 (faster-whisper's model), one ``generate`` per batch.

Two models run here: tiny.en (English only, the fast one) and base
(multilingual: Mandarin, English and 97 more). Which one is the model
directory's business; the engine reads ``is_multilingual`` from it.

faster-whisper's own ``transcribe`` handles one file at a time; here every
utterance's log-mel features are computed with the model's feature extractor,
padded to a common encoder window, stacked, and decoded together by a single
CTranslate2 ``generate`` call.

The encoder window is the longest utterance of the batch plus 1 s, but never
under ``min_window_s`` (7 s) nor over Whisper's 30 s. faster-whisper always
pads to 30 s; for voice-assistant utterances of a few seconds that is most of
the encoder's work spent on silence. Three things make short windows safe:

- the audio is padded with digital silence *before* the log-mel transform, so
  the padding looks like the silence Whisper was trained on (padding the
  log-mel frames with zeros instead looks like faint noise, and with windows
  under ~8 s the model then repeats itself: "stop... stop... stop...");
- decoding runs in timestamp mode: the model closes its segment with an end
  timestamp and stops, and a segment that would start after the audio ends
  is dropped as invented;
- a decode that still loops (a block of tokens following itself) is redone
  with a 10 s window, together with any other such piece of the batch.

Measured on this project's espeak-ng speech (tiny.en int8, one thread,
batches of 8): 40 two-second commands WER 0.099 at a 10 s window with 109 ms
CPU per utterance, the same WER at the 7 s floor with 55 ms; 16 clips of
6-13 s WER 0.021 either way. On 40 commands cut by the FSMN-VAD, a 4 s window
still looped on 7 even in timestamp mode, 6 s on 4, 7 s on none.

Languages (multilingual model): a request names its language or asks for
``auto``. For ``auto`` the batch is encoded once and that encoder output
serves both Whisper's language detection (one decoder step) and the
decoding, so detection costs no second encoder pass. Chinese is decoded
as it comes and converted to simplified characters (see ``languages.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Hashable, Sequence
from pathlib import Path

import ctranslate2
import numpy as np
from ctranslate2.models import WhisperGenerationResult
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer

from services.asr.engine import AsrRequest, Transcript
from services.asr.languages import AUTO, SimplifiedChinese, normalize_language
from services.common import metrics
from services.common.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

_FRAMES_PER_SECOND = 100
_HOP_SAMPLES = SAMPLE_RATE // _FRAMES_PER_SECOND
MIN_AUDIO_SAMPLES = SAMPLE_RATE // 10
MAX_TOKENS = 224  # half of Whisper's 448-token decoder context, as openai-whisper
TOKENS_PER_SECOND = 6  # generous: fast English speech with punctuation is about 5
# Fast Mandarin is 5 characters a second at about 1.2 tokens each.
MULTILINGUAL_TOKENS_PER_SECOND = 10
FALLBACK_WINDOW_S = 10.0
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
# Look for the quietest 100 ms in the last 5 s before a 30 s boundary to cut there.
_CUT_SEARCH = 5 * SAMPLE_RATE
_CUT_FRAME = SAMPLE_RATE // 10
# Whisper's own no-speech rule (as in openai-whisper / faster-whisper defaults).
_TIMESTAMP_STEP_S = 0.02
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


def segments_within(
    tokens: Sequence[int], timestamp_begin: int, duration_s: float
) -> list[list[int]]:
    """Text tokens of each timestamped segment that starts before the audio ends.

    In timestamp mode Whisper writes ``<|start|> text <|end|>`` per segment
    (ids from ``timestamp_begin`` up are timestamps, 20 ms apart). A segment
    starting at or after the end of the real audio lies in the silent padding
    and can only be invented. A segment cut off by the length cap has no end
    timestamp and is kept.
    """
    segments: list[list[int]] = []
    start: float | None = None
    text: list[int] = []
    for token in tokens:
        if token < timestamp_begin:
            text.append(token)
            continue
        if start is None:
            start = (token - timestamp_begin) * _TIMESTAMP_STEP_S
            continue
        if text and start < duration_s:
            segments.append(text)
        start, text = None, []
    if text and (start is None or start < duration_s):
        segments.append(text)
    return segments


def repeats_itself(tokens: Sequence[Hashable]) -> bool:
    """Whether a block of tokens follows itself: 3+ times, or twice if 3+ tokens long.

    Flags the loops a decoder falls into ("Stop... Stop... Stop..."). Real
    speech that repeats itself ("no no no") is flagged too; that only costs
    a second decode.
    """
    n = len(tokens)
    for size in range(1, n // 2 + 1):
        needed = 2 if size >= 3 else 3
        for start in range(n - needed * size + 1):
            block = tokens[start : start + size]
            if all(
                tokens[start + k * size : start + (k + 1) * size] == block for k in range(1, needed)
            ):
                return True
    return False


class WhisperEngine:
    """Transcription with Whisper tiny.en (English) or a multilingual Whisper.

    Language: a multilingual model transcribes in the request's language when
    it knows it (``zh``, ``zh-CN``, ``en``, ...) and detects the language of
    each utterance otherwise (``"auto"``, or a code the model does not
    know), choosing among ``detect_among`` (all it knows when empty); the
    transcript reports the language used. tiny.en is
    English-only: every request is transcribed as English and reported as
    ``language="en"``. Chinese comes out in simplified characters.
    ``use_itn`` is ignored: Whisper already writes numbers and punctuation in
    written form. Whisper has no emotion or audio-event output, so those
    fields stay empty.

    Long audio: an utterance over 30 s is split into pieces of at most 30 s (cut
    at the quietest 100 ms of the last 5 s before each boundary); all pieces go
    into the same ``generate`` call and their texts are joined with a space.

    Silence: when Whisper's no-speech probability is above 0.6 and the average
    log-probability of the text is below -1 (its standard rule), ``text`` is
    empty; ``raw_text`` keeps what was decoded.
    """

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        compute_type: str = "int8",
        beam_size: int = 1,
        cpu_threads: int = 0,
        min_window_s: float = 7.0,
        detect_among: Collection[str] = (),
    ) -> None:
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        if device == "cuda" and compute_type == "int8":
            # int8 GEMMs on GPU lose accuracy for little gain on a model this small.
            compute_type = "float16"
        self.device = device
        self.name = "whisper-" + model_dir.name.removeprefix("whisper-")
        # Public so callers can instrument it; transcribe() looks up
        # ``self.model.model.generate`` on every call.
        self.model = WhisperModel(
            str(model_dir), device=device, compute_type=compute_type, cpu_threads=cpu_threads
        )
        self.multilingual = bool(self.model.model.is_multilingual)
        self.languages = frozenset(self.model.supported_languages)
        # An English-only model detects nothing, so it has no use for the list.
        unknown = set(detect_among) - self.languages if self.multilingual else set()
        if unknown:
            raise ValueError(f"{model_dir.name} does not know the languages {sorted(unknown)}")
        # Detection picks among these; empty: among every language the model knows.
        self.detect_among = (
            frozenset(detect_among) if self.multilingual else None
        ) or self.languages
        self._beam_size = beam_size
        self._tokenizers: dict[str, Tokenizer] = {}
        self._tokens_per_second = (
            MULTILINGUAL_TOKENS_PER_SECOND if self.multilingual else TOKENS_PER_SECOND
        )
        self._timestamp_begin = self._tokenizer("en").timestamp_begin
        self._max_frames = self.model.feature_extractor.nb_max_frames
        self._min_frames = min(self._max_frames, round(min_window_s * _FRAMES_PER_SECOND))
        self._fallback_frames = min(self._max_frames, round(FALLBACK_WINDOW_S * _FRAMES_PER_SECOND))

    def _tokenizer(self, language: str) -> Tokenizer:
        tokenizer = self._tokenizers.get(language)
        if tokenizer is None:
            tokenizer = Tokenizer(
                self.model.hf_tokenizer, self.multilingual, task="transcribe", language=language
            )
            self._tokenizers[language] = tokenizer
        return tokenizer

    def _prompt(self, language: str) -> list[int]:
        """<|startoftranscript|>, then for a multilingual model <|lang|> <|transcribe|>.

        English-only models take no language/task tokens; leaving out
        <|notimestamps|> turns timestamp prediction on.
        """
        return list(self._tokenizer(language).sot_sequence)

    def language_for(self, requested: str) -> str | None:
        """The language to decode a request in, or None to detect it."""
        if not self.multilingual:
            return "en"
        code = normalize_language(requested)
        return code if code != AUTO and code in self.languages else None

    def _likeliest(self, found: Sequence[tuple[str, float]]) -> str:
        """The most probable allowed language of (token, probability) pairs, best first."""
        for token, _ in found:
            code = token[2:-2]  # "<|zh|>" -> "zh"
            if code in self.detect_among:
                return code
        return found[0][0][2:-2]

    def _window_frames(self, longest_samples: int, floor_frames: int) -> int:
        """Encoder frames for a batch: the longest piece plus 1 s, in whole seconds."""
        seconds = -(-longest_samples // SAMPLE_RATE) + 1
        frames = seconds * _FRAMES_PER_SECOND
        return max(floor_frames, min(self._max_frames, frames))

    def _features(self, audio: np.ndarray, frames: int) -> np.ndarray:
        """Log-mel frames of ``audio`` padded with silence to exactly ``frames``."""
        # One hop more than the window: the extractor yields a frame past the end.
        padding = max(0, frames * _HOP_SAMPLES - audio.size) + _HOP_SAMPLES
        mel = self.model.feature_extractor(audio, padding=padding)
        return np.ascontiguousarray(mel[:, :frames], dtype=np.float32)

    def _text_tokens(self, result: WhisperGenerationResult) -> list[int]:
        return [t for t in result.sequences_ids[0] if t < self._timestamp_begin]

    def _generate(
        self, pieces: Sequence[np.ndarray], floor_frames: int, wanted: Sequence[str | None]
    ) -> tuple[list[WhisperGenerationResult], int, list[str]]:
        """Decode ``pieces`` in ``wanted`` languages (None: detect).

        Returns the results, the window used and each piece's language.
        """
        longest = max(piece.size for piece in pieces)
        frames = self._window_frames(longest, floor_frames)
        model = self.model.model
        inputs = ctranslate2.StorageView.from_array(
            np.stack([self._features(piece, frames) for piece in pieces])
        )
        languages = [language or "" for language in wanted]
        if not all(languages):
            # Encoded once: detection and decoding both read this output.
            inputs = model.encode(inputs, to_cpu=self.device == "cpu")
            detected = model.detect_language(inputs)
            languages = [
                language or self._likeliest(found)
                for language, found in zip(languages, detected, strict=True)
            ]
        # A cap in proportion to the audio stops a runaway early. CTranslate2
        # (4.x, measured) stops Whisper after max_length // 2 new tokens.
        max_length = 2 * min(MAX_TOKENS, 12 + int(longest / SAMPLE_RATE * self._tokens_per_second))
        results = model.generate(
            inputs,
            [self._prompt(language) for language in languages],
            beam_size=self._beam_size,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
            max_length=max_length,
        )
        return list(results), frames, languages

    def transcribe(self, batch: Sequence[AsrRequest]) -> list[Transcript]:
        if not batch:
            return []
        owners: list[int] = []
        pieces: list[np.ndarray] = []
        wanted: list[str | None] = []
        for index, request in enumerate(batch):
            audio = np.asarray(request.audio, dtype=np.float32).reshape(-1)
            if audio.size < MIN_AUDIO_SAMPLES:
                continue  # nothing to hear; the model would only invent text
            split = split_long(audio)
            if len(split) > 1:
                log.info("utterance %d is %d pieces of <= 30 s", index, len(split))
            owners.extend([index] * len(split))
            pieces.extend(split)
            wanted.extend([self.language_for(request.language)] * len(split))
        raw: list[list[str]] = [[] for _ in batch]
        text: list[list[str]] = [[] for _ in batch]
        spoken = [self.language_for(request.language) or "" for request in batch]
        if not pieces:
            return [Transcript(text="", language=language) for language in spoken]
        results, frames, languages = self._generate(pieces, self._min_frames, wanted)
        # A short window now and then sends the decoder round in a loop; those
        # pieces are decoded again, together, with the longer fallback window.
        runaway = [i for i, r in enumerate(results) if repeats_itself(self._text_tokens(r))]
        if runaway and frames < self._fallback_frames:
            metrics.ASR_REDECODES.inc(len(runaway))
            again, _, _ = self._generate(
                [pieces[i] for i in runaway], self._fallback_frames, [languages[i] for i in runaway]
            )
            for i, result in zip(runaway, again, strict=True):
                results[i] = result
        for owner, piece, result, language in zip(owners, pieces, results, languages, strict=True):
            # An utterance is reported in the language of its first piece.
            spoken[owner] = spoken[owner] or language
            tokens = result.sequences_ids[0]
            tokenizer = self._tokenizer(language)
            raw[owner].append(tokenizer.decode(self._text_tokens(result)))
            kept = [
                token
                for segment in segments_within(
                    tokens, self._timestamp_begin, piece.size / SAMPLE_RATE
                )
                for token in segment
            ]
            decoded = tokenizer.decode(kept).strip()
            # generate's score is the length-normalised sum of log-probs (penalty 1).
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            silent = result.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD
            if not silent and decoded:
                text[owner].append(decoded)
        return [
            self._transcript(t, r, language)
            for t, r, language in zip(text, raw, spoken, strict=True)
        ]

    @staticmethod
    def _transcript(texts: list[str], raws: list[str], language: str) -> Transcript:
        # Chinese has no spaces between words, nor between the pieces of a long utterance.
        joiner = "" if language == "zh" else " "
        text, raw = joiner.join(texts), "".join(raws)
        if language == "zh":
            text = SimplifiedChinese.convert(text)
        return Transcript(text=text, language=language, raw_text=raw)
