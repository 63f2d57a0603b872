"""Live VAD streams of one replica and the tick loop that advances them together.

Every gRPC connection (one per gateway) owns the streams it opened; a stream
is keyed by (connection, stream id), so no connection can touch another's
detector. Each tick steps every stream with new audio (or a pending flush)
on the inference thread, and the resulting events are routed back to the
owning connection.

What runs on the inference thread, and how a tick's memory stays bounded,
is in ``services.vad.stepping``.

A connection's request batch is acknowledged once every one of its streams
has been stepped through the audio it had when the batch was read (with
``max_step_s`` at least ``max_backlog_s``, the defaults, that is the tick
after it was read), so the gateway can tell how far behind a replica is and
how much audio it must keep to cut or replay what the replica may still
report.

The engine belongs to the inference thread (see ``VadEngine``): the event loop
never calls it. Opens and closes are only recorded here, in the order they
were asked for, and each tick hands them to the inference thread, which
applies them just before its step. So a stream opened while a step runs
cannot be given state that step is still writing; its frames are stepped in
the first tick after its open, together with the open; and the state of a
flushed stream is dropped in the tick after the one that stepped its flush.
Ticks never overlap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge

from services.common import metrics
from services.common.audio import BYTES_PER_SAMPLE, SAMPLE_RATE, samples_to_ms
from services.common.inference import InferenceThread
from services.common.memory import HeapTrimmer, malloc_trim
from services.common.tasks import cancel_and_wait
from services.protos import vad_pb2
from services.vad.engine import VadEngine
from services.vad.stepping import (
    STUCK_FLOOR_S,
    Change,
    Close,
    Open,
    TimedInference,
    Work,
    apply_then_step,
    take,
)

log = logging.getLogger(__name__)

STREAMS = Gauge("speechfront_vad_streams", "Live VAD streams on this replica.")
FRAMES = Counter("speechfront_vad_frames_total", "Audio frames received.")
EVENTS = Counter("speechfront_vad_events_total", "Speech events emitted, by kind.", ["kind"])
STREAM_ERRORS = Counter(
    "speechfront_vad_stream_errors_total", "Streams failed or refused, by reason.", ["reason"]
)
TICK_LAG = Gauge(
    "speechfront_vad_tick_lag_seconds", "How late the last tick started against its schedule."
)


# Events for one connection, and (as ints) the request batches acknowledged.
Outbox = asyncio.Queue[vad_pb2.SpeechEvent | int]


@dataclass
class _Stream:
    key: tuple[int, str]
    outbox: Outbox
    origin_ms: int
    engine_id: str
    pending: list[np.ndarray] = field(default_factory=list)
    pending_samples: int = 0
    last_seq: int = -1
    flush: bool = False


_NO_SAMPLES = np.zeros(0, dtype="<i2")

# A tick with no audio trims what the busy ticks freed once this long has
# passed since the last trim: nobody faults those pages back in meanwhile.
QUIET_TRIM_INTERVAL_S = 1.0

# Streams whose owner was told they are not open, remembered at most (then
# forgotten wholesale: the worst case is one more error event).
_MAX_TOLD = 10_000


class StreamTable:
    def __init__(
        self,
        engine: VadEngine,
        inference: InferenceThread,
        *,
        default_silence_ms: int,
        tick_ms: int,
        max_streams: int,
        max_backlog_s: float,
        max_step_s: float = 10.0,
        chunk_audio_s: float = 30.0,
        trimmer: HeapTrimmer | None = None,
    ) -> None:
        self._engine = engine
        self._inference = TimedInference(inference)
        self._default_silence_ms = default_silence_ms
        self._tick_s = tick_ms / 1000
        self._max_streams = max_streams
        self._max_backlog = int(max_backlog_s * SAMPLE_RATE)
        self._max_step = int(max_step_s * SAMPLE_RATE)
        self._chunk = max(1, int(chunk_audio_s * SAMPLE_RATE))
        # Gives back the heap ticks used: every ten seconds at most while
        # streams are stepped, since the next ticks fault those pages straight
        # back in (at 300 streams a trim every 2 s cost ~3 % of the replica's
        # CPU, 1.6-4.4 % in four paired runs); sooner once a tick finds no
        # audio (QUIET_TRIM_INTERVAL_S), and at once when the last stream leaves.
        self._trimmer = trimmer or HeapTrimmer(min_interval_s=10.0, min_released_bytes=32 << 20)
        self._streams: dict[tuple[int, str], _Stream] = {}
        # Opens and closes not yet applied to the engine, in request order.
        self._changes: list[Change] = []
        self._told: set[tuple[int, str]] = set()
        # Per connection: its outbox and the last request batch read, and the
        # last batch acknowledged (once a tick has completed after reading it).
        self._received: dict[int, tuple[Outbox, int]] = {}
        self._acked: dict[int, int] = {}
        self._ticker: asyncio.Task[None] | None = None
        # Held from collecting a tick's work until its events are routed.
        self._ticking = asyncio.Lock()
        # The last stream left since the last quiet tick (see _step).
        self._emptied = False

    @staticmethod
    def engine_id(key: tuple[int, str]) -> str:
        return f"{key[0]}/{key[1]}"

    def open(self, conn: int, outbox: Outbox, request: vad_pb2.StreamOpen) -> None:
        key = (conn, request.stream_id)
        if key not in self._streams and len(self._streams) >= self._max_streams:
            self._fail(
                outbox, request.stream_id, "max_streams", "VAD replica is at its stream limit"
            )
            self._remember_told(key)
            return
        # Re-opened under the same key: the old stream ends here, unflushed.
        self._forget(key)
        silence_ms = request.silence_ms or self._default_silence_ms
        engine_id = self.engine_id(key)
        self._changes.append(Open(engine_id, silence_ms))
        origin_ms = samples_to_ms(request.start_sample)
        self._streams[key] = _Stream(key, outbox, origin_ms, engine_id)
        STREAMS.set(len(self._streams))

    def feed(self, conn: int, outbox: Outbox, frame: vad_pb2.AudioFrame) -> None:
        FRAMES.inc()
        pcm = frame.pcm
        if len(pcm) % BYTES_PER_SAMPLE:
            stream = self._streams.get((conn, frame.stream_id))
            if stream is None or stream.flush:
                # Unknown or closing: answered as for any frame of such a stream.
                self._feed(conn, outbox, frame.stream_id, frame.seq, _NO_SAMPLES)
                return
            self._drop(
                stream,
                "bad_pcm",
                f"PCM length {len(pcm)} is not a whole number of 16-bit samples",
            )
            return
        # Kept as 16-bit until its tick: half the memory of float while it waits.
        self._feed(conn, outbox, frame.stream_id, frame.seq, np.frombuffer(pcm, dtype="<i2"))

    def feed_block(self, conn: int, outbox: Outbox, block: vad_pb2.FrameBlock) -> None:
        """Many streams' frames in columns (see ``FrameBlock``): one buffer, one view per frame."""
        ids, seqs, lengths = block.stream_ids, block.seqs, block.samples
        count = len(ids)
        if not count:
            return
        FRAMES.inc(count)
        pcm = block.pcm
        if len(seqs) != count or len(lengths) != count or len(pcm) != 2 * sum(lengths):
            # The columns disagree: no frame's samples can be trusted.
            for stream_id in dict.fromkeys(ids):
                stream = self._streams.get((conn, stream_id))
                if stream is not None:
                    self._drop(stream, "bad_pcm", "frame block lengths do not match its PCM")
            return
        # The views keep the block's one buffer alive until every stream's
        # tick has taken its piece: the next tick, normally.
        samples = np.frombuffer(pcm, dtype="<i2")
        offset = 0
        feed = self._feed
        for stream_id, seq, length in zip(ids, seqs, lengths, strict=True):
            end = offset + length
            feed(conn, outbox, stream_id, seq, samples[offset:end])
            offset = end

    def _feed(
        self, conn: int, outbox: Outbox, stream_id: str, seq: int, samples: np.ndarray
    ) -> None:
        key = (conn, stream_id)
        stream = self._streams.get(key)
        if stream is None:
            # Never opened on this connection (its open was lost): say so once,
            # so the owner re-opens instead of talking to nobody. Refused and
            # dropped streams were reported when that happened.
            if key not in self._told:
                self._remember_told(key)
                self._fail(outbox, stream_id, "unknown_stream", "stream is not open")
            return
        if stream.flush:
            return  # closing: nothing after the close is expected
        if seq <= stream.last_seq:
            self._drop(stream, "bad_seq", f"frame seq {seq} after {stream.last_seq}")
            return
        stream.last_seq = seq
        stream.pending.append(samples)
        stream.pending_samples += samples.size
        if stream.pending_samples > self._max_backlog:
            self._drop(stream, "backlog", "stream fell too far behind")

    def close(self, conn: int, request: vad_pb2.StreamClose) -> None:
        stream = self._streams.get((conn, request.stream_id))
        if stream is None:
            return
        if request.flush:
            stream.flush = True
        else:
            self._forget(stream.key)

    def note_batch(self, conn: int, outbox: Outbox, batch: int) -> None:
        """A request numbered ``batch`` was read; acknowledged after the next tick."""
        if batch:
            self._received[conn] = (outbox, batch)

    def drop_connection(self, conn: int) -> None:
        for key in [k for k in self._streams if k[0] == conn]:
            self._forget(key)
        self._received.pop(conn, None)
        self._acked.pop(conn, None)
        self._told = {k for k in self._told if k[0] != conn}

    def stuck(self, floor_s: float = STUCK_FLOOR_S) -> bool:
        """A tick's call to the inference thread has hung (see ``TimedInference``)."""
        return self._inference.stuck(floor_s)

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="vad-ticker")

    async def stop(self) -> None:
        await cancel_and_wait(self._ticker)

    async def _tick_forever(self) -> None:
        next_tick = time.monotonic()
        while True:
            now = time.monotonic()
            TICK_LAG.set(max(0.0, now - next_tick))
            try:
                await self.tick()
            except Exception:
                log.exception("VAD tick failed")
            next_tick = max(next_tick + self._tick_s, time.monotonic())
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))

    async def tick(self) -> None:
        """Step every stream with work (in groups), after the pending opens and closes.

        Ticks are serialised: a second call waits until the first has routed
        its events, so a flush is never stepped twice and a step's streams
        are still the ones it collected when its events come back.
        """
        async with self._ticking:
            await self._tick()

    async def _tick(self) -> None:
        received = dict(self._received)
        behind = await self._step()
        for conn, (outbox, batch) in received.items():
            if conn in behind:
                # Some of its audio is still waiting: the batch is not done yet.
                continue
            if conn in self._received and batch > self._acked.get(conn, 0):
                self._acked[conn] = batch
                self._send(outbox, batch)

    async def _step(self) -> set[int]:
        """Step every stream with work; returns the connections that have some
        of the audio they had before the step still pending (over ``max_step``)."""
        work: list[Work] = []
        behind: set[int] = set()
        stepped: dict[str, _Stream] = {}
        for stream in self._streams.values():
            if not stream.pending and not stream.flush:
                continue
            engine_id = stream.engine_id
            before = stream.pending_samples
            pieces = self._take(stream) if stream.pending else []
            taken = before - stream.pending_samples
            if stream.pending:
                behind.add(stream.key[0])
            # A flush applies once everything before it has been stepped.
            final = stream.flush and not stream.pending
            work.append(Work(engine_id, pieces, taken, final))
            stepped[engine_id] = stream
        changes, self._changes = self._changes, []
        if not stepped and not changes:
            if self._emptied:
                # The last stream has left and its close has been applied:
                # everything the ticks held goes back now, whatever the
                # trimmer's running estimate says (it is reset by the trims
                # under load and may be short of its threshold here).
                self._emptied = False
                await self._inference.run(0.0, malloc_trim)
            elif self._trimmer.due(QUIET_TRIM_INTERVAL_S):
                # Quiet now: give back what the last ticks freed, on the
                # thread whose arena holds it.
                await self._inference.run(
                    0.0, lambda: self._trimmer.maybe_trim(QUIET_TRIM_INTERVAL_S)
                )
            return behind
        started = time.monotonic()
        audio_s = sum(w.samples for w in work) / SAMPLE_RATE
        events = await self._inference.run(
            audio_s,
            lambda: apply_then_step(self._engine, changes, work, self._chunk, self._trimmer),
        )
        if stepped:
            metrics.MODEL_SECONDS.labels("vad").observe(time.monotonic() - started)
            metrics.BATCH_SIZE.labels("vad").observe(len(stepped))
            metrics.AUDIO_SECONDS.labels("vad").inc(audio_s)
        for event in events:
            owner = stepped.get(event.stream_id)
            if owner is None or not self._is_live(owner):
                # Closed, dropped or re-opened while the step ran: its owner
                # has been told all it will hear of that stream.
                continue
            kind = (
                vad_pb2.SpeechEvent.SPEECH_START
                if event.kind == "start"
                else vad_pb2.SpeechEvent.SPEECH_END
            )
            EVENTS.labels(event.kind).inc()
            self._send(
                owner.outbox,
                vad_pb2.SpeechEvent(
                    stream_id=owner.key[1],
                    kind=kind,
                    offset_ms=owner.origin_ms + event.offset_ms,
                    seq=max(owner.last_seq, 0),
                ),
            )
        for item in work:
            if not item.final:
                continue
            closed = stepped[item.engine_id]
            if not self._is_live(closed):
                continue
            self._send(
                closed.outbox,
                vad_pb2.SpeechEvent(
                    stream_id=closed.key[1], kind=vad_pb2.SpeechEvent.STREAM_CLOSED
                ),
            )
            self._forget(closed.key)
        return behind

    def _take(self, stream: _Stream) -> list[np.ndarray]:
        """A stream's pending audio, at most ``max_step`` samples of it (see ``take``)."""
        if stream.pending_samples <= self._max_step:
            taken, stream.pending, stream.pending_samples = stream.pending, [], 0
            return taken
        stream.pending_samples -= self._max_step
        return take(stream.pending, self._max_step)

    def _drop(self, stream: _Stream, reason: str, detail: str) -> None:
        self._fail(stream.outbox, stream.key[1], reason, detail)
        self._remember_told(stream.key)
        self._forget(stream.key)

    def _remember_told(self, key: tuple[int, str]) -> None:
        if len(self._told) >= _MAX_TOLD:
            self._told.clear()
        self._told.add(key)

    def _fail(self, outbox: Outbox, stream_id: str, reason: str, detail: str) -> None:
        STREAM_ERRORS.labels(reason).inc()
        self._send(
            outbox,
            vad_pb2.SpeechEvent(
                stream_id=stream_id, kind=vad_pb2.SpeechEvent.STREAM_ERROR, detail=detail
            ),
        )

    @staticmethod
    def _send(outbox: Outbox, event: vad_pb2.SpeechEvent | int) -> None:
        try:
            outbox.put_nowait(event)
        except asyncio.QueueFull:
            # The owning gateway stopped reading; its events are lost to it
            # either way, and the other connections must not stall.
            STREAM_ERRORS.labels("outbox_full").inc()

    def _is_live(self, stream: _Stream) -> bool:
        return self._streams.get(stream.key) is stream

    def _forget(self, key: tuple[int, str]) -> None:
        """Forget a stream now; the engine drops its state at the next tick,
        after anything already handed to the inference thread."""
        if self._streams.pop(key, None) is not None:
            self._changes.append(Close(self.engine_id(key)))
            self._emptied = not self._streams
        STREAMS.set(len(self._streams))
