"""One input's audio cut into speech segments by the shared VAD service.

A FunASR input or an uploaded file is one more VAD stream on the gateway's
multiplexed connection, opened, replayed and re-pinned by ``SessionVad`` as a
device's is. Unlike a device, such a caller may hand over minutes of audio at
once; ``feed`` passes it on as fast as the replica acknowledges it, keeping at
most ``AHEAD_S`` unacknowledged, so a whole file goes through at the VAD's
speed rather than real time, and never past the replica's backlog limit or
the cutter's buffer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from services.common.audio import SAMPLE_RATE, ms_to_samples
from services.gateway.context import GatewayContext
from services.gateway.session_vad import EventHandler, SessionVad
from services.gateway.utterances import CutLimits, Utterance, UtteranceCutter
from services.gateway.vad_client import VadStreamClient
from services.protos import vad_pb2

# Audio handed to the VAD per frame, and how far ahead of the replica's
# acknowledgements the feed may run (the replica fails a stream past 10 s).
FEED_SAMPLES = SAMPLE_RATE // 2
AHEAD_SAMPLES = 5 * SAMPLE_RATE
POLL_S = 0.01


class VadUnavailable(Exception):
    """No VAD replica took the audio in time."""


class LiveSegmenters:
    """Every segmenter of this gateway's compatible APIs, told when a VAD replica is lost."""

    def __init__(self) -> None:
        self._live: set[VadSegmenter] = set()

    def add(self, segmenter: VadSegmenter) -> None:
        self._live.add(segmenter)

    def discard(self, segmenter: VadSegmenter) -> None:
        self._live.discard(segmenter)

    def __len__(self) -> int:
        return len(self._live)

    def on_vad_lost(self, client: VadStreamClient) -> None:
        for segmenter in list(self._live):
            segmenter.vad.on_lost(client)


class _Observed:
    """The hub's stream directory, with this segmenter seeing each event first."""

    def __init__(self, ctx: GatewayContext, segmenter: VadSegmenter) -> None:
        self._hub = ctx.hub
        self._segmenter = segmenter

    def bind_stream(self, stream_id: str, handler: EventHandler) -> None:
        def observed(event: vad_pb2.SpeechEvent) -> None:
            self._segmenter.observe(event)
            handler(event)

        self._hub.bind_stream(stream_id, observed)

    def unbind_stream(self, stream_id: str) -> None:
        self._hub.unbind_stream(stream_id)


class VadSegmenter:
    def __init__(
        self,
        ctx: GatewayContext,
        registry: LiveSegmenters,
        name: str,
        on_segment: Callable[[Utterance], None],
    ) -> None:
        settings = ctx.settings
        self.cutter = UtteranceCutter(CutLimits.from_settings(settings))
        self.vad = SessionVad(
            name, ctx.vad, _Observed(ctx, self), self.cutter, settings.vad_silence_ms, self._cut
        )
        self._registry = registry
        self._on_segment = on_segment
        self._wait_s = settings.vad_progress_timeout_s
        # The segment being spoken, as far as the VAD has said (audio time).
        self.speech_start: int | None = None
        # (op number, audio end) of each frame on the current replica, until acknowledged.
        self._marks: deque[tuple[int, int]] = deque()
        self._marks_on: VadStreamClient | None = None

    @property
    def end(self) -> int:
        return self.cutter.end

    def start(self) -> None:
        self._registry.add(self)
        self.vad.start()

    async def feed(self, pcm: bytes) -> None:
        """Pass ``pcm`` on in frames, each once the replica is close enough behind.

        Raises ``VadUnavailable`` when no replica makes progress for
        ``vad_progress_timeout_s``."""
        step = FEED_SAMPLES * 2
        for offset in range(0, len(pcm), step):
            await self._room()
            chunk = pcm[offset : offset + step]
            self.cutter.append(chunk)
            self.vad.feed(chunk)
            client = self.vad.replica
            if client is not None and client is self._marks_on:
                self._marks.append((client.ops_queued, self.cutter.end))
            self.cutter.buffer.discard_before(self.vad.oldest_needed())

    async def finish(self, timeout: float) -> None:
        """End of input: speech in progress ends at the last frame; waits for the
        VAD to report it (bounded)."""
        self.vad.stop()
        deadline = time.monotonic() + timeout
        while self.vad.busy and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        self.close()

    def close(self) -> None:
        self.vad.close()
        self._registry.discard(self)

    def observe(self, event: vad_pb2.SpeechEvent) -> None:
        if event.kind == vad_pb2.SpeechEvent.SPEECH_START:
            self.speech_start = ms_to_samples(event.offset_ms)

    def _cut(self, start: int, end: int, cause: str) -> None:
        # A segment cut for length goes on as a new one from its cut.
        self.speech_start = end if cause == "max_length" else None
        utterance = self.cutter.cut(start, end, cause)
        if utterance is not None:
            self._on_segment(utterance)

    async def _room(self) -> None:
        deadline = time.monotonic() + self._wait_s
        while True:
            client = self.vad.replica
            if client is not None:
                if client is not self._marks_on:
                    # A new stream replays what it needs; count from here.
                    self._marks_on = client
                    self._marks.clear()
                while self._marks and self._marks[0][0] <= client.ops_done:
                    self._marks.popleft()
                if not self._marks or self._marks[0][1] > self.cutter.end - AHEAD_SAMPLES:
                    return
            if time.monotonic() > deadline:
                raise VadUnavailable("no VAD replica is taking audio")
            await asyncio.sleep(POLL_S)
