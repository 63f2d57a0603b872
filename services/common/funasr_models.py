"""Where funasr-loaded production models come from and which device they run on."""

from __future__ import annotations

from pathlib import Path


def resolve_device(device: str) -> str:
    """``auto`` is the first GPU when torch sees one, else the CPU."""
    if device == "auto":
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; a hub id through funasr's own ModelScope download.

    funasr would download an id itself, but on failure it only prints and then
    reports an unregistered model class; this names the real problem.
    """
    if Path(model).is_dir():
        return Path(model)
    from funasr.download.download_model_from_hub import get_or_download_model_dir

    try:
        return Path(get_or_download_model_dir(model, "master", is_training=False))
    except Exception as exc:
        raise FileNotFoundError(
            f"{model!r} is neither a local model directory nor downloadable from ModelScope"
        ) from exc
