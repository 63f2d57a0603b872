"""What every session of a gateway shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.gateway.compute import ComputeClients
from services.gateway.config import GatewaySettings
from services.gateway.limits import ConnectionCounts
from services.gateway.recognition import Recognizer
from services.gateway.store import SessionStore
from services.gateway.vad_router import VadRouter

if TYPE_CHECKING:
    from services.gateway.hub import SessionHub


@dataclass
class GatewayContext:
    settings: GatewaySettings
    store: SessionStore
    compute: ComputeClients
    vad: VadRouter
    hub: SessionHub
    recognizer: Recognizer
    draining: bool = field(default=False)
    # Every WebSocket from its upgrade on, hello or not (admission counts these).
    connections: ConnectionCounts = field(init=False)

    def __post_init__(self) -> None:
        self.connections = ConnectionCounts(
            self.settings.max_sessions_per_token, self.settings.max_sessions_per_address
        )
