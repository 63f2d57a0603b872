"""The FSMN-VAD encoder run on a batch of streams, each with its own memory.

Same network as funasr's ``FSMN`` encoder (affine 400->140->250, ReLU, four
blocks of linear projection + causal depthwise memory of ``lorder`` frames +
affine + ReLU, affine 250->140->248, softmax), with weights from the
checkpoint. Every product runs once over the real frames of all streams;
the causal memory runs per run of streams bringing the same frame count
(``_Run``), each stream's next memory cut from its own last frames.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

# The memory convolution runs on batches padded to these many streams and to
# a few frame counts: oneDNN keeps a compiled kernel (~76 kB) per input shape
# it has seen, up to 1024 of them, and live ticks bring every batch size from
# one to hundreds (measured: ~70 MB kept after a few minutes, for good).
# Padding never reaches a real output: streams are independent and the
# memory only looks back.
_CONV_ROWS = 32
# Slices of consecutive slots a run's memories are read and written in, at
# most; past that, one gather and one scatter by index (see _Run).
_MAX_BLOCKS = 16
# Rows per matrix product, and the fewest a product is padded to (see _linear).
_BLOCK_ROWS = 512
_MIN_BLOCK_ROWS = 16


Precision = Literal["auto", "fp32", "bf16"]


def encoder_dtype(precision: Precision, device: str = "cpu") -> torch.dtype:
    """The encoder's weights, activations and memories in bfloat16 halve its cost
    on a CPU that multiplies bfloat16 natively (measured on AVX512-BF16: the
    twelve products 1.08 -> 0.50 ms per stream-second). Without bfloat16
    instructions oneDNN converts every operand to float32 and back, so
    ``auto`` keeps float32 there. The products still sum in float32, and the
    softmax runs in float32; boundaries move by at most a frame (10 ms)
    against float32 (tests/test_vad_precision.py)."""
    if precision == "auto":
        native = torch.device(device).type == "cpu" and _cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _cpu_has_native_bf16() -> bool:
    # Not torch.ops.mkldnn's bf16 check: it also says yes to AVX-512 without BF16.
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` over ``x``'s rows in blocks of a few fixed sizes, whatever
    the batch: oneDNN, which runs the bfloat16 products, compiles and keeps a
    kernel for every shape it meets (measured: ~0.6 MB each, kept for good;
    live batches of every size grew a replica by 160 MB in 15 s). Blocks are
    _BLOCK_ROWS rows, then the powers of two the remainder is made of, the
    last padded to _MIN_BLOCK_ROWS: at most 15 padded rows. Rows are
    independent, so the padding never reaches a real output."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for lo, hi in _row_blocks(rows.shape[0]):
        block, into = rows[lo:hi], out[lo:hi]
        if hi - lo < _MIN_BLOCK_ROWS:
            padded = F.pad(block, (0, 0, 0, _MIN_BLOCK_ROWS - (hi - lo)))
            into.copy_(F.linear(padded, weight, bias)[: hi - lo])
        elif bias is None:
            torch.mm(block, weight.t(), out=into)
        else:
            # Into the output's rows directly: 5 % less than a product and a copy.
            torch.addmm(bias, block, weight.t(), out=into)
    return out.view(*x.shape[:-1], weight.shape[0])


def _row_blocks(total: int) -> list[tuple[int, int]]:
    blocks = [(lo, lo + _BLOCK_ROWS) for lo in range(0, total - _BLOCK_ROWS + 1, _BLOCK_ROWS)]
    lo = len(blocks) * _BLOCK_ROWS
    size = _BLOCK_ROWS // 2
    while total - lo >= _MIN_BLOCK_ROWS:
        if total - lo >= size:
            blocks.append((lo, lo + size))
            lo += size
        size //= 2
    if lo < total:
        blocks.append((lo, total))
    return blocks


def _conv_frames(frames: int) -> int:
    if frames <= 24:
        return -(-frames // 6) * 6
    return 1 << (frames - 1).bit_length()


class BatchedFsmnEncoder:
    def __init__(
        self,
        checkpoint: Path,
        conf: dict[str, Any],
        device: str = "cpu",
        max_batch: int = 512,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_batch = max_batch
        self._dtype = dtype
        if int(conf.get("rorder", 0)) != 0 or int(conf.get("lstride", 1)) != 1:
            raise ValueError("only causal FSMN memory with stride 1 is supported")
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        self._device = torch.device(device)
        self._layers = int(conf["fsmn_layers"])
        self._proj = int(conf["proj_dim"])
        self._memory = int(conf["lorder"]) - 1

        def param(name: str) -> torch.Tensor:
            return state[f"encoder.{name}"].to(self._device, dtype).contiguous()

        self._in = [
            (param(f"{n}.linear.weight"), param(f"{n}.linear.bias"))
            for n in ("in_linear1", "in_linear2")
        ]
        self._out = [
            (param(f"{n}.linear.weight"), param(f"{n}.linear.bias"))
            for n in ("out_linear1", "out_linear2")
        ]
        self._blocks = [
            (
                param(f"fsmn.{i}.linear.linear.weight"),
                # (proj, 1, lorder, 1) -> (proj, 1, 1, lorder), channels last: see _forward
                param(f"fsmn.{i}.fsmn_block.conv_left.weight")
                .transpose(2, 3)
                .contiguous(memory_format=torch.channels_last),
                param(f"fsmn.{i}.affine.linear.weight"),
                param(f"fsmn.{i}.affine.linear.bias"),
            )
            for i in range(self._layers)
        ]
        self.input_dim = int(self._in[0][0].shape[1])
        # Memory of every slot: (layers, slots, lorder - 1, proj), time-major like
        # the activations, so a step reads and writes each memory in whole rows,
        # and layer-major, so one layer's memories of scattered slots are one
        # index_select / index_copy_ of whole blocks.
        self._cache = self._zeros(0)
        self._compile_products()

    def _compile_products(self) -> None:
        """Every product at every block size once, now: oneDNN compiles a kernel
        the first time it meets a shape, so the first live ticks would pay for
        it and the replica's memory would grow after its warm-up baseline."""
        weights: list[tuple[torch.Tensor, torch.Tensor | None]] = [*self._in, *self._out]
        weights += [(w, None) for w, _, _, _ in self._blocks]
        weights += [(w, b) for _, _, w, b in self._blocks]
        size = _MIN_BLOCK_ROWS
        with torch.inference_mode():
            while size <= _BLOCK_ROWS:
                for weight, bias in weights:
                    rows = torch.zeros(
                        size, weight.shape[1], device=self._device, dtype=self._dtype
                    )
                    _linear(rows, weight, bias)
                size *= 2

    def ensure_capacity(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._cache = torch.cat([self._cache, self._zeros(capacity - self.capacity)], dim=1)

    def compact(self, live: int, capacity: int) -> None:
        """Keep the memories of the first ``live`` slots, in storage for
        ``capacity`` slots (the rest zero)."""
        kept = self._zeros(capacity)
        kept[:, :live] = self._cache[:, :live]
        self._cache = kept

    def _zeros(self, slots: int) -> torch.Tensor:
        return torch.zeros(
            self._layers, slots, self._memory, self._proj, device=self._device, dtype=self._dtype
        )

    @property
    def capacity(self) -> int:
        return int(self._cache.shape[1])

    def reset(self, slot: int) -> None:
        self._cache[:, slot] = 0.0

    def move(self, source: int, target: int) -> None:
        """Slot ``target`` takes ``source``'s memories."""
        self._cache[:, target] = self._cache[:, source]

    @torch.inference_mode()
    def silence_posterior(
        self, slots: np.ndarray, feats: np.ndarray, counts: np.ndarray
    ) -> np.ndarray:
        """``feats``: (sum(counts), 400) rows of the streams in ``slots``, in order;
        every count at least one.

        Returns (len(slots), max(counts)) float32 silence probabilities; entries
        past a stream's count are padding.
        """
        order = np.lexsort((slots, counts))
        if (order != np.arange(order.size)).any():
            # Streams in order of frame count, so each count is one run, and
            # within a run in slot order, so its memories are a few blocks.
            starts = np.cumsum(counts) - counts
            ordered = counts[order]
            rows = np.repeat(starts[order] - (np.cumsum(ordered) - ordered), ordered)
            rows += np.arange(rows.size)
            out = np.empty((slots.size, int(counts.max())), dtype=np.float32)
            out[order] = self.silence_posterior(slots[order], feats[rows], ordered)
            return out
        if slots.size <= self.max_batch:
            return self._forward(slots, feats, counts)
        # Bounded sub-batches keep activations and memories cache-resident; one
        # huge batch measured slower per stream on CPU. Even ones: a small
        # remainder would pay a whole call's fixed cost for a few streams.
        out = np.zeros((slots.size, int(counts.max())), dtype=np.float32)
        ends = np.cumsum(counts)
        parts = -(-slots.size // self.max_batch)
        bounds = [slots.size * k // parts for k in range(parts + 1)]
        for lo, hi in itertools.pairwise(bounds):
            first = int(ends[lo - 1]) if lo else 0
            part = self._forward(slots[lo:hi], feats[first : ends[hi - 1]], counts[lo:hi])
            out[lo:hi, : part.shape[1]] = part
        return out

    def _forward(self, slots: np.ndarray, feats: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Streams in runs of equal frame count (``counts`` non-decreasing).
        Every product runs once over all real frames, packed; each run's memory
        convolution runs on that run alone, so no frame is padded to another
        stream's count (live ticks bring most streams one packet and a few
        two: padded to the longest, every stream would run twice its frames)."""
        runs = [_Run(self, slots, counts, lo, hi) for lo, hi in _equal_runs(counts)]
        h = _linear(torch.from_numpy(feats).to(self._device, self._dtype), *self._in[0])
        h = F.relu(_linear(h, *self._in[1]))
        for layer, (proj_w, memory_w, affine_w, affine_b) in enumerate(self._blocks):
            p = _linear(h, proj_w)  # (rows, proj)
            summed = torch.empty_like(p)
            for run in runs:
                run.add_memory(layer, memory_w, p[run.rows], summed[run.rows])
            h = F.relu(_linear(summed, affine_w, affine_b))
        h = _linear(h, *self._out[0])
        silence = torch.softmax(_linear(h, *self._out[1]).float(), dim=-1)[:, 0].cpu().numpy()
        out = np.zeros((slots.size, int(counts[-1])), dtype=np.float32)
        for run in runs:
            out[run.streams, : run.count] = silence[run.rows].reshape(-1, run.count)
        return out


def _equal_runs(counts: np.ndarray) -> list[tuple[int, int]]:
    """(lo, hi) of each run of equal values in ``counts``."""
    edges = [0, *(np.flatnonzero(np.diff(counts)) + 1).tolist(), counts.size]
    return list(itertools.pairwise(edges))


class _Run:
    """Streams ``lo:hi`` of a batch, each bringing ``count`` frames: their FSMN
    memories, and the scratch their memory convolution runs in."""

    def __init__(
        self, encoder: BatchedFsmnEncoder, slots: np.ndarray, counts: np.ndarray, lo: int, hi: int
    ) -> None:
        self.count = count = int(counts[lo])
        self.streams = slice(lo, hi)
        first = int(counts[:lo].sum())
        self.rows = slice(first, first + (hi - lo) * count)
        self._n = n = hi - lo
        self._memory = encoder._memory
        self._proj = encoder._proj
        # Its memories: the slots' blocks in the cache, each a slice of
        # consecutive slots (live streams fill the lowest slots, and a tick
        # steps most of them), read and written in place; gathered
        # and scattered by index when there are many (measured: index_copy_
        # takes 6 times as long as a slice copy).
        self._cache = encoder._cache
        run_slots = slots[lo:hi]
        breaks = np.flatnonzero(np.diff(run_slots) != 1) + 1
        edges = [0, *breaks.tolist(), n] if breaks.size < _MAX_BLOCKS else []
        self._blocks = [
            (slice(a, b), slice(int(run_slots[a]), int(run_slots[a]) + b - a))
            for a, b in itertools.pairwise(edges)
        ]
        self._index = torch.from_numpy(run_slots).to(encoder._device)
        # (streams, memory + frames, proj), time-major, padded (see _CONV_ROWS),
        # zero past the run's streams and frames for every layer.
        self._padded = torch.zeros(
            -(-n // _CONV_ROWS) * _CONV_ROWS,
            self._memory + _conv_frames(count),
            self._proj,
            device=encoder._device,
            dtype=encoder._dtype,
        )

    def add_memory(
        self, layer: int, weight: torch.Tensor, p: torch.Tensor, out: torch.Tensor
    ) -> None:
        """``out`` = ``p`` + its causal memory, for this run's rows of one layer."""
        n, count, memory, proj = self._n, self.count, self._memory, self._proj
        padded = self._padded
        cache = self._cache[layer]
        if self._blocks:
            for streams, slots in self._blocks:
                padded[streams, :memory] = cache[slots]
        else:
            padded[:n, :memory] = cache.index_select(0, self._index)
        padded[:n, memory : memory + count] = p.view(n, count, proj)
        # The causal depthwise memory as a channels-last conv2d over the
        # time-major rows: the same sums as conv1d over (n, proj, time), bit
        # for bit, without a channel-first copy of the memories and activations
        # in and out of every layer (measured 13x less time for this part of
        # the layer). Its output, channels last, is (rows, 1, time, proj).
        convolved = F.conv2d(padded.permute(0, 2, 1).unsqueeze(2), weight, groups=proj)
        convolved = convolved.permute(0, 2, 3, 1)[:n, 0, :count]
        kept = padded[:n, count : count + memory]
        if self._blocks:
            for streams, slots in self._blocks:
                cache[slots] = kept[streams]
        else:
            cache.index_copy_(0, self._index, kept)
        torch.add(p.view(n, count, proj), convolved, out=out.view(n, count, proj))
