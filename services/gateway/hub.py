"""What a gateway's sessions share, and the routing of events to them.

VAD events arrive on shared streams keyed by stream id; backend replies arrive
on Redis pub/sub channels keyed by session id (``sf:reply:<session_id>``). The
hub hands each to the one session it belongs to, so a device only ever sees
its own.

A device has at most one session on a gateway: when a new one is accepted for
the same ``Device-Id`` (after its token and hello), the older connection is
closed with a normal closure, code 1000, reason ``REPLACED_REASON``. Results
it still had in flight go to the device's undelivered list as for any closed
connection, and are handed to the new session once the old one has closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
# One channel per gateway for gateways to tell each other about a device that
# moved: "replace" (close your session, the device connected here) and
# "redeliver" (results of the closed session are waiting in Redis).
CONTROL_PREFIX = "sf:control:"

# How a replaced connection is closed: a normal closure (the device did nothing
# wrong; its newer connection carries on), with a reason saying why.
REPLACED_CODE = 1000
REPLACED_REASON = "replaced by a new connection for this device"


class SessionHub:
    def __init__(self, store: SessionStore, gateway_id: str = "gateway") -> None:
        self._gateway_id = gateway_id
        self._control = f"{CONTROL_PREFIX}{gateway_id}"
        # Sessions closed for a device that moved to another gateway: where to
        # say that their undelivered results are waiting (gateway, session).
        self._moved: dict[str, tuple[str, str]] = {}
        self.sessions: dict[str, DeviceSession] = {}
        # Each device's current session on this gateway.
        self.devices: dict[str, DeviceSession] = {}
        # Sessions closed because a newer one took their device, until they have closed.
        self._replaced: set[str] = set()
        self._by_stream: dict[str, Callable[[vad_pb2.SpeechEvent], None]] = {}
        self._store = store
        self._subscribe_queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._relay: asyncio.Task[None] | None = None

    # -- sessions --------------------------------------------------------

    def add(self, session: DeviceSession) -> DeviceSession | None:
        """Register a session as its device's current one; return the one it replaces."""
        self.sessions[session.session_id] = session
        metrics.SESSIONS.set(len(self.sessions))
        self._subscribe_queue.put_nowait(("subscribe", session.session_id))
        previous = self.devices.get(session.device_id)
        self.devices[session.device_id] = session
        if previous is None or previous is session:
            return None
        self._replaced.add(previous.session_id)
        return previous

    async def replace(self, previous: DeviceSession) -> None:
        """Close a session whose device has connected again; its own task then ends it."""
        metrics.CLOSES.labels("replaced").inc()
        log.info(
            "session %s of device %s: replaced by a new connection",
            previous.session_id,
            previous.device_id,
        )
        await previous.link.close(REPLACED_CODE, REPLACED_REASON)

    def remove(self, session: DeviceSession) -> None:
        self.sessions.pop(session.session_id, None)
        if self.devices.get(session.device_id) is session:
            del self.devices[session.device_id]
        metrics.SESSIONS.set(len(self.sessions))
        self._subscribe_queue.put_nowait(("unsubscribe", session.session_id))

    async def announce(self, session: DeviceSession) -> None:
        """Before recording a new session: if its device's last session is on another
        gateway, ask that gateway to close it (one connection per device)."""
        route = await self._store.device_route(session.device_id)
        old_session, old_gateway = route.get("session_id"), route.get("gateway_id")
        if not old_session or not old_gateway or old_gateway == self._gateway_id:
            return
        message = {"replace": old_session, "by": session.session_id, "gateway": self._gateway_id}
        await self._store.publish(f"{CONTROL_PREFIX}{old_gateway}", json.dumps(message))

    async def closed(self, session: DeviceSession) -> None:
        """After a replaced session has closed: the results it could not deliver any
        more went to the device's undelivered list after the new session had read
        it, so the new session reads it again."""
        if session.session_id in self._replaced:
            self._replaced.discard(session.session_id)
            current = self.devices.get(session.device_id)
            if current is not None:
                await current.deliver_undelivered()
        elif (moved := self._moved.pop(session.session_id, None)) is not None:
            gateway, new_session = moved
            message = json.dumps({"redeliver": new_session})
            await self._store.publish(f"{CONTROL_PREFIX}{gateway}", message)

    async def _on_control(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("unreadable control message on %s", self._control)
            return
        if not isinstance(message, dict):
            return
        if (session := self.sessions.get(str(message.get("replace")))) is not None:
            self._moved[session.session_id] = (str(message.get("gateway")), str(message.get("by")))
            await self.replace(session)
        elif (session := self.sessions.get(str(message.get("redeliver")))) is not None:
            await session.deliver_undelivered()

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
                # The gateway's control channel also keeps the connection
                # subscribed (and listening) while no device is connected.
                channels = [f"{REPLY_PREFIX}{sid}" for sid in self.sessions]
                await pubsub.subscribe(self._control, *channels)
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
        if channel.decode() == self._control:
            await self._on_control(data)
            return
        session = self.sessions.get(channel.decode().removeprefix(REPLY_PREFIX))
        if session is None:
            REPLIES.labels("dropped").inc()
            return
        kind = await session.deliver_reply(data)
        REPLIES.labels(kind).inc()
