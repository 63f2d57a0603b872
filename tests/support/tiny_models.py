"""Tiny, randomly initialised model directories laid out like the real ModelScope downloads.

They let CI drive the production engines (SenseVoiceSmall, ERes2NetV2) through
exactly the code path the real weights take, without a model hub. Outputs are
meaningless; shapes, file layout, config keys and checkpoint formats are real.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

# The SenseVoiceSmall download names its tokenizer this way; configuration.json points at it.
SENSEVOICE_BPE = "chn_jpn_yue_eng_ko_spectok.bpe.model"

# Special tokens SenseVoice emits in front of the text; in the real tokenizer they are
# user-defined pieces, so decoding ids gives back the literal "<|...|>" strings.
SENSEVOICE_TAGS = [
    "<|zh|>",
    "<|en|>",
    "<|yue|>",
    "<|ja|>",
    "<|ko|>",
    "<|nospeech|>",
    "<|HAPPY|>",
    "<|SAD|>",
    "<|ANGRY|>",
    "<|NEUTRAL|>",
    "<|EMO_UNKNOWN|>",
    "<|Speech|>",
    "<|BGM|>",
    "<|Laughter|>",
    "<|Applause|>",
    "<|Event_UNK|>",
    "<|withitn|>",
    "<|woitn|>",
]

_CORPUS = [
    "hello world this is a tiny test model",
    "the quick brown fox jumps over the lazy dog",
    "speech front end for voice devices",
    "one two three four five six seven eight nine ten",
    "batching requests makes the accelerator busy",
    "voice activity detection and speaker embedding",
]

# LFR stacks 7 frames of 80 mel bins: the encoder's input width.
_N_MELS = 80
_LFR_M = 7
_LFR_N = 6


def _sensevoice_config(n_blocks: int, tp_blocks: int, width: int, heads: int, ffn: int) -> str:
    # Same keys and component names as the real config.yaml; only the sizes shrink.
    return f"""\
encoder: SenseVoiceEncoderSmall
encoder_conf:
    output_size: {width}
    attention_heads: {heads}
    linear_units: {ffn}
    num_blocks: {n_blocks}
    tp_blocks: {tp_blocks}
    dropout_rate: 0.1
    positional_dropout_rate: 0.1
    attention_dropout_rate: 0.1
    input_layer: pe
    pos_enc_class: SinusoidalPositionEncoder
    normalize_before: true
    kernel_size: 11
    sanm_shfit: 0
    selfattention_layer_type: sanm

model: SenseVoiceSmall
model_conf:
    length_normalized_loss: true
    sos: 1
    eos: 2
    ignore_id: -1

tokenizer: SentencepiecesTokenizer
tokenizer_conf:
    bpemodel: null
    unk_symbol: <unk>
    split_with_space: true

frontend: WavFrontend
frontend_conf:
    fs: 16000
    window: hamming
    n_mels: {_N_MELS}
    frame_length: 25
    frame_shift: 10
    lfr_m: {_LFR_M}
    lfr_n: {_LFR_N}
    cmvn_file: null
"""


def _write_am_mvn(path: Path, dim: int, rng: np.random.Generator) -> None:
    # Kaldi nnet1 text format, as funasr's WavFrontend parses it: a shift and a scale per dim.
    shift = -(10.0 + rng.standard_normal(dim))
    scale = 0.25 + 0.05 * rng.random(dim)

    def row(values: np.ndarray) -> str:
        return " ".join(f"{v:.6f}" for v in values)

    path.write_text(
        "<Nnet>\n"
        f"<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {row(shift)} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {row(scale)} ]\n"
        "</Nnet>\n"
    )


def _train_bpe(path: Path, vocab_size: int) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        user_defined_symbols=SENSEVOICE_TAGS,
        # CTC blank is id 0 in SenseVoice, so <unk> must not take it.
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        pad_id=0,
        pad_piece="<blank>",
        character_coverage=1.0,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


# SenseVoiceSmall's published encoder sizes (234 M parameters with its 25 055-token vocabulary).
SENSEVOICE_SMALL_SIZES = {
    "n_blocks": 50,
    "tp_blocks": 20,
    "width": 512,
    "heads": 4,
    "ffn": 2048,
    "vocab_size": 25055,
}


def write_tiny_sensevoice(
    directory: Path,
    *,
    n_blocks: int = 2,
    tp_blocks: int = 1,
    width: int = 32,
    heads: int = 2,
    ffn: int | None = None,
    vocab_size: int = 120,
    seed: int = 0,
) -> Path:
    """Write a SenseVoiceSmall-shaped model dir (config, weights, tokenizer, CMVN) and return it."""
    from funasr.models.sense_voice.model import SenseVoiceSmall

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _train_bpe(directory / SENSEVOICE_BPE, vocab_size)
    _write_am_mvn(directory / "am.mvn", _N_MELS * _LFR_M, rng)
    ffn = width * 2 if ffn is None else ffn
    (directory / "config.yaml").write_text(
        _sensevoice_config(n_blocks, tp_blocks, width, heads, ffn)
    )
    (directory / "configuration.json").write_text(
        json.dumps(
            {
                "framework": "pytorch",
                "task": "auto-speech-recognition",
                "model": {"type": "funasr"},
                "pipeline": {"type": "funasr-pipeline"},
                "model_name_in_hub": {"ms": "", "hf": ""},
                "file_path_metas": {
                    "init_param": "model.pt",
                    "config": "config.yaml",
                    "tokenizer_conf": {"bpemodel": SENSEVOICE_BPE},
                    "frontend_conf": {"cmvn_file": "am.mvn"},
                },
            },
            indent=2,
        )
    )
    torch.manual_seed(seed)
    model = SenseVoiceSmall(
        encoder="SenseVoiceEncoderSmall",
        encoder_conf={
            "output_size": width,
            "attention_heads": heads,
            "linear_units": ffn,
            "num_blocks": n_blocks,
            "tp_blocks": tp_blocks,
            "kernel_size": 11,
            "sanm_shfit": 0,
        },
        input_size=_N_MELS * _LFR_M,
        vocab_size=vocab_size,
        length_normalized_loss=True,
    )
    torch.save(model.state_dict(), directory / "model.pt")
    return directory


@dataclass(frozen=True)
class ERes2NetV2Variant:
    """An ERes2NetV2 release as 3D-Speaker publishes it on ModelScope."""

    model_id: str
    checkpoint: str
    base_width: int
    scale: int
    expansion: int


ERES2NETV2_VARIANTS = {
    "base": ERes2NetV2Variant(
        "iic/speech_eres2netv2_sv_zh-cn_16k-common", "pretrained_eres2netv2.ckpt", 26, 2, 2
    ),
    "w24s4ep4": ERes2NetV2Variant(
        "iic/speech_eres2netv2w24s4ep4_sv_zh-cn_16k-common",
        "pretrained_eres2netv2w24s4ep4.ckpt",
        24,
        4,
        4,
    ),
}


def eres2netv2_configuration(variant: str) -> dict[str, object]:
    """The configuration.json of a 3D-Speaker ERes2NetV2 download (modelscope's format)."""
    spec = ERES2NETV2_VARIANTS[variant]
    return {
        "framework": "pytorch",
        "task": "speaker-verification",
        "model": {
            "type": "eres2netv2-sv",
            "model_config": {
                "sample_rate": 16000,
                "fbank_dim": 80,
                "embed_dim": 192,
                "baseWidth": spec.base_width,
                "scale": spec.scale,
                "expansion": spec.expansion,
            },
            "pretrained_model": spec.checkpoint,
        },
        "pipeline": {"type": "speaker-verification"},
    }


def write_eres2netv2(
    directory: Path,
    variant: str = "base",
    *,
    weights_of: str | None = None,
    drop: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """Write a randomly initialised ERes2NetV2 model dir for ``variant`` and return it.

    The network is full size (the real checkpoint is a plain ``state_dict`` of
    3D-Speaker's ``ERes2NetV2``, which funasr ships as is), so loading exercises
    the real shapes. For negative tests, ``weights_of`` writes another variant's
    weights under this variant's configuration and ``drop`` leaves tensors out.
    """
    from funasr.models.eres2net.eres2netv2 import ERes2NetV2

    directory.mkdir(parents=True, exist_ok=True)
    spec = ERES2NETV2_VARIANTS[weights_of or variant]
    torch.manual_seed(seed)
    net = ERes2NetV2(
        feat_dim=80,
        embedding_size=192,
        baseWidth=spec.base_width,
        scale=spec.scale,
        expansion=spec.expansion,
    )
    # Random BatchNorm statistics, so that eval-mode normalisation is not the identity.
    with torch.no_grad():
        for buffer_name, buffer in net.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
            elif buffer_name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if k not in drop}
    (directory / "configuration.json").write_text(
        json.dumps(eres2netv2_configuration(variant), indent=2)
    )
    torch.save(state, directory / ERES2NETV2_VARIANTS[variant].checkpoint)
    return directory
