"""Voiceprints of the compatible APIs: one Redis hash per API key.

``sf:vp:<namespace>`` maps a caller's speaker id to its voiceprint (the same
JSON as a device's). It is apart from the per-device ``sf:voiceprints:*`` of
the device protocol: voiceprint-api's speaker ids are global to the key, and
a FunASR connection with that key is identified against the same book.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from services.gateway.compute import Embedding
from services.gateway.store import SessionStore, Voiceprint

PREFIX = "sf:vp:"
REDIS_TIMEOUT_S = 2.0
MAX_SPEAKER_ID_CHARS = 128


@dataclass(frozen=True)
class Match:
    speaker_id: str  # "" when no candidate scores above the threshold
    score: float  # the best score, even when below it


class VoiceprintBook:
    def __init__(self, store: SessionStore, namespace: str) -> None:
        # The gateway's pub/sub client (bytes); every call is bounded here.
        self._redis = store.raw
        self._key = PREFIX + namespace

    async def all(self) -> list[Voiceprint]:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            raw = await self._redis.hgetall(self._key)
        return [Voiceprint.from_json(_text(k), v) for k, v in sorted(raw.items())]

    async def some(self, speaker_ids: list[str]) -> list[Voiceprint]:
        if not speaker_ids:
            return []
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            values = await self._redis.hmget(self._key, speaker_ids)
        return [Voiceprint.from_json(i, v) for i, v in zip(speaker_ids, values, strict=True) if v]

    async def count(self) -> int:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            return int(await self._redis.hlen(self._key))

    async def put(self, speaker_id: str, embedding: Embedding) -> None:
        """Register ``speaker_id``, replacing an earlier voiceprint of the same id."""
        print_ = Voiceprint(speaker_id, speaker_id, embedding.model, embedding.vector, time.time())
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await self._redis.hset(self._key, speaker_id, print_.to_json())

    async def delete(self, speaker_id: str) -> bool:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            return bool(await self._redis.hdel(self._key, speaker_id))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def best_match(prints: list[Voiceprint], embedding: Embedding, threshold: float) -> Match:
    """The closest voiceprint of the embedding's model; named only above ``threshold``.

    Voiceprints of another model are not comparable and are left out.
    """
    candidates = [p for p in prints if p.model == embedding.model]
    if not candidates:
        return Match("", 0.0)
    scores = np.stack([p.embedding for p in candidates]) @ embedding.vector
    best = int(np.argmax(scores))
    score = round(float(scores[best]), 4)
    return Match(candidates[best].speaker_id if score >= threshold else "", score)
