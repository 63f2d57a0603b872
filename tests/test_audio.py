"""PCM helpers shared by every service."""

from __future__ import annotations

import math

import numpy as np

from services.common.audio import SAMPLE_RATE, float_to_pcm16, loudest_frame_dbfs


def tone(amplitude: float, seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_digital_silence_is_minus_infinity() -> None:
    assert loudest_frame_dbfs(float_to_pcm16(np.zeros(8000, np.float32))) == -math.inf
    assert loudest_frame_dbfs(b"") == -math.inf


def test_a_full_scale_sine_is_about_minus_3_dbfs() -> None:
    assert abs(loudest_frame_dbfs(float_to_pcm16(tone(1.0, 0.5))) - (-3.01)) < 0.1


def test_one_loud_frame_sets_the_level_of_quiet_audio() -> None:
    audio = np.concatenate([tone(0.001, 1.0), tone(0.1, 0.02), tone(0.001, 1.0)])
    level = loudest_frame_dbfs(float_to_pcm16(audio))
    assert -24 < level < -22  # 0.1 amplitude: -20 dB peak, -23 dB RMS
