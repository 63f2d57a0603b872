"""Speaker service configuration (environment prefix ``SF_SPEAKER_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import DEFAULT_MODELS_DIR
from services.common.settings import BatchedServiceSettings


class SpeakerSettings(BatchedServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SF_SPEAKER_")

    port: int = Field(50053, ge=1, le=65535)
    metrics_port: int = Field(9103, ge=0, le=65535)
    engine: Literal["eres2netv2", "dvector"] = "eres2netv2"
    # A ModelScope id or a local directory laid out like that model's download.
    eres2netv2_model: str = "iic/speech_eres2netv2_sv_zh-cn_16k-common"
    dvector_weights: str = str(DEFAULT_MODELS_DIR / "resemblyzer" / "pretrained.pt")
    max_batch: int = Field(32, ge=1, le=1024)
