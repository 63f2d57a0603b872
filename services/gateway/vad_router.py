"""Pinning sessions to VAD replicas, and moving them when a replica is lost.

VAD is stateful per stream, so each session's audio must go to one replica.
A session is pinned by rendezvous hashing of its id over the replicas that
are connected: every gateway agrees on the pin without coordination, and
losing a replica moves only the sessions that were on it. The target is a
comma-separated list of ``host:port`` or ``dns:///name:port``; a DNS name
(a headless Service in Kubernetes) is re-resolved periodically so replicas
that come and go are picked up.

Opening a stream (with the audio it must replay) is planned here rather than
done by each session on its own: sessions that need a stream queue up, and
one task opens them in order while the chosen replica's backlog has room. A
thousand sessions moving at once therefore wait their turn instead of
overflowing the queue, and nothing a single session does can stop the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Gauge

from services.common.tasks import cancel_and_wait
from services.gateway.audio_path import audio_path_settings
from services.gateway.targets import parse_target, resolve
from services.gateway.vad_client import EventHandler, VadStreamClient

log = logging.getLogger(__name__)

LostHandler = Callable[[VadStreamClient], None]

PENDING_OPENS = Gauge(
    "speechfront_gateway_vad_pending_opens",
    "Sessions waiting for a VAD stream (moved off a lost replica, refused or shed).",
)

# When no waiting session could be opened in a full pass, wait this long for
# the backlogs to drain before trying again.
_NO_ROOM_PAUSE_S = 0.02


class StreamOpener(Protocol):
    """A session's side of a planned open."""

    def try_open(self) -> bool:
        """Open the stream it waits for (True), or report no room yet (False).

        True also when the session no longer needs a stream.
        """
        ...


def _score(session_id: str, address: str) -> int:
    digest = hashlib.blake2b(f"{session_id}|{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class VadRouter:
    def __init__(
        self,
        target: str,
        on_event: EventHandler,
        on_lost: LostHandler,
        refresh_s: float = 5.0,
        max_backlog: int = 20_000,
        progress_timeout_s: float = 10.0,
    ) -> None:
        self._on_event = on_event
        self._progress_timeout_s = progress_timeout_s
        self._on_lost = on_lost
        self._refresh_s = refresh_s
        self._max_backlog = max_backlog
        addresses, self._dns_name = parse_target(target)
        self.clients: dict[str, VadStreamClient] = {}
        for address in addresses:
            self._add(address)
        self._refresher: asyncio.Task[None] | None = None
        # Sessions waiting for a stream, in the order they asked (each once).
        self._waiting: OrderedDict[int, StreamOpener] = OrderedDict()
        self._wake = asyncio.Event()
        self._opener: asyncio.Task[None] | None = None

    def _add(self, address: str) -> None:
        path = audio_path_settings()
        self.clients[address] = VadStreamClient(
            address,
            self._on_event,
            self._on_lost,
            max_backlog=self._max_backlog,
            progress_timeout_s=self._progress_timeout_s,
            wire=path.vad_wire,
            send_tick_s=path.vad_send_tick_ms / 1000,
        )

    def start(self) -> None:
        for client in self.clients.values():
            client.start()
        self._opener = asyncio.create_task(self._open_waiting(), name="vad-opener")
        if self._dns_name is not None:
            self._refresher = asyncio.create_task(self._refresh_forever(), name="vad-dns")

    async def stop(self) -> None:
        await cancel_and_wait(self._refresher)
        await cancel_and_wait(self._opener)
        await asyncio.gather(*(client.stop() for client in self.clients.values()))

    @property
    def any_connected(self) -> bool:
        return any(client.connected.is_set() for client in self.clients.values())

    def pick(self, session_id: str, avoid: VadStreamClient | None = None) -> VadStreamClient:
        """The session's replica: highest hash among the preferred ones (connected,
        not recently stalled), else among connected ones, else among all."""
        if not self.clients:
            raise RuntimeError("no VAD replicas known yet")
        others = [(a, c) for a, c in self.clients.items() if c is not avoid]
        candidates = (
            [(a, c) for a, c in others if c.preferred]
            or [(a, c) for a, c in others if c.connected.is_set()]
            or list(self.clients.items())
        )
        return max(candidates, key=lambda item: _score(session_id, item[0]))[1]

    # -- planned opens ---------------------------------------------------

    def request_open(self, opener: StreamOpener) -> None:
        """Queue a session for a stream; asking again keeps its place."""
        self._waiting.setdefault(id(opener), opener)
        PENDING_OPENS.set(len(self._waiting))
        self._wake.set()

    def cancel_open(self, opener: StreamOpener) -> None:
        self._waiting.pop(id(opener), None)
        PENDING_OPENS.set(len(self._waiting))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def _open_waiting(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                if not self.open_pass():
                    await asyncio.sleep(_NO_ROOM_PAUSE_S)
                else:
                    # Let frames and events flow between passes.
                    await asyncio.sleep(0)

    def open_pass(self) -> bool:
        """Try every waiting session once, in order; True if any was opened."""
        progressed = False
        for key, opener in list(self._waiting.items()):
            try:
                opened = opener.try_open()
            except Exception:
                log.exception("opening a VAD stream failed; the session is skipped")
                opened = True
            if opened:
                self._waiting.pop(key, None)
                progressed = True
        PENDING_OPENS.set(len(self._waiting))
        return progressed

    # -- membership --------------------------------------------------------

    async def _refresh_forever(self) -> None:
        assert self._dns_name is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                found = await loop.run_in_executor(None, resolve, self._dns_name)
            except OSError as exc:
                log.warning("resolving %s failed: %s", self._dns_name, exc)
                found = list(self.clients)
            for address in found:
                if address not in self.clients:
                    log.info("VAD replica %s appeared", address)
                    self._add(address)
                    self.clients[address].start()
            for address in [a for a in self.clients if a not in found]:
                log.info("VAD replica %s is gone", address)
                client = self.clients.pop(address)
                await client.stop()
                try:
                    self._on_lost(client)
                except Exception:
                    log.exception("re-pinning sessions after losing %s failed", address)
            await asyncio.sleep(self._refresh_s)
