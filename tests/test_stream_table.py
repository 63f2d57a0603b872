"""The VAD stream table, in process: what reaches the engine, when, on which thread, and
what each owner is told.

The table is real and so is its inference thread; the engine is a fake at the
edge (``RecordingEngine``) that records every call and can hold a step on the
inference thread, so the orderings that matter can be set up exactly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from services.common.audio import SAMPLE_RATE
from services.common.inference import InferenceThread
from services.protos import vad_pb2
from services.vad.engine import VadEvent
from services.vad.streams import Outbox, StreamTable

FRAME_SAMPLES = 960
FRAME_PCM = b"\x00\x00" * FRAME_SAMPLES
DEFAULT_SILENCE_MS = 500
THREAD_NAME = "table-test"
# Bounds every wait on the inference thread; a hang fails instead of blocking.
WAIT_S = 10.0

Kind = vad_pb2.SpeechEvent.Kind


class RecordingEngine:
    """A fake engine at the table's edge: no model, it records every call, the
    thread it came on and any step of a stream it was never opened for; a test
    can script the events a stream's next step returns, and hold a step."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.threads: set[str] = set()
        self.unopened_steps: list[str] = []
        self.replies: dict[str, list[VadEvent]] = {}
        self._open: set[str] = set()
        self._hold: threading.Event | None = None
        self._holds: list[threading.Event] = []
        self.step_entered = threading.Event()

    def hold_next_step(self) -> threading.Event:
        """The next step waits, on the inference thread, until the returned event is set."""
        self._hold = threading.Event()
        self._holds.append(self._hold)
        self.step_entered.clear()
        return self._hold

    def release_all(self) -> None:
        """Let every held step go (a failed test must not leave the thread waiting)."""
        for hold in self._holds:
            hold.set()

    def open(self, stream_id: str, silence_ms: int) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(("open", stream_id, silence_ms))
        self._open.add(stream_id)

    def close(self, stream_id: str) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(("close", stream_id))
        self._open.discard(stream_id)

    def step(self, chunks: Mapping[str, np.ndarray], final: Collection[str]) -> list[VadEvent]:
        self.threads.add(threading.current_thread().name)
        self.calls.append(("step", {sid: c.size for sid, c in chunks.items()}, tuple(final)))
        self.unopened_steps += [sid for sid in [*chunks, *final] if sid not in self._open]
        hold, self._hold = self._hold, None
        self.step_entered.set()
        if hold is not None and not hold.wait(WAIT_S):
            raise TimeoutError("held step never released")
        events: list[VadEvent] = []
        for sid in [*chunks, *final]:
            events += self.replies.pop(sid, [])
        return events

    def steps(self) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == "step"]


class UnserialisedInference(InferenceThread):
    """A fake inference edge that runs every call on a thread of its own, at once,
    and counts how many calls the table has in flight."""

    def __init__(self) -> None:
        super().__init__(THREAD_NAME)
        self.in_flight = 0
        self.most_in_flight = 0

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        finally:
            self.in_flight -= 1


@pytest.fixture
def inference() -> Iterator[InferenceThread]:
    thread = InferenceThread(THREAD_NAME)
    yield thread
    thread.shutdown()


@pytest.fixture
def engine(inference: InferenceThread) -> Iterator[RecordingEngine]:
    # Depends on ``inference`` so that it is torn down first: held steps are
    # released before the inference thread is shut down.
    recording = RecordingEngine()
    yield recording
    recording.release_all()


def make_table(
    engine: RecordingEngine, inference: InferenceThread, **overrides: Any
) -> StreamTable:
    settings: dict[str, Any] = {
        "default_silence_ms": DEFAULT_SILENCE_MS,
        "tick_ms": 60,
        "max_streams": 8,
        "max_backlog_s": 10.0,
    }
    settings.update(overrides)
    return StreamTable(engine, inference, **settings)


def open_req(stream_id: str, silence_ms: int = 0, start_sample: int = 0) -> vad_pb2.StreamOpen:
    return vad_pb2.StreamOpen(stream_id=stream_id, silence_ms=silence_ms, start_sample=start_sample)


def frame(stream_id: str, seq: int) -> vad_pb2.AudioFrame:
    return vad_pb2.AudioFrame(stream_id=stream_id, seq=seq, pcm=FRAME_PCM)


def close_req(stream_id: str, flush: bool) -> vad_pb2.StreamClose:
    return vad_pb2.StreamClose(stream_id=stream_id, flush=flush)


def drain(outbox: Outbox) -> list[tuple[str, str, str]]:
    """(stream id, kind, detail) of every event waiting in ``outbox``."""
    events = []
    while not outbox.empty():
        event = outbox.get_nowait()
        if not isinstance(event, int):  # acknowledgements are not events
            events.append((event.stream_id, Kind.Name(event.kind), event.detail))
    return events


def acks(outbox: Outbox) -> list[int]:
    return [
        item
        for item in (outbox.get_nowait() for _ in range(outbox.qsize()))
        if isinstance(item, int)
    ]


async def wait_entered(engine: RecordingEngine) -> None:
    assert await asyncio.to_thread(engine.step_entered.wait, WAIT_S), "step never started"


async def test_open_feed_and_flush_reach_the_engine_in_request_order(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a", silence_ms=300))
    table.feed(1, outbox, frame("a", 1))
    table.feed(1, outbox, frame("a", 2))
    table.close(1, close_req("a", flush=True))
    await table.tick()
    await table.tick()

    assert engine.calls == [
        ("open", "1/a", 300),
        ("step", {"1/a": 2 * FRAME_SAMPLES}, ("1/a",)),
        ("close", "1/a"),
    ]
    assert drain(outbox) == [("a", "STREAM_CLOSED", "")]


async def test_the_engine_is_called_only_on_the_inference_thread(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    table.close(1, close_req("a", flush=False))
    table.open(1, outbox, open_req("b"))
    table.feed(1, outbox, frame("b", 1))
    table.close(1, close_req("b", flush=True))
    for _ in range(3):
        await table.tick()

    assert {call[0] for call in engine.calls} == {"open", "close", "step"}
    assert all(name.startswith(f"{THREAD_NAME}-inference") for name in engine.threads)
    assert len(engine.threads) == 1


async def test_events_reach_the_owner_offset_by_the_stream_origin(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a", start_sample=SAMPLE_RATE))
    for seq in (1, 2, 3):
        table.feed(1, outbox, frame("a", seq))
    engine.replies["1/a"] = [VadEvent("1/a", "start", 100), VadEvent("1/a", "end", 150)]
    await table.tick()

    events = [
        e for e in (outbox.get_nowait() for _ in range(outbox.qsize())) if not isinstance(e, int)
    ]
    assert [(e.stream_id, Kind.Name(e.kind), e.offset_ms, e.seq) for e in events] == [
        ("a", "SPEECH_START", 1100, 3),
        ("a", "SPEECH_END", 1150, 3),
    ]


async def test_an_open_beyond_max_streams_is_refused_and_never_reaches_the_engine(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference, max_streams=1)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.open(1, outbox, open_req("b"))
    table.feed(1, outbox, frame("b", 1))
    await table.tick()

    assert drain(outbox) == [("b", "STREAM_ERROR", "VAD replica is at its stream limit")]
    assert engine.calls == [("open", "1/a", DEFAULT_SILENCE_MS)]


async def test_frames_for_an_unknown_stream_are_reported_once(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    for seq in (1, 2, 3):
        table.feed(1, outbox, frame("ghost", seq))
    await table.tick()

    assert drain(outbox) == [("ghost", "STREAM_ERROR", "stream is not open")]
    assert engine.calls == []


async def test_a_stream_past_its_backlog_is_dropped_with_an_error_and_never_stepped(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference, max_backlog_s=1.5 * FRAME_SAMPLES / SAMPLE_RATE)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    table.feed(1, outbox, frame("a", 2))
    table.feed(1, outbox, frame("a", 3))
    await table.tick()

    assert drain(outbox) == [("a", "STREAM_ERROR", "stream fell too far behind")]
    assert engine.calls == [("open", "1/a", DEFAULT_SILENCE_MS), ("close", "1/a")]


async def test_drop_connection_closes_only_that_connections_streams(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    gone: Outbox = asyncio.Queue()
    kept: Outbox = asyncio.Queue()
    table.open(1, gone, open_req("a"))
    table.open(2, kept, open_req("a"))
    await table.tick()
    table.feed(1, gone, frame("a", 1))
    table.feed(2, kept, frame("a", 1))
    table.drop_connection(1)
    await table.tick()

    assert engine.calls[2:] == [("close", "1/a"), ("step", {"2/a": FRAME_SAMPLES}, ())]


async def test_an_open_and_close_within_one_tick_never_step_the_stream(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    table.close(1, close_req("a", flush=False))
    await table.tick()

    assert engine.calls == [("open", "1/a", DEFAULT_SILENCE_MS), ("close", "1/a")]
    assert drain(outbox) == []


async def test_a_reopen_under_the_same_key_within_one_tick_steps_only_the_new_streams_audio(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    table.feed(1, outbox, frame("a", 2))
    table.close(1, close_req("a", flush=False))
    table.open(1, outbox, open_req("a", silence_ms=700))
    table.feed(1, outbox, frame("a", 1))
    await table.tick()

    assert engine.calls == [
        ("open", "1/a", DEFAULT_SILENCE_MS),
        ("close", "1/a"),
        ("open", "1/a", 700),
        ("step", {"1/a": FRAME_SAMPLES}, ()),
    ]


async def test_a_stream_opened_during_a_step_is_opened_on_the_engine_before_its_frames(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    release = engine.hold_next_step()
    held = asyncio.create_task(table.tick())
    await wait_entered(engine)
    table.open(1, outbox, open_req("b"))
    table.feed(1, outbox, frame("b", 1))
    assert engine.calls == [
        ("open", "1/a", DEFAULT_SILENCE_MS),
        ("step", {"1/a": FRAME_SAMPLES}, ()),
    ]
    release.set()
    await asyncio.wait_for(held, WAIT_S)
    await table.tick()

    assert engine.calls[2:] == [
        ("open", "1/b", DEFAULT_SILENCE_MS),
        ("step", {"1/b": FRAME_SAMPLES}, ()),
    ]
    assert engine.unopened_steps == []


async def test_a_stream_closed_during_its_step_is_dropped_from_the_engine_after_that_step(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    release = engine.hold_next_step()
    held = asyncio.create_task(table.tick())
    await wait_entered(engine)
    table.close(1, close_req("a", flush=False))
    assert ("close", "1/a") not in engine.calls
    release.set()
    await asyncio.wait_for(held, WAIT_S)
    await table.tick()

    assert engine.calls == [
        ("open", "1/a", DEFAULT_SILENCE_MS),
        ("step", {"1/a": FRAME_SAMPLES}, ()),
        ("close", "1/a"),
    ]


async def test_events_of_a_stream_closed_during_its_step_are_not_sent(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    engine.replies["1/a"] = [VadEvent("1/a", "start", 0)]
    release = engine.hold_next_step()
    held = asyncio.create_task(table.tick())
    await wait_entered(engine)
    table.close(1, close_req("a", flush=False))
    release.set()
    await asyncio.wait_for(held, WAIT_S)

    assert drain(outbox) == []


async def test_a_flushed_streams_state_is_dropped_only_after_its_flush_was_stepped(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    await table.tick()
    table.close(1, close_req("a", flush=True))
    release = engine.hold_next_step()
    held = asyncio.create_task(table.tick())
    await wait_entered(engine)
    # The owner goes away while the flush is being stepped.
    table.drop_connection(1)
    release.set()
    await asyncio.wait_for(held, WAIT_S)
    await table.tick()

    assert engine.calls[2:] == [("step", {}, ("1/a",)), ("close", "1/a")]


async def test_a_stream_reopened_while_its_flush_is_stepped_stays_open(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.feed(1, outbox, frame("a", 1))
    await table.tick()
    table.close(1, close_req("a", flush=True))
    release = engine.hold_next_step()
    held = asyncio.create_task(table.tick())
    await wait_entered(engine)
    table.open(1, outbox, open_req("a"))
    release.set()
    await asyncio.wait_for(held, WAIT_S)
    table.feed(1, outbox, frame("a", 1))
    await table.tick()

    assert engine.calls[2:] == [
        ("step", {}, ("1/a",)),
        ("close", "1/a"),
        ("open", "1/a", DEFAULT_SILENCE_MS),
        ("step", {"1/a": FRAME_SAMPLES}, ()),
    ]
    assert drain(outbox) == []


async def test_ticks_never_overlap_even_on_an_inference_edge_that_would_allow_it(
    engine: RecordingEngine,
) -> None:
    inference = UnserialisedInference()
    try:
        table = make_table(engine, inference)
        outbox: Outbox = asyncio.Queue()
        table.open(1, outbox, open_req("a"))
        table.feed(1, outbox, frame("a", 1))
        release = engine.hold_next_step()
        first = asyncio.create_task(table.tick())
        await wait_entered(engine)
        table.feed(1, outbox, frame("a", 2))
        second = asyncio.create_task(table.tick())
        # Let the second tick run as far as it can on the loop (no threads involved).
        for _ in range(5):
            await asyncio.sleep(0)
        assert inference.most_in_flight == 1
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)
    finally:
        engine.release_all()
        inference.shutdown()

    assert inference.most_in_flight == 1
    assert engine.steps() == [
        ("step", {"1/a": FRAME_SAMPLES}, ()),
        ("step", {"1/a": FRAME_SAMPLES}, ()),
    ]


async def test_a_tick_acknowledges_the_batches_read_before_it(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.note_batch(1, outbox, 1)
    table.open(1, outbox, open_req("a"))
    table.note_batch(1, outbox, 2)
    table.feed(1, outbox, frame("a", 1))
    assert acks(outbox) == []
    await table.tick()
    assert acks(outbox) == [2]
    await table.tick()
    assert acks(outbox) == [], "a batch is acknowledged once"


async def test_no_acknowledgement_while_the_step_is_held(
    engine: RecordingEngine, inference: InferenceThread
) -> None:
    table = make_table(engine, inference)
    outbox: Outbox = asyncio.Queue()
    table.open(1, outbox, open_req("a"))
    table.note_batch(1, outbox, 1)
    table.feed(1, outbox, frame("a", 1))
    hold = engine.hold_next_step()
    tick = asyncio.create_task(table.tick())
    await wait_entered(engine)
    assert acks(outbox) == []
    hold.set()
    await tick
    assert acks(outbox) == [1]
