"""ERes2NetV2Engine on random full-size checkpoints laid out like the ModelScope downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.tiny_models import ERES2NETV2_VARIANTS, write_eres2netv2

from services.common.audio import SAMPLE_RATE
from services.speaker.eres2net import CheckpointMismatchError, ERes2NetV2Engine, check_loaded


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eres2netv2(tmp_path_factory.mktemp("eres2netv2"), "base")


@pytest.fixture(scope="module")
def w24_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eres2netv2(tmp_path_factory.mktemp("eres2netv2w24s4ep4"), "w24s4ep4", seed=1)


@pytest.fixture(scope="module")
def base(base_dir: Path) -> ERes2NetV2Engine:
    return ERes2NetV2Engine(str(base_dir))


@pytest.fixture(scope="module")
def w24(w24_dir: Path) -> ERes2NetV2Engine:
    return ERes2NetV2Engine(str(w24_dir))


def voice(seconds: float, pitch: float, seed: int) -> np.ndarray:
    """A buzzy harmonic tone with noise: different pitches and lengths, no real speech needed."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wav = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 8))
    wav = wav + 0.05 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.2 * wav).astype(np.float32)


UTTERANCES = [voice(1.3, 120, 1), voice(0.5, 210, 2), voice(2.2, 160, 3), voice(0.9, 95, 4)]


@pytest.mark.parametrize(
    ("variant", "name", "conv1_out"),
    [("base", "eres2netv2", 26 * 2), ("w24", "eres2netv2w24s4ep4", 24 * 4)],
)
def test_each_variant_loads_with_its_own_architecture(
    request: pytest.FixtureRequest, variant: str, name: str, conv1_out: int
) -> None:
    engine: ERes2NetV2Engine = request.getfixturevalue(variant)

    assert engine.name == name
    assert engine.dim == 192
    assert engine.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    # The first block's 1x1 conv is width * scale wide: the variant's own numbers.
    conv1 = engine.network.get_submodule("layer1.0.conv1")
    assert isinstance(conv1, torch.nn.Conv2d)
    assert conv1.out_channels == conv1_out


@pytest.mark.parametrize("variant", ["base", "w24"])
def test_embeddings_are_192_dim_unit_norm_float32(
    request: pytest.FixtureRequest, variant: str
) -> None:
    engine: ERes2NetV2Engine = request.getfixturevalue(variant)

    emb = engine.embed(UTTERANCES[:3])

    assert emb.shape == (3, 192)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Different inputs, different embeddings (the network is not a constant).
    assert np.abs(emb[0] - emb[1]).max() > 1e-3


def test_a_batch_is_one_forward_of_the_network(base: ERes2NetV2Engine) -> None:
    batch_sizes: list[int] = []
    handle = base.network.register_forward_hook(
        lambda _m, args, _out: batch_sizes.append(args[0].shape[0])
    )
    try:
        base.embed(UTTERANCES)
    finally:
        handle.remove()

    assert batch_sizes == [len(UTTERANCES)]


@pytest.mark.parametrize("variant", ["base", "w24"])
def test_an_embedding_does_not_depend_on_its_batch_partners(
    request: pytest.FixtureRequest, variant: str
) -> None:
    engine: ERes2NetV2Engine = request.getfixturevalue(variant)
    target = UTTERANCES[0]

    alone = engine.embed([target])[0]
    with_longer = engine.embed([UTTERANCES[2], target])[1]
    with_shorter = engine.embed([UTTERANCES[1], UTTERANCES[3], target])[2]

    np.testing.assert_allclose(with_longer, alone, atol=1e-4)
    np.testing.assert_allclose(with_shorter, alone, atol=1e-4)


def test_empty_and_very_short_utterances_still_embed(base: ERes2NetV2Engine) -> None:
    emb = base.embed([np.zeros(0, np.float32), UTTERANCES[1][:800], UTTERANCES[0]])

    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_an_empty_batch_gives_an_empty_matrix(base: ERes2NetV2Engine) -> None:
    assert base.embed([]).shape == (0, 192)


def test_a_checkpoint_of_another_variant_is_refused(tmp_path: Path) -> None:
    # configuration.json says w24s4ep4; the weights are the base variant's.
    model_dir = write_eres2netv2(tmp_path, "w24s4ep4", weights_of="base")

    with pytest.raises(CheckpointMismatchError, match=r"baseWidth=24.*\n.*another shape"):
        ERes2NetV2Engine(str(model_dir))


def test_a_checkpoint_lacking_tensors_is_refused(tmp_path: Path) -> None:
    model_dir = write_eres2netv2(tmp_path, "base", drop=("seg_1.weight",))

    with pytest.raises(CheckpointMismatchError, match=r"not in the checkpoint, e\.g\. seg_1"):
        ERes2NetV2Engine(str(model_dir))


def test_a_tensor_funasr_left_unloaded_is_caught(base: ERes2NetV2Engine, base_dir: Path) -> None:
    ckpt_name = ERES2NETV2_VARIANTS["base"].checkpoint
    ckpt = torch.load(base_dir / ckpt_name, map_location="cpu", weights_only=True)
    check_loaded(base.network, ckpt)
    ckpt["seg_1.bias"] = ckpt["seg_1.bias"] + 1.0

    with pytest.raises(CheckpointMismatchError, match="not loaded"):
        check_loaded(base.network, ckpt)
