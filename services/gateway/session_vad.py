"""The VAD streams of one session: opening, feeding, re-pinning and closing them.

In ``auto`` and ``realtime`` mode each listen period is a VAD stream whose
origin is the buffer offset at ``listen start``, so VAD events point straight
into the session's audio. A stream this session needs but does not have yet
(just asked for, moved off a lost replica, refused, or shed because the
replica's backlog was full) is *wanted*: its audio keeps accumulating in the
buffer and is replayed when the router opens it, so nothing said meanwhile is
lost.

Everything here runs on the event loop and never raises into its callers:
the VAD client's background tasks and the device's receive loop both call in.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.common.audio import SAMPLE_RATE, ms_to_samples
from services.gateway import metrics
from services.gateway.utterances import PRE_ROLL, UtteranceCutter
from services.gateway.vad_client import VadStreamClient
from services.gateway.vad_router import VadRouter
from services.protos import vad_pb2

log = logging.getLogger(__name__)

# Audio replayed to a new VAD replica goes in 120 ms frames.
REPLAY_FRAME_SAMPLES = SAMPLE_RATE * 120 // 1000
# A refused VAD stream is re-opened at once, then after pauses doubling from
# 0.25 s to 2 s: a replica at its stream limit would otherwise be asked again
# in a tight loop. Refusals further apart than this start the count afresh.
REFUSAL_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0)
REFUSAL_RESET_S = 10.0

# (start, end, cause): a span of the session's audio the VAD marked as speech.
SpeechHandler = Callable[[int, int, str], None]
EventHandler = Callable[[vad_pb2.SpeechEvent], None]


class StreamDirectory(Protocol):
    """Where VAD events for a stream id are routed (the gateway's hub)."""

    def bind_stream(self, stream_id: str, handler: EventHandler) -> None: ...

    def unbind_stream(self, stream_id: str) -> None: ...


@dataclass
class _Stream:
    stream_id: str
    client: VadStreamClient
    speech_start: int | None = None
    stopped_at: int | None = None
    # Speech a lost stream had begun, replayed here but not yet confirmed by
    # this stream's VAD: if this one is lost too, the next replay still starts there.
    carried_start: int | None = None
    # The newest sample the replica is through with (the stream's origin until
    # it acknowledges a frame), and (client op number, end sample) of every
    # frame sent since: see ``SessionVad.oldest_needed``.
    done_to: int = 0
    sent: deque[tuple[int, int]] = field(default_factory=deque)


@dataclass
class _Want:
    """A stream the session waits for."""

    replay_from: int
    avoid: VadStreamClient | None
    # Speech already known to be in progress at ``replay_from``.
    speech_start: int | None


class SessionVad:
    def __init__(
        self,
        session_id: str,
        router: VadRouter,
        directory: StreamDirectory,
        cutter: UtteranceCutter,
        silence_ms: int,
        on_speech: SpeechHandler,
    ) -> None:
        self._session_id = session_id
        self._router = router
        self._directory = directory
        self._cutter = cutter
        self._silence_ms = silence_ms
        # How far behind what a replica has been through a start it has not
        # reported may lie: PRE_ROLL covers FSMN-VAD (~0.45 s); Silero confirms
        # a start only after a pause shorter than the silence window, so it
        # may report it that much later.
        self._lookback = max(PRE_ROLL, ms_to_samples(silence_ms) + PRE_ROLL // 2)
        self._on_speech = on_speech
        # Streams still open: a stopped listen period's stream stays until VAD
        # confirms it closed, so its last END is not lost when a new period
        # has already begun.
        self._streams: dict[str, _Stream] = {}
        self._current: _Stream | None = None
        self._want: _Want | None = None
        self._count = 0
        self._seq = 0
        self._refusals = 0
        self._last_refusal = 0.0
        self._retry: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        """Listening through VAD: a stream is open or wanted."""
        return self._current is not None or self._want is not None

    @property
    def in_speech(self) -> bool:
        """The open stream has reported a speech start and no end yet."""
        return self._current is not None and self._current.speech_start is not None

    @property
    def replica(self) -> VadStreamClient | None:
        """Where the open stream is, if one is."""
        return None if self._current is None else self._current.client

    @property
    def busy(self) -> bool:
        """Some stream has not confirmed its close yet."""
        return bool(self._streams)

    # -- listen periods ----------------------------------------------------

    def start(self) -> None:
        self._ask(_Want(self._cutter.end, None, None))

    def stop(self) -> None:
        """End the listen period: speech in progress ends at the last frame."""
        want = self._drop_want()
        if want is not None and want.speech_start is not None:
            # Speech was in progress when its stream was lost: it ends here.
            self._on_speech(want.speech_start, self._cutter.end, "listen_stop")
        if self._current is not None:
            # VAD answers the flush with an end event for speech in progress.
            self._current.client.close(self._current.stream_id, flush=True)
            self._current.stopped_at = self._cutter.end
            self._current = None

    def close(self) -> None:
        """The session is over: drop every stream without waiting for VAD."""
        self._drop_want()
        for stream in list(self._streams.values()):
            stream.client.close(stream.stream_id, flush=False)
            self._forget(stream)

    def oldest_needed(self) -> int:
        """The oldest sample a stream may still ask for: a speech start the VAD
        reported or may yet report, or a replay's origin.

        The VAD reports a start less than the look-back (``PRE_ROLL``, or
        more for a long silence window) behind the audio it has been through
        when it finds it, so what a stream may still report lies at most that
        far before the newest audio its replica has acknowledged. That bound
        follows the replica's real lag, whatever holds the audio meanwhile:
        this gateway's queue, the wire, the replica's backlog, or a replay
        burst being caught up with.
        """
        oldest = self._cutter.end - self._lookback
        for stream in self._streams.values():
            oldest = min(oldest, self._done_to(stream) - self._lookback)
            for start in (stream.speech_start, stream.carried_start):
                if start is not None:
                    oldest = min(oldest, start)
        if self._want is not None:
            oldest = min(oldest, self._want.replay_from)
        return oldest

    @staticmethod
    def _done_to(stream: _Stream) -> int:
        """The newest sample of ``stream`` its replica is through with."""
        done, sent = stream.client.ops_done, stream.sent
        while sent and sent[0][0] <= done:
            stream.done_to = sent.popleft()[1]
        return stream.done_to

    # -- audio -----------------------------------------------------------

    def feed(self, pcm: bytes) -> None:
        """New audio (already in the cutter's buffer) for the open stream."""
        stream = self._current
        if stream is None:
            return
        if not stream.client.has_room():
            self._shed(stream)
            return
        self._seq += 1
        stream.client.send(stream.stream_id, self._seq, pcm)
        stream.sent.append((stream.client.ops_queued, self._cutter.end))
        start = stream.speech_start
        if start is not None and self._cutter.too_long(start):
            stream.speech_start = self._cutter.end
            self._on_speech(start, self._cutter.end, "max_length")

    def _shed(self, stream: _Stream) -> None:
        """The replica's backlog is full: give the stream up and wait for room."""
        metrics.VAD_SHED.inc()
        stream.client.close(stream.stream_id, flush=False)
        self._forget(stream)
        self._ask(self._resume_point(stream), queue=True)

    # -- events from the VAD ---------------------------------------------

    def on_event(self, event: vad_pb2.SpeechEvent) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        kind = event.kind
        if kind == vad_pb2.SpeechEvent.SPEECH_START:
            stream.speech_start = ms_to_samples(event.offset_ms)
            stream.carried_start = None
        elif kind == vad_pb2.SpeechEvent.SPEECH_END:
            start, stream.speech_start = stream.speech_start, None
            stream.carried_start = None
            if start is not None:
                self._on_speech(start, ms_to_samples(event.offset_ms), "vad")
        elif kind == vad_pb2.SpeechEvent.STREAM_CLOSED:
            self._forget(stream)
        elif kind == vad_pb2.SpeechEvent.STREAM_ERROR:
            log.warning("session %s: VAD refused stream: %s", self._session_id, event.detail)
            if stream is self._current:
                self._forget(stream)
                self._ask_after_refusal(self._resume_point(stream))
            else:
                self._end_stopped(stream)

    def on_lost(self, client: VadStreamClient) -> None:
        """A VAD replica is gone: ask for a stream elsewhere, replaying the unfinished audio."""
        for stream in [s for s in self._streams.values() if s.client is client]:
            if stream is self._current:
                metrics.VAD_REPLAYS.inc()
                self._forget(stream)
                self._ask(self._resume_point(stream), queue=True)
            else:
                self._end_stopped(stream)

    def _end_stopped(self, stream: _Stream) -> None:
        """A stopped period whose end never came: its speech ended at the stop."""
        start = stream.speech_start if stream.speech_start is not None else stream.carried_start
        if start is not None:
            end = stream.stopped_at if stream.stopped_at is not None else self._cutter.end
            self._on_speech(start, end, "vad_lost")
        self._forget(stream)

    def _resume_point(self, stream: _Stream) -> _Want:
        start = stream.speech_start if stream.speech_start is not None else stream.carried_start
        if start is not None:
            return _Want(start, stream.client, start)
        # Speech may have begun without its start reaching us yet: it began
        # at most the look-back before what the lost replica had been through.
        floor = max(self._cutter.replay_floor, self._done_to(stream) - self._lookback)
        return _Want(floor, stream.client, None)

    # -- opening ---------------------------------------------------------

    def _ask(self, want: _Want, queue: bool = False) -> None:
        self._drop_want()
        self._want = want
        if queue or not self.try_open():
            self._router.request_open(self)

    def _ask_after_refusal(self, want: _Want) -> None:
        now = time.monotonic()
        if now - self._last_refusal > REFUSAL_RESET_S:
            self._refusals = 0
        self._last_refusal = now
        delay = REFUSAL_BACKOFF_S[min(self._refusals, len(REFUSAL_BACKOFF_S) - 1)]
        self._refusals += 1
        if delay == 0:
            self._ask(want)
            return
        self._drop_want()
        # Audio that arrives during the pause is replayed to the new stream.
        self._want = want

        def ask() -> None:
            self._retry = None
            if self._want is want:
                self._router.request_open(self)

        self._retry = asyncio.get_running_loop().call_later(delay, ask)

    def try_open(self) -> bool:
        """Open the wanted stream if its replica has room (the router calls this)."""
        want = self._want
        if want is None:
            return True
        buffer = self._cutter.buffer
        origin = max(want.replay_from, buffer.start)
        replay = buffer.slice(origin, buffer.end)
        step = REPLAY_FRAME_SAMPLES * 2
        client = self._router.pick(self._session_id, avoid=want.avoid)
        if not client.has_room(1 + math.ceil(len(replay) / step)):
            return False
        self._want = None
        self._count += 1
        # The replay finds the speech start again; it is not carried over, so a
        # start the new replica does not confirm cannot leave a segment open.
        stream = _Stream(f"{self._session_id}/{self._count}", client, done_to=origin)
        stream.carried_start = want.speech_start
        self._streams[stream.stream_id] = stream
        self._current = stream
        self._directory.bind_stream(stream.stream_id, self.on_event)
        self._seq = 0
        client.open(stream.stream_id, start_sample=origin, silence_ms=self._silence_ms)
        for offset in range(0, len(replay), step):
            self._seq += 1
            client.send(stream.stream_id, self._seq, replay[offset : offset + step])
            stream.sent.append((client.ops_queued, origin + min(offset + step, len(replay)) // 2))
        return True

    def _drop_want(self) -> _Want | None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        want, self._want = self._want, None
        if want is not None:
            self._router.cancel_open(self)
        return want

    def _forget(self, stream: _Stream) -> None:
        self._streams.pop(stream.stream_id, None)
        self._directory.unbind_stream(stream.stream_id)
        if stream is self._current:
            self._current = None
