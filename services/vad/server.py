"""The VAD gRPC service: one multiplexed bidirectional stream per gateway."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np

from services.common.config import load_settings
from services.common.grpc_service import configure_logging, run_grpc_service
from services.common.inference import InferenceThread
from services.common.memory import limit_arenas
from services.protos import vad_pb2, vad_pb2_grpc
from services.vad.config import VadSettings
from services.vad.engine import VadEngine
from services.vad.streams import Outbox, StreamTable

log = logging.getLogger(__name__)

# Events waiting to go back to one gateway; a gateway that stops reading
# loses its connection rather than growing this without end.
OUTBOX_LIMIT = 100_000


def build_engine(settings: VadSettings) -> VadEngine:
    if settings.engine == "silero":
        from services.vad.silero import SileroVadEngine

        return SileroVadEngine(settings.silero_model)
    if settings.engine == "fsmn-stream":
        from services.vad.fsmn import FsmnVadEngine

        return FsmnVadEngine(settings.fsmn_model_dir, device=settings.device)
    from services.vad.fsmn_batched import BatchedFsmnVadEngine

    return BatchedFsmnVadEngine(
        settings.fsmn_model_dir, device=settings.device, precision=settings.precision
    )


def warm_up(engine: VadEngine) -> None:
    """Step a few streams of quiet noise through every path a live tick takes
    (streams in step, on scattered slots, a packet ahead or behind, starting,
    flushed), then close them: the first real ticks are not the ones that
    load the model's code, and what the process holds once streams have left
    is what it held before they came (measured: ~14 MB of libtorch code
    otherwise paged in under the first load, never counted in the baseline)."""
    rng = np.random.default_rng(0)
    ids = [f"warm-up/{i}" for i in range(12)]
    for stream_id in ids:
        engine.open(stream_id, 500)
    for stream_id in ids[::3]:
        engine.close(stream_id)
    live = [sid for sid in ids if sid not in ids[::3]]
    packet = 960
    for tick in range(8):
        chunks = {
            sid: (rng.standard_normal(packet * (1 + (i + tick) % 3)) * 1e-3).astype(np.float32)
            for i, sid in enumerate(live)
            if (i + tick) % 4
        }
        engine.step(chunks, live if tick == 7 else [])
    for stream_id in live:
        engine.close(stream_id)


class VadServicer(vad_pb2_grpc.VadServicer):
    def __init__(self, table: StreamTable) -> None:
        self._table = table
        self._connections = itertools.count(1)
        self._closing = asyncio.Event()

    def close_streams(self) -> None:
        """End every gateway's stream now (shutdown): each gateway moves its
        sessions to another replica at once instead of hearing nothing."""
        self._closing.set()

    async def Stream(
        self,
        request_iterator: AsyncIterator[vad_pb2.VadRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vad_pb2.VadResponse]:
        conn = next(self._connections)
        outbox: Outbox = asyncio.Queue(maxsize=OUTBOX_LIMIT)
        reader = asyncio.create_task(self._read(conn, outbox, request_iterator))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            while not (reader.done() and outbox.empty()):
                getter = asyncio.ensure_future(outbox.get())
                done, _ = await asyncio.wait(
                    {getter, reader, closing}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    if closing.done():
                        break
                    continue
                items = [getter.result()]
                while not outbox.empty() and len(items) < 1024:
                    items.append(outbox.get_nowait())
                yield _response(items)
                if closing.done():
                    break
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                log.warning("VAD connection %d failed: %s", conn, reader.exception())
        finally:
            closing.cancel()
            reader.cancel()
            self._table.drop_connection(conn)

    async def _read(
        self, conn: int, outbox: Outbox, requests: AsyncIterator[vad_pb2.VadRequest]
    ) -> None:
        async for request in requests:
            self._table.note_batch(conn, outbox, request.batch)
            for opened in request.opens:
                self._table.open(conn, outbox, opened)
            for frame in request.frames:
                self._table.feed(conn, outbox, frame)
            if request.HasField("block"):
                self._table.feed_block(conn, outbox, request.block)
            for closed in request.closes:
                self._table.close(conn, closed)


def _response(items: list[vad_pb2.SpeechEvent | int]) -> vad_pb2.VadResponse:
    response = vad_pb2.VadResponse()
    for item in items:
        if isinstance(item, int):
            response.acked_batch = max(response.acked_batch, item)
        else:
            response.events.append(item)
    return response


def main() -> None:
    settings = load_settings(VadSettings)
    configure_logging(settings.log_level)
    # The inference thread and gRPC's threads would each keep a tick's worth
    # of freed memory in an arena of their own.
    limit_arenas(2)
    inference = InferenceThread("vad")
    engine = inference.call(build_engine, settings)
    inference.call(warm_up, engine)
    table = StreamTable(
        engine,
        inference,
        default_silence_ms=settings.silence_ms,
        tick_ms=settings.tick_ms,
        max_streams=settings.max_streams,
        max_backlog_s=settings.max_backlog_s,
        max_step_s=settings.max_step_s,
        chunk_audio_s=settings.chunk_audio_s,
    )

    async def start() -> None:
        table.start()

    servicer = VadServicer(table)

    async def stop() -> None:
        servicer.close_streams()
        await table.stop()

    asyncio.run(
        run_grpc_service(
            "speechfront.vad.v1.Vad",
            settings,
            lambda server: vad_pb2_grpc.add_VadServicer_to_server(servicer, server),
            start,
            stop,
            # The event loop answers the plain health check even while the
            # inference thread is hung; a step that never returns must fail
            # liveness so the kubelet restarts the replica.
            alive=lambda: not table.stuck(settings.stuck_step_s),
        )
    )
