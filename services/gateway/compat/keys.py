"""API keys of the compatible APIs (FunASR, OpenAI, voiceprint-api).

Keys come from ``SF_GATEWAY_COMPAT_KEYS`` and the Redis set ``sf:compat:keys``,
as shared device tokens do; ``SF_GATEWAY_COMPAT_OPEN`` admits callers without
one. A key also names the caller's voiceprints (``namespace``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from services.gateway.config import GatewaySettings
from services.gateway.limits import ConnectionCounts
from services.gateway.store import SessionStore

log = logging.getLogger(__name__)

KEYS_SET = "sf:compat:keys"
OPEN_NAMESPACE = "open"
REDIS_TIMEOUT_S = 2.0


def bearer_key(authorization: str | None) -> str:
    """The key of ``Bearer <key>`` or of xiaozhi's ``Bearer; <key>``; "" when absent."""
    value = (authorization or "").strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower().rstrip(";") != "bearer":
        # "Bearer;key" has no space after the semicolon.
        if value.lower().startswith("bearer;"):
            return value[7:].strip()
        return ""
    return rest.strip()


async def key_accepted(settings: GatewaySettings, store: SessionStore, key: str) -> bool:
    if settings.compat_open:
        return True
    if not key:
        return False
    # Bytes: compare_digest refuses str with characters beyond ASCII.
    encoded = key.encode()
    if any(secrets.compare_digest(encoded, k.encode()) for k in settings.compat_keys):
        return True
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            return bool(await store.raw.sismember(KEYS_SET, key))
    except Exception as exc:
        # Fail closed: a Redis outage must not open the APIs.
        log.warning("compat key lookup failed: %s", exc)
        return False


def namespace(key: str) -> str:
    """Where a caller's voiceprints live: a short hash of its key, never the key."""
    return ConnectionCounts.token_key(key) if key else OPEN_NAMESPACE
