"""ASR service configuration (environment prefix ``SF_ASR_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import DEFAULT_MODELS_DIR
from services.common.settings import ServiceSettings


class AsrSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SF_ASR_")

    port: int = Field(50052, ge=1, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    engine: Literal["sensevoice", "whisper"] = "sensevoice"
    # A ModelScope id (downloaded once where a hub is reachable) or a local directory.
    sensevoice_model: str = "iic/SenseVoiceSmall"
    whisper_model_dir: str = str(DEFAULT_MODELS_DIR / "whisper-tiny.en")
    device: str = Field("auto", description='"auto" picks the GPU when one is present.')
    cpu_threads: int = Field(0, ge=0, description="Threads of a CPU engine; 0 = library default.")
    max_batch: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0, le=1000)
    max_queue: int = Field(256, ge=1)
    max_batch_audio_s: float = Field(240.0, gt=0, description="Audio seconds in one model call.")
    max_utterance_s: float = Field(30.0, gt=0, le=300)
