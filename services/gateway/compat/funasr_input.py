"""One FunASR input: from its config message to its end-of-input message.

Audio goes through a ``VadSegmenter`` (the shared VAD stream); every segment
it cuts is recognised through the shared, batched ASR (and speaker) services,
and the results are sent in segment order by a ``DeliveryQueue``. While a
segment is being spoken in ``online`` / ``2pass`` mode, the segment so far is
re-recognised every stride for a partial result (``_maybe_partial``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.audio import SAMPLE_RATE, float_to_pcm16, pcm16_to_float, resample
from services.common.audio import samples_to_ms as ms
from services.common.batched_rpc import LOW_PRIORITY, PRIORITY_KEY
from services.gateway import metrics as gateway_metrics
from services.gateway.compat import metrics
from services.gateway.compat.audio_files import decode_file
from services.gateway.compat.funasr_text import PartialText, tagged
from services.gateway.compat.segmenter import LiveSegmenters, VadSegmenter
from services.gateway.compat.voiceprints import best_match
from services.gateway.context import GatewayContext
from services.gateway.delivery import DeliveryQueue
from services.gateway.store import Voiceprint
from services.gateway.utterances import Utterance
from services.protos import asr_pb2

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[bool]]

# A partial that the batcher cannot finish within this (or a stride, if
# longer) is refused at once, its queue being behind: partials are dropped,
# never queued behind finals.
PARTIAL_DEADLINE_S = 1.0
OVERLOAD = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
# Partials queue behind every final in the ASR's batcher and are refused
# while one waits (services/common/batching.py).
LOW_PRIORITY_CALL = ((PRIORITY_KEY, LOW_PRIORITY),)
# The ASR batcher waits up to 10 ms to fill a batch: an answer queued much
# longer was behind others (see PartialGate).
QUEUE_HIGH_MS = 40.0
QUEUE_LOW_MS = 20.0
PROBE_S = 2.0


@dataclass(frozen=True)
class InputConfig:
    mode: str  # offline | online | 2pass
    wav_name: str
    stride: int  # samples between partials
    audio_fs: int
    container: bool  # the binary data is a whole file (wav_format other than pcm)
    itn: bool
    language: str
    tags: bool


class FileTooBig(ValueError):
    pass


class PartialGate:
    """Partials in flight on this gateway, under a limit that follows the ASR's queue.

    The batcher serves requests in arrival order, so every partial in its
    queue delays the finals behind it. The limit halves whenever a final or a
    partial reports a queue wait over ``QUEUE_HIGH_MS`` or a partial is
    refused, and grows by one for each answer that barely queued: partials
    use the room the finals leave and give it back as soon as they queue. At
    a limit of zero one partial goes every ``PROBE_S``, to notice the room.
    No partial starts while a final of this gateway's FunASR inputs is being
    recognised: in the batcher it would share the final's model call.
    """

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.limit = ceiling
        self.in_flight = 0
        self.finals = 0  # finals being recognised
        self._probe_at = 0.0

    def take(self) -> bool:
        if self.finals:
            return False
        if self.in_flight < self.limit:
            self.in_flight += 1
            return True
        now = time.monotonic()
        if self.ceiling and not self.limit and not self.in_flight and now >= self._probe_at:
            self._probe_at = now + PROBE_S
            self.in_flight += 1
            return True
        return False

    def give(self) -> None:
        self.in_flight -= 1

    def observe(self, queue_ms: float) -> None:
        """An ASR answer (final or partial) that waited ``queue_ms`` in the batcher."""
        if queue_ms > QUEUE_HIGH_MS:
            self.back_off()
        elif queue_ms < QUEUE_LOW_MS:
            self.limit = min(self.ceiling, self.limit + 1)

    def back_off(self) -> None:
        self.limit //= 2


class FunasrInput:
    def __init__(
        self,
        ctx: GatewayContext,
        registry: LiveSegmenters,
        gate: PartialGate,
        config: InputConfig,
        name: str,
        send: Send,
        prints: list[Voiceprint],
        max_file_bytes: int,
    ) -> None:
        self._ctx = ctx
        self._gate = gate
        self.config = config
        self._name = name
        self._send = send
        self._prints = prints
        self._max_file_bytes = max_file_bytes
        self._segmenter = VadSegmenter(ctx, registry, name, self._on_segment)
        self._delivery = DeliveryQueue(ctx.settings.max_inflight_utterances, name)
        self._file = bytearray()
        self._odd = b""  # a byte of a sample split between two messages
        self.error = ""
        self._overloaded = False
        # Offline mode holds each result back until the next one (or the end)
        # says whether it was the input's last: only that one is final.
        self._held: dict[str, Any] | None = None
        # Partials of the segment being spoken.
        self._segment = 0
        self._partial_from = 0  # audio end at the last partial's stride
        self._partial: asyncio.Task[None] | None = None
        self._text = PartialText()

    @property
    def partials(self) -> bool:
        return self.config.mode != "offline"

    def start(self) -> None:
        self._segmenter.start()

    # -- audio -----------------------------------------------------------

    async def audio(self, data: bytes) -> None:
        """One binary message: PCM at ``audio_fs``, or part of a file."""
        if self.config.container:
            if len(self._file) + len(data) > self._max_file_bytes:
                raise FileTooBig(f"file over {self._max_file_bytes} bytes")
            self._file += data
            return
        data, self._odd = self._odd + data, b""
        if len(data) % 2:
            data, self._odd = data[:-1], data[-1:]
        if self.config.audio_fs != SAMPLE_RATE:
            samples = resample(pcm16_to_float(data), self.config.audio_fs, SAMPLE_RATE)
            data = float_to_pcm16(samples)
        await self._feed(data)

    async def _feed(self, pcm: bytes) -> None:
        await self._segmenter.feed(pcm)
        if self.partials:
            self._maybe_partial()
        # Results are awaited by the caller's flow: at most this many
        # segments wait for text before more audio is read.
        while self._delivery.full:
            await asyncio.sleep(0.01)

    async def finish(self, timeout: float) -> None:
        """End of input: decode a file if one was sent, flush the VAD, deliver every result."""
        if self._file:
            data, self._file = bytes(self._file), bytearray()
            pcm = await asyncio.to_thread(decode_file, data, self._ctx.settings.openai_max_audio_s)
            await self._feed(pcm)
        await self._segmenter.finish(timeout)
        await self._delivery.wait_idle(timeout)

    def close(self) -> None:
        self._segmenter.close()
        if self._partial is not None:
            self._partial.cancel()

    # -- final results -----------------------------------------------------

    def _on_segment(self, utterance: Utterance) -> None:
        self._segment += 1
        self._partial_from = utterance.end
        self._delivery.submit(self._recognize(utterance), self._publish)

    async def _recognize(self, utterance: Utterance) -> tuple[Utterance, Any, Any]:
        request_id = f"{self._name}-{utterance.seq}"
        speaker = self._identify(utterance.pcm, request_id) if self._prints else _none()
        results: tuple[Any, Any] = await asyncio.gather(
            self._transcribe(utterance.pcm, request_id, self._ctx.settings.asr_timeout_s),
            speaker,
            return_exceptions=True,
        )
        return utterance, results[0], results[1]

    async def _transcribe(self, pcm: bytes, request_id: str, timeout: float) -> Any:
        started = time.monotonic()
        self._gate.finals += 1
        try:
            config = self.config
            return await self._ctx.compute.recognize(
                pcm, config.language, config.itn, request_id, timeout
            )
        finally:
            self._gate.finals -= 1
            gateway_metrics.COMPUTE_SECONDS.labels("asr").observe(time.monotonic() - started)

    async def _identify(self, pcm: bytes, request_id: str) -> Any:
        settings = self._ctx.settings
        embedding = await self._ctx.compute.embed(pcm, request_id, settings.speaker_timeout_s)
        return best_match(self._prints, embedding, settings.speaker_threshold)

    async def _publish(self, result: tuple[Utterance, Any, Any]) -> None:
        utterance, asr, match = result
        # The words of this segment sent as partials; the next segment starts afresh.
        sent, self._text = self._text, PartialText()
        if isinstance(asr, BaseException):
            code = asr.code() if isinstance(asr, grpc.aio.AioRpcError) else None
            self._overloaded = self._overloaded or code in OVERLOAD
            log.warning("%s: recognition failed: %s", self._name, asr)
            self.error = "speech service busy" if code in OVERLOAD else "recognition failed"
            return
        self._gate.observe(asr.queue_ms)
        if not asr.text.strip():
            return
        config = self.config
        text = tagged(asr, config.itn) if config.tags else asr.text
        if config.mode == "online":
            text = sent.rest(asr.text)
            if not text:
                return  # every word went out as a partial already
        message: dict[str, Any] = {
            "mode": {"offline": "offline", "online": "online"}.get(config.mode, "2pass-offline"),
            "wav_name": config.wav_name,
            "text": text,
            "is_final": False,
            "timestamp": [[ms(utterance.start), ms(utterance.end)]],
        }
        if not isinstance(match, BaseException) and match is not None:
            message["spk_name"], message["spk_score"] = match.speaker_id, match.score
        metrics.FINAL_SECONDS.observe(time.monotonic() - utterance.decided_at)
        if config.mode == "offline":
            held, self._held = self._held, message
            if held is not None:
                await self._emit(held)
        else:
            await self._emit(message)

    async def _emit(self, message: dict[str, Any]) -> None:
        metrics.FUNASR_RESULTS.labels(message["mode"]).inc()
        await self._send(message)

    def closing_message(self, is_end: bool) -> dict[str, Any]:
        """What ends the input: the held last result, or an empty one, marked final
        (or, when something failed, not final and with the error)."""
        config = self.config
        mode = "2pass-offline" if config.mode == "2pass" else config.mode
        message = self._held or {"mode": mode, "wav_name": config.wav_name, "text": ""}
        self._held = None
        message["is_final"] = not self.error
        if self.error:
            message["error"] = self.error
        if is_end:
            message["is_end"] = True
        return message

    @property
    def overloaded(self) -> bool:
        return self._overloaded

    # -- partials ------------------------------------------------------------

    def _maybe_partial(self) -> None:
        """Every stride of a segment being spoken, re-recognise it so far.

        Skipped (the next stride tries again) while this input's previous
        partial or any of its finals is in flight, or while the gateway has
        its share of partials in flight: a final never waits for a partial.
        """
        start = self._segmenter.speech_start
        end = self._segmenter.end
        if start is None:
            self._partial_from = end
            return
        if end - max(start, self._partial_from) < self.config.stride:
            return
        self._partial_from = end
        if self._partial is not None or self._delivery.pending or not self._gate.take():
            metrics.PARTIALS.labels("skipped").inc()
            return
        pcm = self._segmenter.cutter.buffer.slice(start, end)
        self._partial = asyncio.create_task(self._run_partial(pcm, self._segment, time.monotonic()))
        # A callback, not a finally: a task cancelled before it ran never enters its body.
        self._partial.add_done_callback(self._partial_done)

    def _partial_done(self, task: asyncio.Task[None]) -> None:
        self._gate.give()
        if self._partial is task:
            self._partial = None

    async def _run_partial(self, pcm: bytes, segment: int, stride_end: float) -> None:
        try:
            asr = await self._partial_call(pcm, f"{self._name}-p{segment}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.PARTIALS.labels("dropped").inc()
            log.debug("%s: partial dropped: %s", self._name, exc)
            self._gate.back_off()
            return
        self._gate.observe(asr.queue_ms)
        if segment != self._segment:
            metrics.PARTIALS.labels("stale").inc()  # its segment's final is on its way
            return
        new = self._text.update(asr.text)
        if not new:
            metrics.PARTIALS.labels("unchanged").inc()
            return
        mode = "online" if self.config.mode == "online" else "2pass-online"
        message = {"mode": mode, "wav_name": self.config.wav_name, "text": new, "is_final": False}
        await self._emit(message)
        metrics.PARTIALS.labels("sent").inc()
        metrics.PARTIAL_SECONDS.observe(time.monotonic() - stride_end)

    async def _partial_call(self, pcm: bytes, request_id: str) -> asr_pb2.RecognizeResponse:
        """One attempt on a replica in rotation, without the pool's hedges and retries.

        A final's call hedges on another replica and takes its replica out of
        rotation when an attempt goes unanswered past its budget; a partial's
        short deadline must not do either to the replicas the finals use.
        """
        replica = self._ctx.compute.asr_pool.pick()
        if replica is None or not replica.healthy:
            raise LookupError("no asr replica in rotation")
        config = self.config
        request = asr_pb2.RecognizeRequest(
            pcm=pcm,
            sample_rate=SAMPLE_RATE,
            language=config.language,
            use_itn=config.itn,
            request_id=request_id,
        )
        timeout = max(PARTIAL_DEADLINE_S, config.stride / SAMPLE_RATE)
        response: asr_pb2.RecognizeResponse = await replica.stub.Recognize(
            request, timeout=timeout, metadata=LOW_PRIORITY_CALL
        )
        return response


async def _none() -> None:
    return None
