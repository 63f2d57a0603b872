"""What a VAD client has queued for one connection, and how it goes on the wire.

Sessions queue opens, frames and closes in order; the connection's sender
takes a prefix of that queue for each ``VadRequest``. Two wire forms:

- ``ticks``: the sender waits out a short tick before each write, so every
  session's frames of that tick leave together, packed in columns into one
  ``FrameBlock`` (ids, seqs, lengths and one byte string). A thousand
  listening devices cost two hundred writes a second, not seventeen thousand,
  and no protobuf message per frame on either side.
- ``frames``: one ``AudioFrame`` message per frame, written as soon as the
  sender gets to it (merged only while a backlog waits): the earlier path,
  kept so benchmarks can compare the two in one run.

A request holds a prefix of the queue and the server applies its opens, then
its frames, then its closes. Stream ids are never reused, so for each stream
that is the order it was queued in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Literal

from services.protos import vad_pb2

WireForm = Literal["ticks", "frames"]

# (stream id, seq, PCM): a frame waiting to go.
Frame = tuple[str, int, bytes]
Op = vad_pb2.StreamOpen | vad_pb2.StreamClose | Frame

# Operations in one request at most (the frames form).
MAX_OPS_PER_MESSAGE = 512
# PCM in one block at most: a replay burst or a backlog after a stall goes
# out in several writes of bounded size, back to back.
MAX_BLOCK_PCM_BYTES = 1 << 20


class Outgoing:
    """One connection's queue. A connection that ends is *retired*: its
    sender stops, and what it still held was never sent."""

    def __init__(self) -> None:
        self.ops: deque[Op] = deque()
        self.ready = asyncio.Event()
        self.retired = False

    def put(self, op: Op) -> None:
        self.ops.append(op)
        if not self.ready.is_set():
            self.ready.set()

    def retire(self) -> int:
        """Stop this queue's sender; returns how many operations it never sent."""
        left = len(self.ops)
        self.ops.clear()
        self.retired = True
        self.ready.set()
        return left

    def take(self, form: WireForm) -> tuple[vad_pb2.VadRequest, int, bool]:
        """The next request from the front of the queue: (request, operations, has audio)."""
        request = vad_pb2.VadRequest()
        ops = self.ops
        if form == "frames":
            taken = min(len(ops), MAX_OPS_PER_MESSAGE)
            for _ in range(taken):
                op = ops.popleft()
                if isinstance(op, tuple):
                    request.frames.append(vad_pb2.AudioFrame(stream_id=op[0], seq=op[1], pcm=op[2]))
                elif isinstance(op, vad_pb2.StreamOpen):
                    request.opens.append(op)
                else:
                    request.closes.append(op)
            has_audio = len(request.frames) > 0
        else:
            taken, has_audio = _take_block(ops, request)
        if not ops:
            self.ready.clear()
        return request, taken, has_audio


def _take_block(ops: deque[Op], request: vad_pb2.VadRequest) -> tuple[int, bool]:
    ids: list[str] = []
    seqs: list[int] = []
    lengths: list[int] = []
    pcm: list[bytes] = []
    size = 0
    taken = 0
    while ops:
        op = ops[0]
        if type(op) is tuple:
            data = op[2]
            if ids and size + len(data) > MAX_BLOCK_PCM_BYTES:
                break
            ops.popleft()
            taken += 1
            if len(data) & 1:
                data = data[:-1]  # a stray byte would shift every later frame's samples
            ids.append(op[0])
            seqs.append(op[1])
            lengths.append(len(data) >> 1)
            pcm.append(data)
            size += len(data)
            continue
        ops.popleft()
        taken += 1
        if isinstance(op, vad_pb2.StreamOpen):
            request.opens.append(op)
        else:
            request.closes.append(op)  # type: ignore[arg-type]
    if ids:
        block = request.block
        block.stream_ids.extend(ids)
        block.seqs.extend(seqs)
        block.samples.extend(lengths)
        block.pcm = b"".join(pcm)
    return taken, bool(ids)
