"""VAD service configuration (environment prefix ``SF_VAD_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import DEFAULT_MODELS_DIR
from services.common.settings import ServiceSettings


class VadSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SF_VAD_")

    port: int = Field(50051, ge=1, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)
    # "fsmn": FSMN-VAD batched across streams; "fsmn-stream": funasr's per-stream
    # generate(), kept as the baseline for benchmarks.
    engine: Literal["fsmn", "fsmn-stream", "silero"] = "fsmn"
    fsmn_model_dir: Path = DEFAULT_MODELS_DIR / "fsmn-vad"
    silero_model: Path = DEFAULT_MODELS_DIR / "silero-vad" / "silero_vad.onnx"
    device: str = "cpu"
    # "auto": bfloat16 where the CPU multiplies it natively (AVX512-BF16 or
    # AMX), float32 elsewhere and on GPUs. See fsmn_encoder.encoder_dtype.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    silence_ms: int = Field(
        500, ge=100, le=5000, description="Default end-of-speech silence (audio time)."
    )
    tick_ms: int = Field(60, ge=10, le=1000, description="How often all streams advance together.")
    max_streams: int = Field(4000, ge=1, description="Live streams per replica before refusing.")
    # As long as the backlog allowed: every tick then steps all the audio read
    # before it, so an acknowledged batch is one the detector went through
    # (the gateway keeps what may still be reported by that). Memory is
    # bounded by chunk_audio_s, not by this.
    max_step_s: float = Field(
        10.0, gt=0, description="Audio per stream advanced in one tick (a backlog catches up)."
    )
    # A step's working memory is ~0.7 MB per second of audio (features and
    # activations), so 30 s is ~22 MB: a 60 ms tick of 500 streams in one
    # engine call, whose fixed cost (~2 ms) is then shared by all of them.
    chunk_audio_s: float = Field(
        30.0,
        gt=0,
        description="Audio, summed over streams, per engine call; a tick makes as many calls "
        "as its streams need, so its working memory stays bounded however many catch up.",
    )
    max_backlog_s: float = Field(
        10.0, gt=0, description="Unprocessed audio per stream before it is failed."
    )
    stuck_step_s: float = Field(
        60.0,
        gt=0,
        description="A tick's step running this long, and 20 times what its audio usually "
        "costs, is taken for a hung inference thread: the liveness check fails.",
    )
