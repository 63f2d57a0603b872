"""A session's VAD streams: opening, shedding and re-pinning, in process.

The VAD clients are real but never started: operations queue up in them
exactly as they would before the sender drains them, and a test drains them
by hand (``deliver``) to play the part of the network. The stream directory
and the speech handler are fakes at the session's edges.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from services.common.audio import SAMPLE_RATE, float_to_pcm16
from services.gateway.session_vad import SessionVad
from services.gateway.utterances import CutLimits, UtteranceCutter
from services.gateway.vad_client import VadStreamClient
from services.gateway.vad_router import VadRouter
from services.protos import vad_pb2

LIMITS = CutLimits(max_utterance_s=30, min_utterance_ms=200, min_speech_dbfs=-70, silence_ms=500)
FRAME = float_to_pcm16(np.full(SAMPLE_RATE * 60 // 1000, 0.1, dtype=np.float32))


class Directory:
    """Fake hub: which handler each stream id's events go to."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[vad_pb2.SpeechEvent], None]] = {}

    def bind_stream(self, stream_id: str, handler: Callable[[vad_pb2.SpeechEvent], None]) -> None:
        self.handlers[stream_id] = handler

    def unbind_stream(self, stream_id: str) -> None:
        self.handlers.pop(stream_id, None)

    def send(self, event: vad_pb2.SpeechEvent) -> None:
        self.handlers[event.stream_id](event)


class Session:
    def __init__(self, name: str, router: VadRouter, directory: Directory) -> None:
        self.cutter = UtteranceCutter(LIMITS)
        self.speech: list[tuple[int, int, str]] = []
        self.vad = SessionVad(
            name, router, directory, self.cutter, 500, lambda *s: self.speech.append(s)
        )

    def audio(self, frames: int) -> None:
        for _ in range(frames):
            self.cutter.append(FRAME)
            self.vad.feed(FRAME)


def router(max_backlog: int = 20_000) -> VadRouter:
    r = VadRouter(
        "127.0.0.1:1,127.0.0.1:2", lambda e: None, lambda c: None, max_backlog=max_backlog
    )
    for client in r.clients.values():
        client.connected.set()
    return r


# Something queued that takes a place in a client's backlog.
FILLER = vad_pb2.StreamClose(stream_id="filler")


def deliver(client: VadStreamClient) -> list[object]:
    """Take everything queued on a client, as its sender would, and have the
    replica acknowledge it all (it has stepped through that audio)."""
    ops: list[object] = list(client._queue.ops)
    client._queue.ops.clear()
    client.ops_done = client.ops_queued
    return ops


def replica_of(session: Session) -> VadStreamClient:
    current = session.vad._current
    assert current is not None, "session has no open stream"
    return current.client


async def test_a_thousand_sessions_moving_together_stay_within_the_backlog() -> None:
    r, directory = router(max_backlog=2_000), Directory()
    sessions = [Session(f"s{i}", r, directory) for i in range(1000)]
    for s in sessions:
        s.vad.start()
        s.audio(30)  # 1.8 s each: every move replays 1 s
        for client in r.clients.values():
            deliver(client)
    lost = replica_of(sessions[0])
    moving = [s for s in sessions if replica_of(s) is lost]
    lost.connected.clear()
    for s in moving:
        s.vad.on_lost(lost)
    assert r.waiting == len(moving)
    survivor = next(c for c in r.clients.values() if c is not lost)
    peak, passes = 0, 0
    while r.waiting and passes < 1000:
        passes += 1
        r.open_pass()
        peak = max(peak, len(survivor._queue.ops))
        deliver(survivor)
    assert r.waiting == 0
    assert peak <= 2_000
    assert all(replica_of(s) is survivor for s in moving)
    assert passes > 1, "the moves should have needed several passes at this backlog"


async def test_a_full_backlog_sheds_the_stream_and_replays_its_audio_once_there_is_room() -> None:
    r, directory = router(max_backlog=40), Directory()
    s = Session("shed", r, directory)
    s.vad.start()
    client = replica_of(s)
    s.audio(30)
    client.ops_done = 1 + 30  # the replica is through the open and 30 frames, 1.8 s
    s.audio(15)  # 45 frames into a 40-op backlog: the stream is shed on the way
    assert s.vad._current is None and s.vad.active
    assert r.waiting == 1
    ops = deliver(client)
    assert isinstance(ops[-1], vad_pb2.StreamClose) and not ops[-1].flush
    assert r.open_pass()
    replayed = deliver(replica_of(s))
    opened = replayed[0]
    assert isinstance(opened, vad_pb2.StreamOpen)
    # Frames wait as (stream id, seq, PCM) until their tick is packed.
    audio = sum(len(op[2]) for op in replayed if isinstance(op, tuple)) // 2
    # The 40th frame found no room: the replay reaches 1 s behind the audio
    # the replica had acknowledged (a speech start not yet reported is found
    # again) and runs to the newest audio.
    acknowledged = 30 * len(FRAME) // 2
    assert opened.start_sample == acknowledged - SAMPLE_RATE
    assert audio == s.cutter.end - opened.start_sample


async def test_speech_in_progress_on_a_lost_replica_is_replayed_from_its_start() -> None:
    r, directory = router(), Directory()
    s = Session("mid", r, directory)
    s.vad.start()
    s.audio(60)  # 3.6 s
    first = replica_of(s)
    stream_id = s.vad._current.stream_id  # type: ignore[union-attr]
    directory.send(
        vad_pb2.SpeechEvent(
            stream_id=stream_id, kind=vad_pb2.SpeechEvent.SPEECH_START, offset_ms=3000
        )
    )
    deliver(first)
    first.connected.clear()
    s.vad.on_lost(first)
    assert r.open_pass()
    opened = deliver(replica_of(s))[0]
    assert isinstance(opened, vad_pb2.StreamOpen)
    assert opened.start_sample == 3 * SAMPLE_RATE
    assert replica_of(s) is not first


async def test_stopping_while_waiting_for_a_stream_ends_the_speech_in_progress() -> None:
    r, directory = router(max_backlog=1), Directory()
    s = Session("stop", r, directory)
    s.vad.start()
    stream_id = s.vad._current.stream_id  # type: ignore[union-attr]
    lost = replica_of(s)
    deliver(lost)
    s.audio(1)
    directory.send(vad_pb2.SpeechEvent(stream_id=stream_id, kind=vad_pb2.SpeechEvent.SPEECH_START))
    s.audio(20)
    lost.connected.clear()
    s.vad.on_lost(lost)
    for client in r.clients.values():
        client._queue.put(FILLER)  # both replicas full: the move must wait
    assert not r.open_pass()
    s.vad.stop()
    assert s.speech == [(0, s.cutter.end, "listen_stop")]
    assert r.waiting == 0 and not s.vad.active


async def test_a_session_that_fails_to_move_does_not_stop_the_others() -> None:
    r, directory = router(), Directory()
    sessions = [Session(f"m{i}", r, directory) for i in range(3)]
    for s in sessions:
        s.vad.start()
    broken = sessions[1]

    def explode() -> bool:
        raise RuntimeError("boom")

    broken.vad.try_open = explode  # type: ignore[method-assign]
    for s in sessions:
        client = replica_of(s)
        client.connected.clear()
        s.vad.on_lost(client)
        client.connected.set()
    assert r.open_pass()
    assert r.waiting == 0
    assert sessions[0].vad._current is not None and sessions[2].vad._current is not None


@pytest.mark.parametrize("flush", [True, False])
async def test_closing_never_raises_even_with_a_full_backlog(flush: bool) -> None:
    r, directory = router(max_backlog=2), Directory()
    s = Session("close", r, directory)
    s.vad.start()
    client = replica_of(s)
    client._queue.put(FILLER)
    client._queue.put(FILLER)
    assert not client.has_room()
    if flush:
        s.vad.stop()
    else:
        s.vad.close()
    assert isinstance(deliver(client)[-1], vad_pb2.StreamClose)


async def test_a_silent_listening_session_keeps_only_a_few_seconds_of_audio() -> None:
    r, directory = router(), Directory()
    s = Session("quiet", r, directory)
    s.vad.start()
    for _ in range(20):
        s.audio(50)  # 60 s in all
        deliver(replica_of(s))
        s.cutter.buffer.discard_before(s.vad.oldest_needed())
    assert s.cutter.end - s.cutter.buffer.start <= 4 * SAMPLE_RATE
    assert s.cutter.buffer.capacity <= 8 * SAMPLE_RATE


async def test_audio_since_a_reported_speech_start_is_kept() -> None:
    r, directory = router(), Directory()
    s = Session("talking", r, directory)
    s.vad.start()
    stream_id = s.vad._current.stream_id  # type: ignore[union-attr]
    s.audio(10)
    directory.send(
        vad_pb2.SpeechEvent(
            stream_id=stream_id, kind=vad_pb2.SpeechEvent.SPEECH_START, offset_ms=100
        )
    )
    s.audio(200)  # 12 s of speech
    deliver(replica_of(s))
    s.cutter.buffer.discard_before(s.vad.oldest_needed())
    assert s.cutter.buffer.start == SAMPLE_RATE // 10


async def test_a_replay_lost_before_its_replica_confirmed_speech_replays_from_the_same_start() -> (
    None
):
    r, directory = router(), Directory()
    s = Session("twice", r, directory)
    s.vad.start()
    s.audio(60)
    first = replica_of(s)
    directory.send(
        vad_pb2.SpeechEvent(
            stream_id=s.vad._current.stream_id,  # type: ignore[union-attr]
            kind=vad_pb2.SpeechEvent.SPEECH_START,
            offset_ms=3000,
        )
    )
    first.connected.clear()
    s.vad.on_lost(first)
    assert r.open_pass()
    second = replica_of(s)
    s.audio(20)  # the second replica has not reported the start yet when it is lost too
    first.connected.set()
    second.connected.clear()
    s.vad.on_lost(second)
    for client in r.clients.values():
        deliver(client)
    assert r.open_pass()
    opened = deliver(replica_of(s))[0]
    assert isinstance(opened, vad_pb2.StreamOpen)
    assert opened.start_sample == 3 * SAMPLE_RATE


async def test_sessions_avoid_a_replica_that_stalled_while_another_is_connected() -> None:
    r, directory = router(), Directory()
    stalled, other = r.clients.values()
    stalled._avoid_until = float("inf")  # as after a stall, though connected again
    sessions = [Session(f"p{i}", r, directory) for i in range(20)]
    for s in sessions:
        s.vad.start()
    assert all(replica_of(s) is other for s in sessions)
    other.connected.clear()
    late = Session("late", r, directory)
    late.vad.start()
    assert replica_of(late) is stalled, "with nothing else connected it is still used"
