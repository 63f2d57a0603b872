"""Session state in Redis: the only state a replacement gateway needs.

Keys (all under ``sf:``):
  sf:session:<session_id>   hash: device, client, gateway, mode, audio params,
                            timestamps, last result; expires after the TTL
  sf:device:<device_id>     hash: the device's current session and gateway
  sf:voiceprints:<device>   hash: speaker id -> JSON voiceprint
  sf:auth:tokens            set of accepted device tokens
Writes that fail (Redis down) are logged and counted; they never fail a device.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from prometheus_client import Counter

log = logging.getLogger(__name__)

REDIS_ERRORS = Counter(
    "speechfront_gateway_redis_errors_total", "Redis operations that failed, by operation.", ["op"]
)

TOKENS_KEY = "sf:auth:tokens"


@dataclass(frozen=True)
class Voiceprint:
    speaker_id: str
    name: str
    model: str
    embedding: np.ndarray
    created_at: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "model": self.model,
                "embedding": base64.b64encode(self.embedding.astype("<f4").tobytes()).decode(),
                "created_at": self.created_at,
            }
        )

    @classmethod
    def from_json(cls, speaker_id: str, raw: str | bytes) -> Voiceprint:
        data = json.loads(raw)
        vector = np.frombuffer(base64.b64decode(data["embedding"]), dtype="<f4")
        return cls(speaker_id, data["name"], data["model"], vector, data["created_at"])

    def public(self) -> dict[str, Any]:
        return {
            "speaker_id": self.speaker_id,
            "name": self.name,
            "model": self.model,
            "created_at": self.created_at,
        }


class SessionStore:
    def __init__(self, url: str, session_ttl_s: int) -> None:
        self._redis = aioredis.from_url(
            url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._ttl = session_ttl_s

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def token_is_valid(self, token: str) -> bool:
        try:
            return bool(await self._redis.sismember(TOKENS_KEY, token))
        except Exception as exc:
            REDIS_ERRORS.labels("auth").inc()
            log.warning("token lookup failed: %s", exc)
            return False

    async def add_token(self, token: str) -> None:
        await self._redis.sadd(TOKENS_KEY, token)

    async def save_session(self, session_id: str, device_id: str, fields: dict[str, Any]) -> None:
        record: dict[Any, Any] = {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()
        }
        record["updated_at"] = str(time.time())
        await self._guard("session", self._write_session(session_id, device_id, record))

    async def _write_session(self, session_id: str, device_id: str, record: dict[Any, Any]) -> None:
        key = f"sf:session:{session_id}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=record)
            pipe.expire(key, self._ttl)
            if device_id:
                route: dict[Any, Any] = {"session_id": session_id}
                if "gateway_id" in record:
                    route["gateway_id"] = record["gateway_id"]
                pipe.hset(f"sf:device:{device_id}", mapping=route)
                pipe.expire(f"sf:device:{device_id}", self._ttl)
            await pipe.execute()

    async def load_session(self, session_id: str) -> dict[str, str]:
        result = await self._redis.hgetall(f"sf:session:{session_id}")
        return {str(k): str(v) for k, v in result.items()}

    async def voiceprints(self, device_id: str) -> list[Voiceprint]:
        raw = await self._redis.hgetall(f"sf:voiceprints:{device_id}")
        return [Voiceprint.from_json(str(k), v) for k, v in sorted(raw.items())]

    async def add_voiceprint(
        self, device_id: str, name: str, model: str, embedding: np.ndarray
    ) -> Voiceprint:
        print_ = Voiceprint(uuid.uuid4().hex[:12], name, model, embedding, time.time())
        await self._redis.hset(f"sf:voiceprints:{device_id}", print_.speaker_id, print_.to_json())
        return print_

    async def delete_voiceprint(self, device_id: str, speaker_id: str) -> bool:
        return bool(await self._redis.hdel(f"sf:voiceprints:{device_id}", speaker_id))

    async def _guard(self, op: str, awaitable: Any) -> None:
        try:
            await awaitable
        except Exception as exc:
            REDIS_ERRORS.labels(op).inc()
            log.warning("redis %s write failed: %s", op, exc)
