"""ERes2NetV2 speaker embeddings (3D-Speaker's model), loaded through funasr.

A model is a ModelScope id or a local directory laid out as its download is::

    configuration.json   {"model": {"type": "eres2netv2-sv",
                                    "model_config": {"embed_dim": 192, "baseWidth": 26,
                                                     "scale": 2, "expansion": 2, ...},
                                    "pretrained_model": "pretrained_eres2netv2.ckpt"}, ...}
    pretrained_eres2netv2.ckpt   a plain ``state_dict`` of ``ERes2NetV2``

funasr registers the model class as ``ERes2NetV2`` but builds it with the base
variant's widths and only looks for ``pretrained_eres2netv2.ckpt``; the
w24s4ep4 variant (``pretrained_eres2netv2w24s4ep4.ckpt``, width 24, scale 4,
expansion 4) would come up randomly initialised (its file is not found) or, named
explicitly, in the wrong shape. So the widths
and the checkpoint name are read from configuration.json and handed to funasr,
and the load is checked tensor by tensor afterwards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.funasr_models import resolve_device, resolve_model_dir

log = logging.getLogger(__name__)

_FEAT_DIM = 80
# fbank frames (25 ms window, 10 ms hop) are halved three times; the last stage needs two
# frames for the (unbiased) standard deviation in the statistics pooling to be defined.
_MIN_FRAMES = 9
MIN_SAMPLES = 400 + (_MIN_FRAMES - 1) * 160
# Stride-2 stages in ERes2NetV2 (layer2, layer3, layer4 / layer3_ds).
_DOWNSAMPLINGS = 3


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the architecture its configuration describes."""


def read_variant(model_dir: Path) -> dict[str, Any]:
    """Architecture numbers and checkpoint name from a 3D-Speaker configuration.json."""
    path = model_dir / "configuration.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; an ERes2NetV2 download carries one")
    conf = json.loads(path.read_text(encoding="utf-8"))
    model_conf = conf.get("model", {})
    arch = model_conf.get("model_config", {})
    ckpt = model_conf.get("pretrained_model")
    if not ckpt:
        raise ValueError(f"{path} names no checkpoint (model.pretrained_model)")
    return {
        "embedding_size": int(arch.get("embed_dim", 192)),
        "feat_dim": int(arch.get("fbank_dim", _FEAT_DIM)),
        "baseWidth": int(arch.get("baseWidth", 26)),
        "scale": int(arch.get("scale", 2)),
        "expansion": int(arch.get("expansion", 2)),
        "checkpoint": model_dir / str(ckpt),
    }


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    return dict(state)


def _expected_shapes(arch: Mapping[str, Any]) -> dict[str, torch.Size]:
    from funasr.models.eres2net.eres2netv2 import ERes2NetV2

    # The meta device gives the configured architecture's shapes without allocating it.
    with torch.device("meta"):
        net = ERes2NetV2(
            feat_dim=arch["feat_dim"],
            embedding_size=arch["embedding_size"],
            baseWidth=arch["baseWidth"],
            scale=arch["scale"],
            expansion=arch["expansion"],
        )
    return {k: v.shape for k, v in net.state_dict().items()}


def _describe(arch: Mapping[str, Any]) -> str:
    return (
        f"ERes2NetV2(baseWidth={arch['baseWidth']}, scale={arch['scale']}, "
        f"expansion={arch['expansion']}, embed_dim={arch['embedding_size']})"
    )


def check_fits(
    ckpt: Mapping[str, torch.Tensor], model: Mapping[str, torch.Size], what: str
) -> None:
    """Every checkpoint tensor has a model slot of its shape, and every model tensor a source."""
    wrong = [k for k in ckpt if k in model and tuple(ckpt[k].shape) != tuple(model[k])]
    unexpected = [k for k in ckpt if k not in model]
    # BatchNorm's step counter is training bookkeeping; some exports drop it.
    missing = [k for k in model if k not in ckpt and not k.endswith("num_batches_tracked")]
    if not (wrong or unexpected or missing):
        return
    lines = [f"checkpoint does not fit {what}:"]
    if wrong:
        k = wrong[0]
        lines.append(
            f"  {len(wrong)} tensors have another shape, e.g. {k}: checkpoint "
            f"{list(ckpt[k].shape)} vs model {list(model[k])}"
        )
    if unexpected:
        lines.append(f"  {len(unexpected)} checkpoint tensors have no slot, e.g. {unexpected[0]}")
    if missing:
        lines.append(f"  {len(missing)} model tensors are not in the checkpoint, e.g. {missing[0]}")
    lines.append(
        "  configuration.json's baseWidth/scale/expansion probably belong to another variant"
    )
    raise CheckpointMismatchError("\n".join(lines))


def check_loaded(net: nn.Module, ckpt: Mapping[str, torch.Tensor]) -> None:
    """Every checkpoint tensor is what the loaded network now holds (nothing skipped)."""
    own = net.state_dict()
    check_fits(ckpt, {k: v.shape for k, v in own.items()}, "the loaded network")
    stale = [
        k
        for k, v in ckpt.items()
        if not torch.equal(own[k].detach().cpu(), v.to(dtype=own[k].dtype))
    ]
    if stale:
        raise CheckpointMismatchError(
            f"{len(stale)} checkpoint tensors were not loaded into the network, e.g. {stale[0]}"
        )


def _stage_lengths(lengths: torch.Tensor, padded: int) -> dict[int, torch.Tensor]:
    # Valid frames per utterance at each time resolution, keyed by that resolution's padded
    # length. Two resolutions only share a padded length when every valid length is 1 there.
    stages = {padded: lengths}
    for _ in range(_DOWNSAMPLINGS):
        lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
        padded = (padded + 1) // 2
        stages[padded] = lengths
    return stages


def _time_mask(lengths: torch.Tensor, padded: int, like: torch.Tensor) -> torch.Tensor:
    steps = torch.arange(padded, device=like.device)
    mask = steps[None, :] < lengths.to(like.device)[:, None]
    return mask.to(like.dtype)[:, None, None, :]


@contextmanager
def _masked_padding(net: nn.Module, lengths: torch.Tensor, padded: int) -> Iterator[None]:
    """Make a zero-padded batch compute what each utterance computes alone.

    The only places where frames mix are the 3x3 convolutions and the statistics
    pooling. Alone, an utterance's convolutions see zeros past its end; in a batch
    they would see activations of the padding (ReLU(BN(0)) is not 0). So the input
    of every time-mixing convolution is zeroed past each utterance's valid length
    at that resolution, and the pooling's mean/std are taken over valid frames only.
    """
    stages = _stage_lengths(lengths, padded)

    def zero_padding(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        return (x * _time_mask(stages[x.shape[-1]], x.shape[-1], x), *args[1:])

    def masked_stats(_: nn.Module, args: tuple[torch.Tensor, ...], __: Any) -> torch.Tensor:
        x = args[0]
        n = stages[x.shape[-1]].to(x.device, x.dtype)[:, None, None]
        mask = _time_mask(stages[x.shape[-1]], x.shape[-1], x)
        mean = (x * mask).sum(-1) / n
        var = (((x - mean[..., None]) * mask) ** 2).sum(-1) / (n - 1)
        # Same layout and epsilon as funasr's TSTP: [mean | std], each flattened over C x F.
        std = torch.sqrt(var + 1e-8)
        return torch.cat((mean.flatten(start_dim=1), std.flatten(start_dim=1)), 1)

    handles = [
        m.register_forward_pre_hook(zero_padding)
        for m in net.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size[-1] > 1
    ]
    handles.append(net.get_submodule("pool").register_forward_hook(masked_stats))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ERes2NetV2Engine:
    """192-dim ERes2NetV2 speaker embeddings, one padded forward per batch.

    ``name`` is ``eres2netv2`` for the base architecture and
    ``eres2netv2w{width}s{scale}ep{expansion}`` otherwise (pass ``name`` to tell
    apart two trainings of one architecture). Utterances shorter than
    ``MIN_SAMPLES`` (105 ms) are repeated up to it: the network needs that much.
    """

    def __init__(self, model: str, device: str = "auto", name: str | None = None) -> None:
        from funasr import AutoModel

        self.device = resolve_device(device)
        model_dir = resolve_model_dir(model)
        arch = read_variant(model_dir)
        ckpt_path: Path = arch["checkpoint"]
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"{ckpt_path}, named in configuration.json, is missing")
        ckpt = _load_state(ckpt_path)
        # Checked before funasr sees it: funasr's own load reports a mismatch as a wall of
        # size errors or, for missing tensors, only a log line.
        check_fits(ckpt, _expected_shapes(arch), f"{_describe(arch)} from configuration.json")

        self.model = AutoModel(
            model="ERes2NetV2",
            model_path=str(model_dir),
            init_param=str(ckpt_path),
            # funasr's generic loader maps names by prefix; the network sits under "model.".
            scope_map=["None", "model."],
            feat_dim=arch["feat_dim"],
            embedding_size=arch["embedding_size"],
            baseWidth=arch["baseWidth"],
            scale=arch["scale"],
            expansion=arch["expansion"],
            device=self.device,
            disable_update=True,
            disable_pbar=True,
            log_level="WARNING",
            # funasr otherwise sets torch's global thread count to 4.
            ncpu=torch.get_num_threads(),
        )
        # ERes2NetV2SV wraps the 3D-Speaker network as ``.model``.
        self.network: nn.Module = self.model.model.model
        check_loaded(self.network, ckpt)
        del ckpt
        self.dim = int(arch["embedding_size"])
        base = (arch["baseWidth"], arch["scale"], arch["expansion"]) == (26, 2, 2)
        self.name = name or (
            "eres2netv2"
            if base
            else f"eres2netv2w{arch['baseWidth']}s{arch['scale']}ep{arch['expansion']}"
        )
        log.info("loaded %s from %s on %s", _describe(arch), model_dir, self.device)

    def _features(self, batch: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        from funasr.models.campplus.utils import extract_feature

        waves = []
        for wav in batch:
            wav = np.asarray(wav, dtype=np.float32).reshape(-1)
            if wav.size == 0:
                wav = np.zeros(MIN_SAMPLES, np.float32)
            elif wav.size < MIN_SAMPLES:
                # Repeating keeps the voice's spectrum; zeros would skew the mean removal.
                wav = np.resize(wav, MIN_SAMPLES)
            waves.append(torch.from_numpy(wav))
        # funasr's own ERes2NetV2 front end: 80-bin Kaldi fbank, per-utterance mean removed,
        # zero-padded to the longest utterance.
        feats, lengths, _ = extract_feature(waves)
        return feats, torch.as_tensor(lengths, dtype=torch.long)

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        feats, lengths = self._features(batch)
        lengths = lengths.to(self.device)
        # One forward for the whole batch: utterances are zero-padded to the longest, and
        # hooks keep the padding out of every valid frame (see _masked_padding), so each
        # embedding is what the utterance gets on its own, whatever it is batched with.
        with torch.inference_mode(), _masked_padding(self.network, lengths, feats.shape[1]):
            out = self.network(feats.to(self.device, torch.float32))
        emb = out.float().cpu().numpy()
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.maximum(norms, 1e-8)).astype(np.float32)
