"""PCM conventions used on every wire inside the cluster: 16 kHz, mono, s16le."""

from __future__ import annotations

import io
import wave

import numpy as np

SAMPLE_RATE = 16_000
BYTES_PER_SAMPLE = 2
# Sample rates a WAV may declare. Resampling costs grow with the declared
# rate (a 10 MB file whose header claims 96 MHz took 1.4 s of CPU).
MIN_WAV_RATE = 8_000
MAX_WAV_RATE = 48_000


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """s16le bytes to float32 in [-1, 1)."""
    if len(pcm) % BYTES_PER_SAMPLE:
        raise ValueError(f"PCM length {len(pcm)} is not a whole number of 16-bit samples")
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def loudest_frame_dbfs(pcm: bytes, frame_ms: int = 20) -> float:
    """RMS level of the loudest ``frame_ms`` frame of s16le audio, in dB full scale.

    Digital silence gives -inf; a quiet room through a real microphone is
    around -60 to -50 dBFS, speech -40 to -10.
    """
    # float32: this runs on the gateway's event loop once per utterance.
    samples = pcm16_to_float(pcm)
    if samples.size == 0:
        return float("-inf")
    frame = ms_to_samples(frame_ms)
    frames = np.pad(samples, (0, -samples.size % frame)).reshape(-1, frame)
    loudest = float(np.sqrt((frames**2).mean(axis=1)).max())
    return 20 * float(np.log10(loudest)) if loudest > 0 else float("-inf")


def float_to_pcm16(samples: np.ndarray) -> bytes:
    clipped = np.clip(samples, -1.0, 32767 / 32768)
    return (clipped * 32768.0).astype("<i2").tobytes()


def samples_to_ms(samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    return samples * 1000 // sample_rate


def ms_to_samples(ms: int, sample_rate: int = SAMPLE_RATE) -> int:
    return ms * sample_rate // 1000


def read_wav(data: bytes) -> np.ndarray:
    """Decode a 16-bit PCM WAV (8-48 kHz, mono or multi-channel) to 16 kHz mono float32."""
    with wave.open(io.BytesIO(data)) as wav:
        channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        if not MIN_WAV_RATE <= rate <= MAX_WAV_RATE:
            raise ValueError(f"sample rate {rate} Hz is outside {MIN_WAV_RATE}-{MAX_WAV_RATE} Hz")
        frames = wav.readframes(wav.getnframes())
    if width != 2:
        raise ValueError(f"only 16-bit PCM WAV is supported (got {8 * width}-bit)")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return resample(samples, rate, SAMPLE_RATE)


def write_wav(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(float_to_pcm16(samples))
    return buf.getvalue()


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited enough for speech at these rates: linear interpolation after a
    moving-average low-pass when downsampling."""
    if src_rate == dst_rate or samples.size == 0:
        return samples.astype(np.float32, copy=False)
    if dst_rate < src_rate:
        width = max(1, round(src_rate / dst_rate))
        kernel = np.ones(width, dtype=np.float32) / width
        samples = np.convolve(samples, kernel, mode="same")
    duration = samples.size / src_rate
    n_out = round(duration * dst_rate)
    src_t = np.arange(samples.size) / src_rate
    dst_t = np.arange(n_out) / dst_rate
    return np.interp(dst_t, src_t, samples).astype(np.float32)
