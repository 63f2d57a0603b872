"""The VAD service's answers to a gateway that gets its stream bookkeeping wrong."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from services.cluster import LocalCluster
from services.protos import vad_pb2, vad_pb2_grpc

pytestmark = pytest.mark.e2e

FRAME = b"\x00\x00" * 960


async def test_frames_for_a_stream_never_opened_get_one_error_naming_it(
    cluster: LocalCluster,
) -> None:
    async def requests() -> AsyncIterator[vad_pb2.VadRequest]:
        ghost = [vad_pb2.AudioFrame(stream_id="ghost", seq=s, pcm=FRAME) for s in range(1, 6)]
        yield vad_pb2.VadRequest(frames=ghost[:2])
        yield vad_pb2.VadRequest(frames=ghost[2:])
        # A real stream, closed at once, bounds the wait for the answers.
        yield vad_pb2.VadRequest(
            opens=[vad_pb2.StreamOpen(stream_id="real")],
            frames=[vad_pb2.AudioFrame(stream_id="real", seq=1, pcm=FRAME)],
            closes=[vad_pb2.StreamClose(stream_id="real", flush=True)],
        )

    events: list[vad_pb2.SpeechEvent] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.ports.vad}") as channel:
        call = vad_pb2_grpc.VadStub(channel).Stream(requests(), timeout=30)
        async for response in call:
            events.extend(response.events)
            if any(e.kind == vad_pb2.SpeechEvent.STREAM_CLOSED for e in events):
                call.cancel()
                break
    ghost_events = [e for e in events if e.stream_id == "ghost"]
    assert [(e.kind, e.detail) for e in ghost_events] == [
        (vad_pb2.SpeechEvent.STREAM_ERROR, "stream is not open")
    ]
