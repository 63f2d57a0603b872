"""ASR service configuration (environment prefix ``SF_ASR_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import DEFAULT_MODELS_DIR
from services.common.settings import BatchedServiceSettings


class AsrSettings(BatchedServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SF_ASR_")

    port: int = Field(50052, ge=1, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    engine: Literal["sensevoice", "whisper"] = "sensevoice"
    # A ModelScope id (downloaded once where a hub is reachable) or a local directory.
    sensevoice_model: str = "iic/SenseVoiceSmall"
    # The offline profile's Whisper: multilingual base (Mandarin, English, ...)
    # or tiny.en (English only, the faster one). Both unpacked by `make models`.
    whisper_model: Literal["base", "tiny.en"] = "tiny.en"
    # Languages automatic detection chooses among (comma-separated; empty:
    # all 99 of the multilingual model). Whisper base hears short English
    # commands as Japanese now and then; the people xiaozhi serves speak
    # Mandarin or English, the rest can be fixed per device or deployment.
    whisper_languages: str = "zh,en"
    whisper_model_dir: str = Field(
        "", description="A CTranslate2 Whisper directory; set, it overrides whisper_model."
    )
    cpu_threads: int = Field(0, ge=0, description="Threads of a CPU engine; 0 = library default.")

    def whisper_detect_among(self) -> list[str]:
        return [code.strip().lower() for code in self.whisper_languages.split(",") if code.strip()]

    def whisper_path(self) -> Path:
        if self.whisper_model_dir:
            return Path(self.whisper_model_dir)
        return DEFAULT_MODELS_DIR / f"whisper-{self.whisper_model}"
