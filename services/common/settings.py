"""Settings every gRPC service has, extended by each service's own model."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from services.common.batching import BatchLimits


class ServiceSettings(BaseSettings):
    host: str = Field("0.0.0.0", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=1, le=65535, description="gRPC port.")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus port; 0 disables.")
    # Clients re-resolve and rebalance when a connection ages out, so new
    # replicas start taking traffic within this window after a scale-up.
    max_connection_age_s: float = Field(300.0, gt=0)
    max_connection_age_grace_s: float = Field(30.0, ge=0)
    shutdown_grace_s: float = Field(20.0, ge=0, description="Time to finish in-flight work.")
    log_level: str = "INFO"


class BatchedServiceSettings(ServiceSettings):
    """A service whose model calls go through a DynamicBatcher (asr, speaker)."""

    device: str = Field("auto", description='"auto" picks the GPU when one is present.')
    max_batch: int = Field(16, ge=1, le=1024, description="Requests in one model call.")
    max_wait_ms: float = Field(10.0, ge=0, le=1000, description="Collection window.")
    max_queue: int = Field(256, ge=1, description="Waiting requests before refusing.")
    max_batch_audio_s: float = Field(240.0, gt=0, description="Audio seconds in one model call.")
    max_utterance_s: float = Field(30.0, gt=0, le=300)

    def batch_limits(self) -> BatchLimits:
        return BatchLimits(
            max_batch=self.max_batch,
            max_audio_seconds=self.max_batch_audio_s,
            max_wait_ms=self.max_wait_ms,
            max_queue=self.max_queue,
        )
