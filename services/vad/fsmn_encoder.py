"""The FSMN-VAD encoder run on a batch of streams, each with its own memory.

Same network as funasr's ``FSMN`` encoder (affine 400->140->250, ReLU, four
blocks of linear projection + causal depthwise memory of ``lorder`` frames +
affine + ReLU, affine 250->140->248, softmax), with weights from the
checkpoint. The memory blocks look only backwards, so streams with fewer new
frames are right-padded: the padding never reaches a real frame's output, and
each stream's next memory is cut from its own last real frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Padding a batch to its longest stream costs more than a batch per frame
# count once the padded frames exceed the real ones by this factor.
_PADDING_LIMIT = 1.25
# The memory convolution runs on batches padded to these many streams and to
# a few frame counts: oneDNN keeps a compiled kernel (~76 kB) per input shape
# it has seen, up to 1024 of them, and live ticks bring every batch size from
# one to hundreds (measured: ~70 MB kept after a few minutes, for good).
# Padding never reaches a real output: streams are independent and the
# memory only looks back.
_CONV_ROWS = 32


def _conv_frames(frames: int) -> int:
    if frames <= 24:
        return -(-frames // 6) * 6
    return 1 << (frames - 1).bit_length()


class BatchedFsmnEncoder:
    def __init__(
        self, checkpoint: Path, conf: dict[str, Any], device: str = "cpu", max_batch: int = 256
    ) -> None:
        self.max_batch = max_batch
        if int(conf.get("rorder", 0)) != 0 or int(conf.get("lstride", 1)) != 1:
            raise ValueError("only causal FSMN memory with stride 1 is supported")
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        self._device = torch.device(device)
        self._layers = int(conf["fsmn_layers"])
        self._proj = int(conf["proj_dim"])
        self._memory = int(conf["lorder"]) - 1

        def param(name: str) -> torch.Tensor:
            return state[f"encoder.{name}"].to(self._device, torch.float32).contiguous()

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
        # Memory of every slot: (slots, layers, lorder - 1, proj), time-major like
        # the activations, so a step reads and writes each memory in whole rows.
        self._cache = torch.zeros(0, self._layers, self._memory, self._proj, device=self._device)

    def ensure_capacity(self, capacity: int) -> None:
        if capacity > self._cache.shape[0]:
            grow = torch.zeros(
                capacity - self._cache.shape[0],
                self._layers,
                self._memory,
                self._proj,
                device=self._device,
            )
            self._cache = torch.cat([self._cache, grow])

    def compact(self, slots: np.ndarray, capacity: int) -> None:
        """Keep only ``slots``' memories, moved to slots ``0..len(slots)-1`` in that
        order, in storage for ``capacity`` slots (the rest zero)."""
        kept = torch.zeros(capacity, self._layers, self._memory, self._proj, device=self._device)
        if slots.size:
            kept[: slots.size] = self._cache[torch.from_numpy(slots).to(self._device)]
        self._cache = kept

    @property
    def capacity(self) -> int:
        return int(self._cache.shape[0])

    def reset(self, slot: int) -> None:
        self._cache[slot] = 0.0

    @torch.inference_mode()
    def silence_posterior(
        self, slots: np.ndarray, feats: np.ndarray, counts: np.ndarray
    ) -> np.ndarray:
        """``feats``: (sum(counts), 400) rows of the streams in ``slots``, in order.

        Returns (len(slots), max(counts)) float32 silence probabilities; entries
        past a stream's count are padding.
        """
        longest = int(counts.max(initial=0))
        total = int(counts.sum())
        if slots.size > 1 and slots.size * longest > _PADDING_LIMIT * total:
            return self._by_count(slots, feats, counts, longest)
        if slots.size <= self.max_batch:
            return self._forward(slots, feats, counts)
        # Bounded sub-batches keep activations and memories cache-resident; one
        # huge batch measured slower per stream on CPU.
        out = np.zeros((slots.size, longest), dtype=np.float32)
        ends = np.cumsum(counts)
        for lo in range(0, slots.size, self.max_batch):
            hi = min(lo + self.max_batch, slots.size)
            first = int(ends[lo - 1]) if lo else 0
            part = self._forward(slots[lo:hi], feats[first : ends[hi - 1]], counts[lo:hi])
            out[lo:hi, : part.shape[1]] = part
        return out

    def _by_count(
        self, slots: np.ndarray, feats: np.ndarray, counts: np.ndarray, longest: int
    ) -> np.ndarray:
        """One batch per distinct frame count. Live ticks bring most streams one
        packet and a few none or two; padded to the longest, every stream would
        run twice the frames it has (measured: the encoder's cost per stream
        second doubled with one stream in ten off by a packet)."""
        out = np.zeros((slots.size, longest), dtype=np.float32)
        starts = np.cumsum(counts) - counts
        for count in np.unique(counts):
            if count == 0:
                continue
            members = np.flatnonzero(counts == count)
            rows = (starts[members][:, None] + np.arange(count)).reshape(-1)
            out[members, :count] = self.silence_posterior(
                slots[members], feats[rows], counts[members]
            )
        return out

    def _forward(self, slots: np.ndarray, feats: np.ndarray, counts: np.ndarray) -> np.ndarray:
        n, longest = slots.size, int(counts.max(initial=0))
        uniform = bool((counts == longest).all())
        rows = torch.from_numpy(feats).to(self._device)
        if uniform:
            # The usual tick: every stream brought the same number of frames.
            x = rows.view(n, longest, self.input_dim)
        else:
            lengths = torch.from_numpy(counts).to(self._device)
            x = torch.zeros(n, longest, self.input_dim, device=self._device)
            row = torch.repeat_interleave(torch.arange(n, device=self._device), lengths)
            col = (
                torch.arange(row.numel(), device=self._device)
                - (torch.cumsum(lengths, 0) - lengths)[row]
            )
            x[row, col] = rows
            keep = (lengths[:, None] + torch.arange(self._memory, device=self._device))[:, :, None]
            keep = keep.expand(n, self._memory, self._proj)

        # Streams opened together hold consecutive slots; then their memories
        # are a view, read and updated in place. Otherwise each layer's
        # memories are gathered into that layer's input and scattered back
        # from its output, as whole rows.
        lo = int(slots[0])
        contiguous = bool((slots == np.arange(lo, lo + n)).all())
        index = None if contiguous else torch.from_numpy(slots).to(self._device)
        cache = self._cache[lo : lo + n]

        h = F.linear(x, *self._in[0])
        h = F.relu(F.linear(h, *self._in[1]))
        # (streams, memory + frames, proj), time-major, padded (see _CONV_ROWS).
        span = self._memory + longest
        padded = torch.empty(
            -(-n // _CONV_ROWS) * _CONV_ROWS,
            self._memory + _conv_frames(longest),
            self._proj,
            device=self._device,
        )
        padded[n:] = 0.0
        padded[:n, span:] = 0.0
        for layer, (proj_w, memory_w, affine_w, affine_b) in enumerate(self._blocks):
            p = F.linear(h, proj_w)  # (n, time, proj)
            padded[:n, : self._memory] = (
                cache[:, layer] if index is None else self._cache[index, layer]
            )
            padded[:n, self._memory : span] = p
            # The causal depthwise memory as a channels-last conv2d over the
            # time-major rows: the same sums as conv1d over (n, proj, time),
            # bit for bit, without a channel-first copy of the memories and
            # activations in and out of every layer (measured 13x less time
            # for this part of the layer).
            memory = F.conv2d(padded.permute(0, 2, 1).unsqueeze(2), memory_w, groups=self._proj)
            kept = padded[:n, longest:span] if uniform else torch.gather(padded[:n, :span], 1, keep)
            if index is None:
                cache[:, layer] = kept
            else:
                self._cache[index, layer] = kept
            memory = memory[:n, :, 0, :longest].permute(0, 2, 1)
            h = F.relu(F.linear(p + memory, affine_w, affine_b))
        h = F.linear(h, *self._out[0])
        logits = F.linear(h, *self._out[1])
        return torch.softmax(logits, dim=-1)[..., 0].cpu().numpy()
