"""VAD test material: clips of espeak-ng speech with pauses and noise, stepped together.

Built deterministically: several voices, English and Mandarin, silences of
varied length, Gaussian noise at a few levels, and some cut mid-utterance.
"""

from __future__ import annotations

import numpy as np

from services.simulator.speech import silence, synthesize
from services.vad.fsmn_batched import BatchedFsmnVadEngine
from support.fsmn_reference import SILENCE_MS, Events

N_CLIPS = 54

PHRASES = [
    ("hello there how are you", "en"),
    ("turn on the kitchen lights", "en+f3"),
    ("what is the weather like tomorrow", "en+m7"),
    ("set a timer for ten minutes", "en-us+f5"),
    ("play some music please", "en"),
    ("stop", "en+f3"),
    ("yes", "en+m7"),
    ("remind me to call my mother at six", "en-us+f5"),
    ("你好小智", "cmn"),
    ("今天天气怎么样", "cmn"),
    ("请把灯关掉", "cmn"),
    ("okay thanks a lot", "en+m7"),
]
PAUSES_S = [0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 2.5]
NOISE_LEVELS = [0.0, 0.002, 0.01, 0.03]


def build_clips() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    speech = [synthesize(text, voice) for text, voice in PHRASES]
    clips: dict[str, np.ndarray] = {}
    for i in range(N_CLIPS):
        parts = [silence(float(rng.uniform(0.0, 1.2)))]
        for j in range(int(rng.integers(1, 4))):
            if j:
                parts.append(silence(float(rng.choice(PAUSES_S))))
            parts.append(speech[int(rng.integers(len(speech)))])
        cut_mid_speech = i % 6 == 5
        if cut_mid_speech:
            last = parts.pop()
            parts.append(last[: int(last.size * rng.uniform(0.3, 0.8))])
        else:
            parts.append(silence(float(rng.uniform(0.2, 1.2))))
        audio = np.concatenate(parts)
        noise = NOISE_LEVELS[i % len(NOISE_LEVELS)]
        if noise:
            audio = audio + rng.normal(0.0, noise, audio.size)
        clips[f"clip{i:02d}"] = audio.astype(np.float32)
    return clips


def step_together(
    engine: BatchedFsmnVadEngine, clips: dict[str, np.ndarray], chunk: int
) -> dict[str, Events]:
    """Every clip advances in the same steps, ``chunk`` samples each, flushed on its last."""
    # Placeholders opened in between and closed again move clips into their
    # slots, so the clips are stepped in an order other than their slots'
    # (the encoder reorders its rows); clips that end early leave the rest on
    # non-consecutive slots (its gather/scatter path).
    for i, stream_id in enumerate(clips):
        engine.open(stream_id, SILENCE_MS)
        if i % 3 == 0:
            engine.open(f"gap{i}", SILENCE_MS)
    for i in range(0, len(clips), 3):
        engine.close(f"gap{i}")
    got: dict[str, Events] = {stream_id: [] for stream_id in clips}
    longest = max(audio.size for audio in clips.values())
    for at in range(0, longest, chunk):
        step = {sid: audio[at : at + chunk] for sid, audio in clips.items() if at < audio.size}
        final = [sid for sid, audio in clips.items() if at < audio.size <= at + chunk]
        for event in engine.step(step, final):
            got[event.stream_id].append((event.kind, event.offset_ms))
    for stream_id in clips:
        engine.close(stream_id)
    return got
