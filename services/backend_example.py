"""A tiny dialogue backend: echoes each transcript back to its device.

It shows the hand-off contract a real backend (LLM + TTS) follows:
- read ``sf:transcripts`` with a consumer group (at-least-once: an entry is
  acknowledged only after it was handled; a crashed consumer's pending
  entries are claimed again on restart);
- de-duplicate by ``utterance_id`` (an entry may be delivered twice);
- reply by publishing device-protocol JSON (or Opus packets) to
  ``sf:reply:<session_id>``; whichever gateway holds the device forwards it.

    SF_BACKEND_REDIS_URL=redis://:<password>@127.0.0.1:6390/0 speechfront echo-backend

The Redis URL, password included, comes from ``SF_BACKEND_REDIS_URL`` (or
``--redis-url``, which puts the password on a command line anyone can read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.gateway.hub import REPLY_PREFIX
from services.gateway.store import TRANSCRIPTS_KEY

log = logging.getLogger("speechfront.echo_backend")

GROUP = "echo-backend"
SEEN_TTL_S = 3600


async def ensure_group(redis: aioredis.Redis) -> None:
    try:
        await redis.xgroup_create(TRANSCRIPTS_KEY, GROUP, id="$", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def handle(redis: aioredis.Redis, fields: dict[str, str]) -> None:
    utterance_id = fields["utterance_id"]
    # First delivery wins; a redelivered entry is acknowledged without a second reply.
    if not await redis.set(f"sf:echo:seen:{utterance_id}", 1, nx=True, ex=SEEN_TTL_S):
        return
    reply = {
        "type": "tts",
        "state": "sentence_start",
        "text": f"You said: {fields['text']}",
        "utterance_id": utterance_id,
    }
    await redis.publish(f"{REPLY_PREFIX}{fields['session_id']}", json.dumps(reply))


async def run(redis_url: str, consumer: str) -> None:
    redis = aioredis.from_url(redis_url, decode_responses=True)
    while True:
        try:
            await ensure_group(redis)
            # "0" first: entries this consumer took but never acknowledged.
            start = "0"
            while True:
                batches: Any = await redis.xreadgroup(
                    GROUP, consumer, {TRANSCRIPTS_KEY: start}, count=100, block=1000
                )
                entries: list[tuple[str, dict[str, str]]] = [
                    (entry_id, fields) for _, items in batches or [] for entry_id, fields in items
                ]
                if start == "0" and not entries:
                    start = ">"
                for entry_id, fields in entries:
                    await handle(redis, fields)
                    await redis.xack(TRANSCRIPTS_KEY, GROUP, entry_id)
        except (ConnectionError, OSError, aioredis.ConnectionError) as exc:
            log.warning("redis unavailable (%s); retrying", exc)
            await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speechfront echo-backend", description=__doc__)
    parser.add_argument(
        "--redis-url", default=os.environ.get("SF_BACKEND_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--consumer", default=socket.gethostname())
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO")
    asyncio.run(run(args.redis_url, args.consumer))
