"""Audio files in any common container (wav, mp3, ogg/opus, flac, webm, m4a) to 16 kHz PCM.

Decoding uses PyAV (FFmpeg's demuxers and decoders), probing the content
rather than trusting the name. It is CPU work: callers run it off the event
loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import io

import av
import numpy as np

from services.common.audio import SAMPLE_RATE


class NotAudio(ValueError):
    """The bytes are not an audio file FFmpeg can decode."""


class TooLong(ValueError):
    pass


def decode_file(data: bytes, max_seconds: float) -> bytes:
    """Mono 16-bit PCM at 16 kHz; raises ``NotAudio`` or ``TooLong`` (past ``max_seconds``)."""
    max_samples = int(max_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    held = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise NotAudio("the file has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    held += _take(out, chunks)
                if held > max_samples:
                    raise TooLong(f"audio longer than {max_seconds:g} s")
            for out in resampler.resample(None):
                held += _take(out, chunks)
    except (NotAudio, TooLong):
        raise
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise NotAudio(f"not a decodable audio file ({exc.__class__.__name__})") from None
    if held > max_samples:
        raise TooLong(f"audio longer than {max_seconds:g} s")
    if not chunks:
        raise NotAudio("the file holds no audio samples")
    return np.concatenate(chunks).astype("<i2").tobytes()


def _take(frame: av.AudioFrame, chunks: list[np.ndarray]) -> int:
    samples = frame.to_ndarray().reshape(-1)
    chunks.append(samples)
    return int(samples.size)
