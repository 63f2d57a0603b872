"""What the compatible HTTP APIs find in each request's scope (set by ``CompatHttp``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from services.gateway.context import GatewayContext

if TYPE_CHECKING:
    from services.gateway.compat.funasr_server import FunasrRuntime

CTX = "speechfront.ctx"
RUNTIME = "speechfront.compat"
KEY = "speechfront.key"


def context(request: Request) -> GatewayContext:
    ctx: GatewayContext = request.scope[CTX]
    return ctx


def runtime(request: Request) -> FunasrRuntime:
    found: FunasrRuntime = request.scope[RUNTIME]
    return found


def caller_key(request: Request) -> str:
    """The API key the request was admitted with ("" in open mode without one)."""
    return str(request.scope[KEY])
