"""Speech for the simulated devices: espeak-ng where it is installed, else a saved copy.

The GPU machine may have no espeak-ng, so the wheel bundle carries the same
sentences already spoken (16-bit PCM in an .npz, about 1 MB); `SF_BENCH_CLIPS`
names that file. Packets are Opus-encoded once here and shared by every
device of a step, as `make bench` does.

    python -m bench.gpu.clips --write wheels-gpu/speech.npz
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np

from services.simulator.device import FRAME_SAMPLES, DeviceConfig, SimulatedDevice
from services.simulator.phrases import SENTENCES, VOICES
from services.simulator.speech import silence, synthesize, trim_silence


def speech() -> list[np.ndarray]:
    """One float32 16 kHz clip per sentence, leading and trailing silence trimmed."""
    saved = os.environ.get("SF_BENCH_CLIPS")
    if saved and Path(saved).is_file():
        with np.load(saved) as data:
            return [data[k].astype(np.float32) / 32768 for k in sorted(data.files)]
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "no speech: espeak-ng is not installed and SF_BENCH_CLIPS names no saved clips "
            "(the GPU wheel bundle carries them)"
        )
    return [
        trim_silence(synthesize(sentence, VOICES[i % len(VOICES)]))
        for i, sentence in enumerate(SENTENCES)
    ]


def enrolment_audio(clips: list[np.ndarray]) -> np.ndarray:
    """A few seconds of speech for a voiceprint: with random weights its quality does not
    matter, and a short one keeps a CPU smoke run's enrolment inside the speaker deadline."""
    return np.concatenate([*clips[:2], silence(0.2)])


def write_packets(clips: list[np.ndarray], path: Path) -> None:
    """Opus packets of every clip and of one silent frame, for the load generators."""
    encoder = SimulatedDevice(DeviceConfig(url="ws://unused"))
    data = {
        "clips": [
            {
                "packets": [base64.b64encode(p).decode() for p in encoder.encode(clip)],
                "last_voiced": (clip.size - 1) // FRAME_SAMPLES,
            }
            for clip in clips
        ],
        "quiet": base64.b64encode(encoder.encode(silence(FRAME_SAMPLES / 16000))[0]).decode(),
    }
    path.write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser(description="Save the benchmark's speech clips.")
    parser.add_argument("--write", required=True, help=".npz file to write")
    path = Path(parser.parse_args().write)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = {f"clip{i:02d}": np.round(c * 32767).astype(np.int16) for i, c in enumerate(speech())}
    np.savez_compressed(path, **pcm)  # type: ignore[arg-type]
    print(f"wrote {len(pcm)} clips to {path}")


if __name__ == "__main__":
    main()
