"""The GPU benchmark's offline installer, on a small bundle made here (no download)."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bundle_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "scripts" / "gpu_bundle.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(path: Path, files: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)


@pytest.fixture
def installed(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """(environment, install folder, tree) after installing a two-wheel bundle."""
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    _wheel(
        bundle / "wheels" / "sfdemo-1.0-py3-none-any.whl",
        {
            "sfdemo/__init__.py": "VALUE = 1\n",
            "sfdemo-1.0.data/purelib/sfdemo_extra.py": "EXTRA = 2\n",
            "sfdemo-1.0.data/scripts/sfdemo": "#!/bin/sh\n",
        },
    )
    _wheel(bundle / "wheels" / "numpy-9.9-cp312-cp312-any.whl", {"numpy/__init__.py": ""})
    (bundle / "protos").mkdir()
    (bundle / "protos" / "demo_pb2.py").write_text("# generated\n")
    (bundle / "manifest.json").write_text(json.dumps({"prefer_machine": ["numpy"]}))
    tree = tmp_path / "tree"
    into = tmp_path / "env"
    env = _bundle_module().install(bundle, into, tree=tree)
    return env, into, tree


def test_wheels_unpack_with_their_purelib_data_merged(
    installed: tuple[dict[str, str], Path, Path],
) -> None:
    site = installed[1] / "site"
    assert (site / "sfdemo" / "__init__.py").read_text() == "VALUE = 1\n"
    assert (site / "sfdemo_extra.py").is_file()
    assert not (site / "sfdemo-1.0.data").exists()  # scripts are left out


def test_the_machines_numpy_is_kept(installed: tuple[dict[str, str], Path, Path]) -> None:
    assert not (installed[1] / "site" / "numpy").exists()


def test_environment_puts_the_bundle_then_the_tree_on_the_path(
    installed: tuple[dict[str, str], Path, Path],
) -> None:
    env, into, tree = installed
    assert env["PYTHONPATH"].split(":") == [str(into / "site"), str(tree)]
    assert "export PYTHONPATH=" in (into / "env.sh").read_text()


def test_generated_grpc_modules_are_copied_into_the_tree(
    installed: tuple[dict[str, str], Path, Path],
) -> None:
    assert (installed[2] / "services" / "protos" / "demo_pb2.py").is_file()


def test_runtime_list_covers_what_the_benchmark_imports() -> None:
    # Everything outside the bundle's list (and the machine's torch) made unimportable: a
    # dependency added to the services since the list was written fails here.
    _bundle_module().check_runtime_list()
