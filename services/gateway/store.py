"""Session state in Redis: the only state a replacement gateway needs.

Keys (all under ``sf:``):
  sf:session:<session_id>   hash: device, client, gateway, mode, audio params,
                            timestamps, last result; expires after the TTL
  sf:device:<device_id>     hash: the device's current session and gateway
  sf:voiceprints:<device>   hash: speaker id -> JSON voiceprint
  sf:auth:tokens            set of accepted device tokens
  sf:transcripts            stream: one entry per recognised utterance, for
                            dialogue backends (consumer groups, at-least-once)
  sf:undelivered:<device>   list: results whose device had gone; sent on reconnect
  sf:reply:<session_id>     pub/sub channel: backend -> device messages and audio
Writes that fail (Redis down) are counted and kept in a bounded queue that is
replayed, in order, once Redis answers again; they never fail a device.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from services.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

REDIS_ERRORS = Counter(
    "speechfront_gateway_redis_errors_total", "Redis operations that failed, by operation.", ["op"]
)
REDIS_UP = Gauge("speechfront_gateway_redis_up", "1 while the gateway's Redis answers pings.")
REDIS_PENDING = Gauge(
    "speechfront_gateway_redis_pending_writes", "Writes waiting for Redis to come back."
)

TOKENS_KEY = "sf:auth:tokens"
TRANSCRIPTS_KEY = "sf:transcripts"
TRANSCRIPTS_MAXLEN = 100_000
MAX_PENDING_WRITES = 10_000

Write = Callable[[], Awaitable[Any]]


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
    def __init__(self, url: str, session_ttl_s: int, max_connections: int = 64) -> None:
        # A burst of results from many sessions waits for a pooled connection
        # (up to 2 s) instead of failing: redis-py's default pool refuses past
        # 100 connections with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=2.0,
            decode_responses=True,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )
        self._redis = aioredis.Redis.from_pool(pool)
        # Pub/sub payloads may be Opus audio, so that connection keeps bytes.
        self.raw = aioredis.from_url(url, socket_timeout=None, socket_connect_timeout=2.0)
        self._ttl = session_ttl_s
        self._pending: deque[tuple[str, Write]] = deque(maxlen=MAX_PENDING_WRITES)
        self._watcher: asyncio.Task[None] | None = None
        self.up = True

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="redis-watch")

    async def close(self) -> None:
        await cancel_and_wait(self._watcher)
        await self._flush_pending()
        await self._redis.aclose()
        await self.raw.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def _watch(self) -> None:
        """Track whether Redis answers and replay queued writes when it does again."""
        while True:
            self.up = await self.ping()
            REDIS_UP.set(1 if self.up else 0)
            if self.up and self._pending:
                await self._flush_pending()
            await asyncio.sleep(1.0)

    async def _flush_pending(self) -> None:
        while self._pending:
            _op, write = self._pending[0]
            try:
                await write()
            except Exception:
                return  # still down; keep the order and try again later
            self._pending.popleft()
            REDIS_PENDING.set(len(self._pending))
        log.info("redis writes queued during the outage are written")

    async def _guarded(self, op: str, write: Write) -> None:
        try:
            await write()
        except Exception as exc:
            REDIS_ERRORS.labels(op).inc()
            if len(self._pending) == MAX_PENDING_WRITES:
                REDIS_ERRORS.labels("pending_overflow").inc()
            self._pending.append((op, write))
            REDIS_PENDING.set(len(self._pending))
            log.warning("redis %s write failed (%s); queued for retry", op, exc)

    async def token_is_valid(self, token: str) -> bool:
        try:
            return bool(await self._redis.sismember(TOKENS_KEY, token))
        except Exception as exc:
            REDIS_ERRORS.labels("auth").inc()
            log.warning("token lookup failed: %s", exc)
            return False

    async def save_session(self, session_id: str, device_id: str, fields: dict[str, Any]) -> None:
        record: dict[Any, Any] = {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()
        }
        record["updated_at"] = str(time.time())
        await self._guarded("session", lambda: self._write_session(session_id, device_id, record))

    async def _write_session(self, session_id: str, device_id: str, record: dict[Any, Any]) -> None:
        key = f"sf:session:{session_id}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=record)
            pipe.expire(key, self._ttl)
            if device_id and "gateway_id" in record:
                # Only a session's connect record names it the device's current
                # one: later writes of a replaced session must not take it back.
                route: dict[Any, Any] = {
                    "session_id": session_id,
                    "gateway_id": record["gateway_id"],
                }
                pipe.hset(f"sf:device:{device_id}", mapping=route)
                pipe.expire(f"sf:device:{device_id}", self._ttl)
            await pipe.execute()

    async def append_transcript(self, fields: dict[str, Any]) -> None:
        entry: dict[Any, Any] = {
            k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            for k, v in fields.items()
        }
        await self._guarded(
            "transcript",
            lambda: self._redis.xadd(
                TRANSCRIPTS_KEY, entry, maxlen=TRANSCRIPTS_MAXLEN, approximate=True
            ),
        )

    async def save_undelivered(self, device_id: str, message: dict[str, Any]) -> None:
        key = f"sf:undelivered:{device_id}"

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, json.dumps(message, ensure_ascii=False))
                pipe.ltrim(key, -100, -1)
                pipe.expire(key, self._ttl)
                await pipe.execute()

        await self._guarded("undelivered", write)

    async def device_route(self, device_id: str) -> dict[str, str]:
        """The device's current session and gateway as last recorded ({} if unknown)."""
        try:
            raw = await self._redis.hgetall(f"sf:device:{device_id}")
        except Exception as exc:
            REDIS_ERRORS.labels("device_route").inc()
            log.warning("reading the route of device %s failed: %s", device_id, exc)
            return {}
        return {str(k): str(v) for k, v in raw.items()}

    async def publish(self, channel: str, message: str) -> None:
        try:
            await self._redis.publish(channel, message)
        except Exception as exc:
            REDIS_ERRORS.labels("publish").inc()
            log.warning("publishing to %s failed: %s", channel, exc)

    async def take_undelivered(self, device_id: str) -> list[dict[str, Any]]:
        key = f"sf:undelivered:{device_id}"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lrange(key, 0, -1)
                pipe.delete(key)
                items, _ = await pipe.execute()
        except Exception as exc:
            REDIS_ERRORS.labels("undelivered").inc()
            log.warning("reading undelivered results failed: %s", exc)
            return []
        return [json.loads(item) for item in items]

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
