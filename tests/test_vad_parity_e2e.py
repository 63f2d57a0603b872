"""FSMN-VAD through the VAD service finds the boundaries funasr's own streaming finds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from support.fsmn_reference import CHUNK, SILENCE_MS, funasr_events, load_funasr_fsmn

from services.cluster import LocalCluster
from services.common.audio import float_to_pcm16
from services.protos import vad_pb2, vad_pb2_grpc
from services.simulator.speech import silence, synthesize

pytestmark = pytest.mark.e2e

TOLERANCE_MS = 30


def clips() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)

    def say(text: str, voice: str = "en") -> np.ndarray:
        return synthesize(text, voice)

    noisy = np.concatenate([silence(0.8), say("testing with some background noise"), silence(1)])
    noisy = noisy + rng.normal(0, 0.01, noisy.size).astype(np.float32)
    return {
        "two_sentences": np.concatenate(
            [silence(1), say("hello there how are you"), silence(1), say("fine thanks"), silence(1)]
        ),
        "female_short_pause": np.concatenate(
            [
                silence(0.5),
                say("turn left", "en+f3"),
                silence(0.7),
                say("then stop", "en+f3"),
                silence(1),
            ]
        ),
        "mandarin": np.concatenate(
            [silence(0.6), say("你好小智，今天天气怎么样", "cmn"), silence(1)]
        ),
        "noisy": noisy,
        "long_pause": np.concatenate(
            [silence(0.3), say("first", "en+m7"), silence(2.5), say("second", "en+m7"), silence(1)]
        ),
        "ends_mid_speech": np.concatenate([silence(0.5), say("this never finishes", "en-us+f5")]),
    }


async def through_service(port: int, name: str, audio: np.ndarray) -> list[tuple[str, int]]:
    kinds = {vad_pb2.SpeechEvent.SPEECH_START: "start", vad_pb2.SpeechEvent.SPEECH_END: "end"}

    async def requests() -> AsyncIterator[vad_pb2.VadRequest]:
        yield vad_pb2.VadRequest(opens=[vad_pb2.StreamOpen(stream_id=name, silence_ms=SILENCE_MS)])
        for seq, i in enumerate(range(0, audio.size, CHUNK), start=1):
            pcm = float_to_pcm16(audio[i : i + CHUNK])
            yield vad_pb2.VadRequest(frames=[vad_pb2.AudioFrame(stream_id=name, seq=seq, pcm=pcm)])
        yield vad_pb2.VadRequest(closes=[vad_pb2.StreamClose(stream_id=name, flush=True)])
        await asyncio.sleep(30)  # keep the stream open until the server has answered

    events: list[tuple[str, int]] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = vad_pb2_grpc.VadStub(channel).Stream(requests(), timeout=60)
        async for response in call:
            for event in response.events:
                if event.kind == vad_pb2.SpeechEvent.STREAM_CLOSED:
                    call.cancel()
                    return events
                events.append((kinds[event.kind], event.offset_ms))
    return events


@pytest.fixture(scope="module")
def funasr_fsmn() -> Any:
    return load_funasr_fsmn()


async def test_service_boundaries_match_funasr_streaming(
    cluster: LocalCluster, funasr_fsmn: Any
) -> None:
    audio_by_name = clips()
    served = await asyncio.gather(
        *(through_service(cluster.ports.vad, name, a) for name, a in audio_by_name.items())
    )
    compared = 0
    for (name, audio), got in zip(audio_by_name.items(), served, strict=True):
        expected = funasr_events(funasr_fsmn, audio)
        assert expected, f"{name}: funasr found no speech; the clip is not a useful case"
        assert [kind for kind, _ in got] == [kind for kind, _ in expected], (name, got, expected)
        for (_, got_ms), (_, want_ms) in zip(got, expected, strict=True):
            assert abs(got_ms - want_ms) <= TOLERANCE_MS, (name, got, expected)
            compared += 1
    assert compared >= 12
