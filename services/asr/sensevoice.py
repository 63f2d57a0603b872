"""SenseVoiceSmall through funasr's ``AutoModel``, one model call per batch.

``model`` is a ModelScope id (``iic/SenseVoiceSmall``) or a local directory laid
out as its download is: ``configuration.json`` (whose ``file_path_metas`` name
the files below), ``config.yaml``, ``model.pt``, ``am.mvn`` and the
sentencepiece model ``chn_jpn_yue_eng_ko_spectok.bpe.model``.

Batching: ``AutoModel.generate`` slices its input into chunks of
``batch_size`` and hands each chunk to ``SenseVoiceSmall.inference``, which
computes fbank+LFR features for the chunk, pads them and runs the encoder and
CTC head once over the padded batch. With ``batch_size=len(batch)`` the whole
batch is one chunk, hence one encoder forward. ``language`` and ``use_itn``
become query embeddings shared by the chunk, which is why a batch must agree
on them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import torch

from services.asr.engine import AsrRequest, Transcript
from services.common.funasr_models import resolve_device, resolve_model_dir

log = logging.getLogger(__name__)

# SenseVoice's frontend fails on audio shorter than one 25 ms frame (and LFR needs a few);
# trailing silence changes nothing in what is said.
MIN_SAMPLES = 1600

LANGUAGES = frozenset({"zh", "en", "yue", "ja", "ko", "nospeech"})
EMOTIONS = frozenset(
    {"HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN"}
)
EVENTS = frozenset(
    {
        "Speech",
        "BGM",
        "Applause",
        "Laughter",
        "Cry",
        "Sneeze",
        "Breath",
        "Cough",
        "Sing",
        "Speech_Noise",
        "GBG",
        "Event_UNK",
    }
)
_TAG = re.compile(r"<\|([^|<>]*)\|>")


def parse_rich_text(raw: str) -> Transcript:
    """Split SenseVoice's ``<|lang|><|EMOTION|><|Event|><|itn|>text`` into fields.

    Tags keep the model's spelling (``en``, ``HAPPY``, ``Speech``). The first tag
    of each kind wins; a tag anywhere in the text is removed from ``text``.
    """
    found: dict[str, str] = {}
    for tag in _TAG.findall(raw):
        kind = (
            "language"
            if tag in LANGUAGES
            else "emotion"
            if tag in EMOTIONS
            else "event"
            if tag in EVENTS
            else None
        )
        if kind is not None:
            found.setdefault(kind, tag)
    text = " ".join(_TAG.sub(" ", raw).split())
    return Transcript(
        text=text,
        language=found.get("language", ""),
        emotion=found.get("emotion", ""),
        event=found.get("event", ""),
        raw_text=raw,
    )


class SenseVoiceEngine:
    """Multilingual recognition with language, emotion and audio-event tags."""

    name = "sensevoice"

    def __init__(self, model: str, device: str = "auto") -> None:
        from funasr import AutoModel

        self.device = resolve_device(device)
        model_dir = resolve_model_dir(model)
        # Public so callers can instrument it; transcribe() calls ``self.model.generate``.
        self.model = AutoModel(
            model=str(model_dir),
            device=self.device,
            disable_update=True,
            disable_pbar=True,
            log_level="WARNING",
            # funasr otherwise sets torch's global thread count to 4.
            ncpu=torch.get_num_threads(),
        )
        kind = type(self.model.model).__name__
        if kind != "SenseVoiceSmall":
            raise ValueError(f"{model!r} holds a {kind}, not a SenseVoiceSmall model")
        log.info("loaded SenseVoiceSmall from %s on %s", model_dir, self.device)

    def transcribe(self, batch: Sequence[AsrRequest]) -> list[Transcript]:
        if not batch:
            return []
        options = {(r.language, r.use_itn) for r in batch}
        if len(options) > 1:
            raise ValueError(
                "one SenseVoice call applies one language/use_itn to every utterance; "
                f"this batch mixes {sorted(options)}: group requests by them first"
            )
        language, use_itn = options.pop()
        audio = []
        for request in batch:
            wav = np.asarray(request.audio, dtype=np.float32).reshape(-1)
            if wav.size < MIN_SAMPLES:
                wav = np.pad(wav, (0, MIN_SAMPLES - wav.size))
            audio.append(wav)
        results = self.model.generate(
            input=audio,
            language=language,
            use_itn=use_itn,
            batch_size=len(audio),
        )
        if len(results) != len(batch):
            raise RuntimeError(f"SenseVoice returned {len(results)} results for {len(batch)}")
        return [parse_rich_text(str(result["text"])) for result in results]
