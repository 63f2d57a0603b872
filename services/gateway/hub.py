"""What a gateway's sessions share, and the routing of events to them.

VAD events arrive on shared streams keyed by stream id; backend replies arrive
on Redis pub/sub channels keyed by session id (``sf:reply:<session_id>``). The
hub hands each to the one session it belongs to, so a device only ever sees
its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter

from services.common.tasks import cancel_and_wait
from services.gateway import metrics
from services.gateway.store import SessionStore
from services.gateway.vad_client import VadStreamClient
from services.protos import vad_pb2

if TYPE_CHECKING:
    from services.gateway.session import DeviceSession

log = logging.getLogger(__name__)

REPLIES = Counter(
    "speechfront_gateway_replies_total",
    "Backend messages relayed to devices, by kind (json, audio, dropped).",
    ["kind"],
)

REPLY_PREFIX = "sf:reply:"


class SessionHub:
    def __init__(self, store: SessionStore) -> None:
        self.sessions: dict[str, DeviceSession] = {}
        self._by_stream: dict[str, Callable[[vad_pb2.SpeechEvent], None]] = {}
        self._store = store
        self._subscribe_queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._relay: asyncio.Task[None] | None = None

    # -- sessions --------------------------------------------------------

    def add(self, session: DeviceSession) -> None:
        self.sessions[session.session_id] = session
        metrics.SESSIONS.set(len(self.sessions))
        self._subscribe_queue.put_nowait(("subscribe", session.session_id))

    def remove(self, session: DeviceSession) -> None:
        self.sessions.pop(session.session_id, None)
        metrics.SESSIONS.set(len(self.sessions))
        self._subscribe_queue.put_nowait(("unsubscribe", session.session_id))

    # -- VAD events ------------------------------------------------------

    def bind_stream(self, stream_id: str, handler: Callable[[vad_pb2.SpeechEvent], None]) -> None:
        self._by_stream[stream_id] = handler

    def unbind_stream(self, stream_id: str) -> None:
        self._by_stream.pop(stream_id, None)

    def on_vad_event(self, event: vad_pb2.SpeechEvent) -> None:
        handler = self._by_stream.get(event.stream_id)
        if handler is not None:
            handler(event)

    def on_vad_lost(self, client: VadStreamClient) -> None:
        """Every session with a stream on the lost replica asks for another."""
        for session in list(self.sessions.values()):
            try:
                session.on_vad_lost(client)
            except Exception:
                log.exception("session %s: re-pinning failed", session.session_id)

    # -- backend replies ---------------------------------------------------

    def start(self) -> None:
        self._relay = asyncio.create_task(self._relay_forever(), name="reply-relay")

    async def stop(self) -> None:
        await cancel_and_wait(self._relay)

    async def _relay_forever(self) -> None:
        """One pub/sub connection per gateway; re-subscribed after a Redis outage."""
        while True:
            pubsub = self._store.raw.pubsub(ignore_subscribe_messages=True)
            try:
                # A channel of the gateway's own keeps the connection subscribed
                # (and listening) while no device is connected.
                channels = [f"{REPLY_PREFIX}{sid}" for sid in self.sessions]
                await pubsub.subscribe(f"{REPLY_PREFIX}gateway", *channels)
                while True:
                    await self._apply_subscriptions(pubsub)
                    message = await pubsub.get_message(timeout=0.2)
                    if message is not None:
                        await self._relay_one(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reply relay lost Redis (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _apply_subscriptions(self, pubsub: object) -> None:
        while not self._subscribe_queue.empty():
            action, session_id = self._subscribe_queue.get_nowait()
            await getattr(pubsub, action)(f"{REPLY_PREFIX}{session_id}")

    async def _relay_one(self, channel: bytes, data: bytes) -> None:
        session = self.sessions.get(channel.decode().removeprefix(REPLY_PREFIX))
        if session is None:
            REPLIES.labels("dropped").inc()
            return
        kind = await session.deliver_reply(data)
        REPLIES.labels(kind).inc()
