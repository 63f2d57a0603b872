"""A stream opened while another stream's step is running starts with fresh detector state.

The batched FSMN engine reuses the slot of the last stream closed. If the
table closed one stream and opened another on the event loop while a step was
still running on the inference thread, the step went on writing the closed
stream's speech into the slot the new stream had just been given, and the new
stream reported speech in pure silence. Here a real engine on the lite-profile
weights is held in the middle of a step (after it has picked up its streams,
before it touches the model state) while the test closes the talking stream
and opens a new one through the table; the new stream then hears one second
of zeros and must stay silent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.audio import float_to_pcm16
from services.common.inference import InferenceThread
from services.protos import vad_pb2
from services.simulator.speech import silence, synthesize
from services.vad.fsmn_batched import BatchedFsmnVadEngine
from services.vad.streams import Outbox, StreamTable

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "fsmn-vad"
SILENCE_MS = 500
FRAME = 960  # 60 ms, as devices send it
CONN = 1
# Bounds every wait on the inference thread; a hang fails instead of blocking.
WAIT_S = 30.0

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.pt").exists(), reason="no FSMN-VAD")


class StepGate:
    """Holds the next engine step on the inference thread until released."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            if self.armed:
                self.armed = False
                self.entered.set()
                if not self.release.wait(WAIT_S):
                    raise TimeoutError("step gate never released")
            return fn(*args, **kwargs)

        return gated


@pytest.fixture
def inference() -> Iterator[InferenceThread]:
    thread = InferenceThread("test-vad")
    yield thread
    thread.shutdown()


def feed(table: StreamTable, outbox: Outbox, stream_id: str, audio: np.ndarray, seq: int) -> int:
    for at in range(0, audio.size, FRAME):
        seq += 1
        pcm = float_to_pcm16(audio[at : at + FRAME])
        table.feed(CONN, outbox, vad_pb2.AudioFrame(stream_id=stream_id, seq=seq, pcm=pcm))
    return seq


def drain(outbox: Outbox) -> list[vad_pb2.SpeechEvent]:
    events = []
    while not outbox.empty():
        item = outbox.get_nowait()
        if isinstance(item, vad_pb2.SpeechEvent):
            events.append(item)
    return events


async def test_stream_opened_during_a_step_does_not_inherit_the_closed_streams_speech(
    inference: InferenceThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = inference.call(BatchedFsmnVadEngine, MODEL_DIR)
    gate = StepGate()
    # The first thing a step does after picking up its streams and their slots
    # (streams in step take extract_even, the others extract).
    monkeypatch.setattr(engine._frontend, "extract", gate.wrap(engine._frontend.extract))
    monkeypatch.setattr(engine._frontend, "extract_even", gate.wrap(engine._frontend.extract_even))
    table = StreamTable(
        engine,
        inference,
        default_silence_ms=SILENCE_MS,
        tick_ms=60,
        max_streams=8,
        max_backlog_s=30.0,
    )
    outbox: Outbox = asyncio.Queue()
    speech = synthesize("hello there how are you, turn on the kitchen lights")

    table.open(CONN, outbox, vad_pb2.StreamOpen(stream_id="talker"))
    half = speech.size // 2
    seq = feed(table, outbox, "talker", np.concatenate([silence(0.3), speech[:half]]), 0)
    await table.tick()
    assert [e.kind for e in drain(outbox)] == [vad_pb2.SpeechEvent.SPEECH_START]

    # The talker's next step is held on the inference thread...
    feed(table, outbox, "talker", speech[half:], seq)
    gate.armed = True
    held = asyncio.create_task(table.tick())
    try:
        assert await asyncio.to_thread(gate.entered.wait, WAIT_S), "step never started"
        # ...while the loop closes it and opens another stream.
        table.close(CONN, vad_pb2.StreamClose(stream_id="talker", flush=False))
        table.open(CONN, outbox, vad_pb2.StreamOpen(stream_id="listener"))
    finally:
        gate.release.set()
    await asyncio.wait_for(held, WAIT_S)
    events = drain(outbox)

    feed(table, outbox, "listener", silence(1.0), 0)
    table.close(CONN, vad_pb2.StreamClose(stream_id="listener", flush=True))
    for _ in range(10):
        await table.tick()
        events += drain(outbox)
        if any(e.kind == vad_pb2.SpeechEvent.STREAM_CLOSED for e in events):
            break
    heard = [
        (vad_pb2.SpeechEvent.Kind.Name(e.kind), e.offset_ms)
        for e in events
        if e.stream_id == "listener"
    ]
    assert heard == [("STREAM_CLOSED", 0)], f"one second of zeros was heard as {heard}"
