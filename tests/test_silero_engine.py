"""Silero VAD engine on real weights: boundaries, audio-time windows, batching, flush."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.common.audio import SAMPLE_RATE
from services.simulator.speech import silence, synthesize, trim_silence
from services.vad.engine import VadEvent
from services.vad.silero import SileroVadEngine

MODEL = Path(__file__).resolve().parents[1] / "models" / "silero-vad" / "silero_vad.onnx"
SILENCE_MS = 500
CHUNK = SAMPLE_RATE * 60 // 1000
TOLERANCE_MS = 100

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason="silero_vad.onnx not unpacked")


@pytest.fixture(scope="module")
def engine() -> SileroVadEngine:
    return SileroVadEngine(MODEL)


@pytest.fixture(scope="module")
def fox() -> np.ndarray:
    return trim_silence(synthesize("the quick brown fox jumps over the lazy dog", "en"))


@pytest.fixture(scope="module")
def lights() -> np.ndarray:
    return trim_silence(synthesize("please turn on the lights", "en+f3"))


_counter = iter(range(1_000_000))


@pytest.fixture
def sid(engine: SileroVadEngine) -> Iterator[str]:
    stream_id = f"s{next(_counter)}"
    engine.open(stream_id, SILENCE_MS)
    yield stream_id
    engine.close(stream_id)


def ms(samples: np.ndarray) -> int:
    return samples.size * 1000 // SAMPLE_RATE


def feed_chunked(
    engine: SileroVadEngine, streams: dict[str, np.ndarray], chunk: int = CHUNK
) -> list[VadEvent]:
    """Step all streams together, ``chunk`` samples per stream per step, like a live tick."""
    events: list[VadEvent] = []
    longest = max(a.size for a in streams.values())
    for at in range(0, longest, chunk):
        step = {sid: a[at : at + chunk] for sid, a in streams.items() if at < a.size}
        events.extend(engine.step(step, []))
    return events


def by_stream(events: list[VadEvent], stream_id: str) -> list[tuple[str, int]]:
    return [(e.kind, e.offset_ms) for e in events if e.stream_id == stream_id]


def test_speech_between_silences_gives_one_start_and_one_end_near_the_speech(
    engine: SileroVadEngine, sid: str, fox: np.ndarray
) -> None:
    audio = np.concatenate([silence(1.0), fox, silence(1.5)])
    events = by_stream(feed_chunked(engine, {sid: audio}), sid)
    assert [kind for kind, _ in events] == ["start", "end"]
    (_, start), (_, end) = events
    assert abs(start - 1000) <= TOLERANCE_MS
    assert abs(end - (1000 + ms(fox))) <= TOLERANCE_MS


def test_two_utterances_one_second_apart_give_two_start_end_pairs(
    engine: SileroVadEngine, sid: str, fox: np.ndarray, lights: np.ndarray
) -> None:
    audio = np.concatenate([silence(0.5), fox, silence(1.0), lights, silence(1.0)])
    events = by_stream(feed_chunked(engine, {sid: audio}), sid)
    assert [kind for kind, _ in events] == ["start", "end", "start", "end"]
    second_start = 500 + ms(fox) + 1000
    expected = [500, 500 + ms(fox), second_start, second_start + ms(lights)]
    for (_, got), want in zip(events, expected, strict=True):
        assert abs(got - want) <= TOLERANCE_MS


def test_silence_window_is_audio_time_so_chunking_does_not_change_events(
    engine: SileroVadEngine, fox: np.ndarray, lights: np.ndarray
) -> None:
    audio = np.concatenate([silence(0.3), fox, silence(0.7), lights, silence(0.6)])
    results = []
    for chunk in (CHUNK, audio.size):
        engine.open("chunking", SILENCE_MS)
        results.append(by_stream(feed_chunked(engine, {"chunking": audio}, chunk), "chunking"))
        engine.close("chunking")
    assert results[0] == results[1]
    assert len(results[0]) == 4


def test_streams_stepped_in_one_batch_are_isolated(
    engine: SileroVadEngine, fox: np.ndarray
) -> None:
    speech = np.concatenate([silence(0.5), fox, silence(1.0)])
    engine.open("talker", SILENCE_MS)
    engine.open("quiet", SILENCE_MS)
    events = feed_chunked(engine, {"talker": speech, "quiet": silence(speech.size / SAMPLE_RATE)})
    engine.close("talker")
    engine.close("quiet")
    assert by_stream(events, "quiet") == []
    assert [kind for kind, _ in by_stream(events, "talker")] == ["start", "end"]


def test_final_flush_ends_speech_in_progress_at_the_last_sample(
    engine: SileroVadEngine, sid: str, fox: np.ndarray
) -> None:
    # Cut mid-utterance, on a length that leaves a partial window to zero-pad.
    audio = np.concatenate([silence(0.5), fox[: SAMPLE_RATE + 123]])
    head = audio[:-1000]
    events = engine.step({sid: head}, [])
    events += engine.step({sid: audio[head.size :]}, [sid])
    (start_kind, start), (end_kind, end) = by_stream(events, sid)
    assert (start_kind, end_kind) == ("start", "end")
    assert abs(start - 500) <= TOLERANCE_MS
    assert end == ms(audio)


def test_batched_streams_give_the_same_events_as_each_stream_alone(
    engine: SileroVadEngine, fox: np.ndarray, lights: np.ndarray
) -> None:
    audios = {
        "b0": np.concatenate([silence(0.2), fox, silence(0.8)]),
        "b1": np.concatenate([silence(0.9), lights, silence(0.6), fox, silence(0.7)]),
        "b2": np.concatenate([lights, silence(1.2)]),
    }
    for stream_id in audios:
        engine.open(stream_id, SILENCE_MS)
    batched = feed_chunked(engine, audios)
    for stream_id, audio in audios.items():
        engine.open(stream_id, SILENCE_MS)
        alone = feed_chunked(engine, {stream_id: audio})
        assert by_stream(batched, stream_id) == by_stream(alone, stream_id)
        assert by_stream(alone, stream_id)
        engine.close(stream_id)


def test_speech_shorter_than_min_speech_ms_gives_no_events(
    engine: SileroVadEngine, sid: str, fox: np.ndarray
) -> None:
    # A 100 ms slice of a word: the model does fire on it (seen with min_speech_ms=0),
    # but it is under the 150 ms minimum so no event may come out.
    blip = np.concatenate([silence(0.5), fox[4000:5600], silence(1.0)])
    no_minimum = SileroVadEngine(MODEL, min_speech_ms=0)
    no_minimum.open("blip", SILENCE_MS)
    assert [e.kind for e in no_minimum.step({"blip": blip}, ["blip"])] == ["start", "end"]
    assert engine.step({sid: blip}, [sid]) == []
