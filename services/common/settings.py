"""Settings every gRPC service has, extended by each service's own model."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings


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
