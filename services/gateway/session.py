"""One device's session: the listen state machine, coordinating its parts.

- ``UtteranceCutter`` holds the session's audio and cuts utterances from it;
- ``SessionVad`` owns the listen period's VAD streams (auto, realtime);
- ``DeliveryQueue`` recognises utterances concurrently and delivers the
  results in order, through the shared ``Recognizer``;
- ``DeviceLink`` is the WebSocket.

In ``manual`` mode the utterance is everything between ``listen start`` and
``listen stop``; the VAD is not involved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from services.common.memory import HEAP
from services.gateway import metrics
from services.gateway.context import GatewayContext
from services.gateway.delivery import DeliveryQueue
from services.gateway.device_link import DeviceLink
from services.gateway.errors import GOING_RESTART, INVALID_PAYLOAD, ConnectionRejected
from services.gateway.limits import bounded_json, short_text
from services.gateway.messages import LISTEN_MODES, LISTEN_STATES, declared_language
from services.gateway.recognition import Speaker
from services.gateway.session_vad import SessionVad
from services.gateway.utterances import CutLimits, UtteranceCutter
from services.gateway.vad_client import VadStreamClient
from services.protos import vad_pb2

log = logging.getLogger(__name__)

# Roughly what a connected session holds besides its audio (the ASGI and
# WebSocket objects, the Opus decoder's 18 kB, bookkeeping).
SESSION_BYTES = 64_000


class DeviceSession:
    def __init__(
        self,
        ctx: GatewayContext,
        link: DeviceLink,
        *,
        session_id: str,
        device_id: str,
        client_id: str,
    ) -> None:
        self.ctx = ctx
        self.session_id = session_id
        self.device_id = device_id
        self.client_id = client_id
        self.link = link
        self._who = Speaker(session_id, device_id)
        settings = ctx.settings
        self._cutter = UtteranceCutter(CutLimits.from_settings(settings))
        self.vad = SessionVad(
            session_id,
            ctx.vad,
            ctx.hub,
            self._cutter,
            settings.vad_silence_ms,
            self._finish_utterance,
        )
        self._delivery = DeliveryQueue(settings.max_inflight_utterances, f"session {session_id}")
        self.mode: str | None = None
        self._manual_start: int | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._last_activity = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the device last sent anything or was sent a backend message."""
        return time.monotonic() - self._last_activity

    # -- device messages -------------------------------------------------

    async def handle_message(self, message: dict[str, Any]) -> None:
        self._last_activity = time.monotonic()
        kind = message["type"]
        if kind == "listen":
            self._handle_listen(message)
        elif kind == "abort":
            self._record({"last_abort": short_text(message.get("reason", ""))})
        elif kind == "hello":
            log.info("session %s: repeated hello ignored", self.session_id)
        else:
            # mcp and anything newer firmware sends: tolerated, not ours to act on.
            log.debug("session %s: message type %r ignored", self.session_id, kind)

    def _handle_listen(self, message: dict[str, Any]) -> None:
        state = message.get("state")
        if state not in LISTEN_STATES:
            raise ConnectionRejected(
                INVALID_PAYLOAD, f"listen state must be one of {LISTEN_STATES}"
            )
        if state == "start":
            mode = message.get("mode", "auto")
            if mode not in LISTEN_MODES:
                raise ConnectionRejected(
                    INVALID_PAYLOAD, f"listen mode must be one of {LISTEN_MODES}"
                )
            self._start_listening(mode)
        elif state == "stop":
            self._stop_listening()
        else:
            self._record({"last_wake_word": short_text(message.get("text", ""))})

    def _start_listening(self, mode: str) -> None:
        self._stop_listening()
        self.mode = mode
        self._cutter.mark_listen_start()
        if mode == "manual":
            self._manual_start = self._cutter.end
        else:
            self.vad.start()
        self._record({"mode": mode, "listening": "1"})

    def _stop_listening(self) -> None:
        if self._manual_start is not None:
            self._finish_utterance(self._manual_start, self._cutter.end, "listen_stop")
            self._manual_start = None
        self.vad.stop()
        if self.mode is not None:
            self._record({"listening": "0"})
        self.mode = None

    # -- audio -----------------------------------------------------------

    def handle_audio(self, pcm: bytes) -> None:
        self._last_activity = time.monotonic()
        metrics.FRAMES.inc()
        self._cutter.append(pcm)
        if self._manual_start is not None:
            if self._cutter.too_long(self._manual_start):
                start, self._manual_start = self._manual_start, self._cutter.end
                self._finish_utterance(start, self._cutter.end, "max_length")
        else:
            self.vad.feed(pcm)
            # Audio no VAD stream can ask for any more: memory follows speech.
            # Every frame, as the buffer is a ring (dropping costs nothing), so a
            # quiet session holds about the look-back plus its replica's lag.
            self._cutter.buffer.discard_before(self.vad.oldest_needed())

    def on_vad_event(self, event: vad_pb2.SpeechEvent) -> None:
        self.vad.on_event(event)

    def on_vad_lost(self, client: VadStreamClient) -> None:
        self.vad.on_lost(client)

    # -- utterances --------------------------------------------------------

    def _finish_utterance(self, start: int, end: int, cause: str) -> None:
        if self._delivery.full:
            self._cutter.skip(end)
            metrics.UTTERANCES.labels("dropped_backlog").inc()
            log.warning("session %s: too many utterances awaiting results", self.session_id)
            return
        utterance = self._cutter.cut(start, end, cause)
        if utterance is None:
            return
        recognizer = self.ctx.recognizer
        self._delivery.submit(
            recognizer.compute(self._who, utterance),
            lambda result: recognizer.publish(self._who, result, self.link.send_json),
        )

    # -- from the backend and from earlier sessions ------------------------

    async def deliver_reply(self, data: bytes) -> str:
        """Forward a backend message: JSON as a text frame, anything else as Opus audio."""
        self._last_activity = time.monotonic()
        if data[:1] == b"{":
            try:
                message = json.loads(data)
            except ValueError:
                return "dropped"
            message["session_id"] = self.session_id
            return "json" if await self.link.send_json(message) else "dropped"
        return "audio" if await self.link.send_opus(data) else "dropped"

    async def deliver_undelivered(self) -> None:
        """Results computed for this device while it was away, oldest first."""
        store = self.ctx.store
        for message in await store.take_undelivered(self.device_id):
            message.setdefault("original_session_id", message.get("session_id"))
            message["session_id"] = self.session_id
            message["redelivered"] = True
            if not await self.link.send_json(message):
                await store.save_undelivered(self.device_id, message)

    # -- lifecycle -------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop listening: speech in progress ends now and is still recognised."""
        self._stop_listening()

    async def wait_idle(self, timeout: float) -> bool:
        """Until every utterance has its result and every VAD stream is closed
        (bounded); whether that happened in time."""
        deadline = time.monotonic() + timeout
        await self._delivery.wait_idle(timeout)
        while self.vad.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._delivery.pending:
            # Ends that arrived while waiting for the streams.
            await self._delivery.wait_idle(max(0.0, deadline - time.monotonic()))
        return not self._delivery.pending and not self.vad.busy

    def unfinished(self) -> str:
        """What it still waits for, for a log line."""
        return f"{self._delivery.pending} utterances being recognised, VAD busy: {self.vad.busy}"

    def record_connected(
        self, client_id: str, protocol_version: int, hello: dict[str, Any]
    ) -> None:
        language = declared_language(hello)
        if language:
            # Every utterance of this connection is recognised in it.
            self._who = Speaker(self.session_id, self.device_id, language)
        self._record(
            {
                "session_id": self.session_id,
                "device_id": self.device_id,
                "client_id": client_id,
                "gateway_id": self.ctx.settings.gateway_id,
                "protocol_version": str(protocol_version),
                "audio_params": bounded_json(hello.get("audio_params", {})),
                "features": bounded_json(hello.get("features", {})),
                "language": language or "",
                "connected_at": str(time.time()),
            }
        )

    def _record(self, fields: dict[str, Any]) -> None:
        task = asyncio.create_task(
            self.ctx.store.save_session(self.session_id, self.device_id, fields)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close_for_restart(self) -> None:
        """Close the device socket with 1012 (service restart): devices reconnect."""
        await self.link.close(GOING_RESTART, "gateway restarting, please reconnect")

    async def close(self) -> None:
        self.vad.close()
        # Once enough sessions have gone, collect what they leave (mostly
        # reference cycles) and give the heap back: an idle gateway would
        # otherwise keep its peak. The estimate only paces the trims.
        HEAP.released(SESSION_BYTES + 2 * self._cutter.buffer.capacity)
        HEAP.trim_soon()
        await self._delivery.wait_idle(self.ctx.settings.asr_timeout_s * 2)
        await self.ctx.store.save_session(
            self.session_id, self.device_id, {"disconnected_at": str(time.time())}
        )


def new_session_id() -> str:
    return uuid.uuid4().hex
