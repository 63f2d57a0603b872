"""SessionStore against a real redis-server (the shared cluster's)."""

from __future__ import annotations

import asyncio
import uuid
from typing import cast

import redis

from services.cluster import LocalCluster
from services.gateway.store import TRANSCRIPTS_KEY, SessionStore


async def test_a_burst_of_reads_larger_than_the_pool_waits_instead_of_failing(
    cluster: LocalCluster,
) -> None:
    store = SessionStore(cluster.redis_url, session_ttl_s=60, max_connections=4)
    try:
        prints = await asyncio.gather(*(store.voiceprints(f"burst-{i}") for i in range(300)))
    finally:
        await store.close()
    assert prints == [[]] * 300


async def test_a_burst_of_transcripts_larger_than_the_pool_is_written_at_once(
    cluster: LocalCluster,
) -> None:
    marker = uuid.uuid4().hex
    store = SessionStore(cluster.redis_url, session_ttl_s=60, max_connections=4)
    try:
        await asyncio.gather(
            *(store.append_transcript({"utterance_id": f"{marker}-{i}"}) for i in range(300))
        )
    finally:
        await store.close()
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    entries = cast(list[tuple[str, dict[str, str]]], client.xrevrange(TRANSCRIPTS_KEY, count=1000))
    client.close()
    written = {f["utterance_id"] for _, f in entries if f["utterance_id"].startswith(marker)}
    assert written == {f"{marker}-{i}" for i in range(300)}
