"""FSMN-VAD batched across streams: one feature pass, one encoder call, one detector pass.

The per-stream engine (``services/vad/fsmn.py``) calls funasr's streaming
``generate()`` once per stream per tick, which asserts a batch of one and
spends most of its time in Python bookkeeping. This engine keeps every
stream's state in slot-indexed arrays instead and, per ``step``, runs

1. feature extraction for all streams with new audio (fsmn_features),
2. one encoder forward over all streams that produced frames, their FSMN
   memories stacked into the batch and scattered back (fsmn_encoder),
3. the end-point state machine, vectorised across streams (fsmn_endpoint).

Events match funasr's streaming ``generate()`` with ``max_end_silence_time``
pinned to the stream's ``silence_ms`` (no dynamic silence schedule).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from services.common.audio import samples_to_ms
from services.vad.engine import VadEvent
from services.vad.fsmn_encoder import BatchedFsmnEncoder, Precision, encoder_dtype
from services.vad.fsmn_endpoint import EndpointConfig, EndpointDetector
from services.vad.fsmn_features import FeatureState, OnlineLfrFrontend, even_key

_EMPTY = np.zeros(0, dtype=np.float32)
# Stream slots allocated at least (and the first allocation).
MIN_CAPACITY = 16


def _sized(streams: int) -> int:
    """Slots for ``streams`` and a quarter more, in whole multiples of MIN_CAPACITY."""
    want = max(MIN_CAPACITY, streams + streams // 4)
    return -(-want // MIN_CAPACITY) * MIN_CAPACITY


@dataclass
class _Stream:
    slot: int
    silence_ms: int
    features: FeatureState = field(default_factory=FeatureState)
    # Samples received since the detector was last reset, and before that.
    consumed: int = 0
    origin: int = 0


class BatchedFsmnVadEngine:
    """Not thread-safe, by design: only the inference thread calls it (see ``VadEngine``).

    Live streams always fill slots ``0..n-1``: ``open`` takes the next slot
    and ``close`` moves the stream in the last slot into the one it frees
    (one stream's state copied). The encoder reads and writes the memories
    of a tick's streams as slices of consecutive slots, and a replica whose
    streams come and go would otherwise leave holes that break them into
    many small copies (measured: 300 streams among 80 holes cost about 10 % more
    per stream-second than 300 opened together). ``_resize`` replaces the
    encoder and detector arrays a running ``step`` gathers from and scatters
    into.

    Capacity follows the live streams both ways, sized by use: it grows by a
    quarter when full and, once no more than half of it is live, shrinks to a
    quarter over the live count. An encoder slot holds ~39 kB of FSMN memory
    in float32 (half that in bfloat16):
    doubling left 300 streams with 512 slots (67 kB per stream, a third of it
    never used), and a replica that once held a thousand streams would
    otherwise keep ~40 MB for good.
    """

    name = "fsmn"

    def __init__(
        self,
        model_dir: Path | str,
        device: str = "cpu",
        max_encoder_batch: int = 512,
        precision: Precision = "auto",
    ) -> None:
        model_dir = Path(model_dir)
        config = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
        frontend_conf = config.get("frontend_conf", {})
        # The frontend is written for exactly these settings (the shipped model's).
        expected: dict[str, object] = {"fs": 16000, "n_mels": 80, "frame_length": 25}
        expected |= {"frame_shift": 10, "lfr_m": 5, "lfr_n": 1, "window": "hamming"}
        mismatched = {
            k: frontend_conf.get(k) for k, v in expected.items() if frontend_conf.get(k) != v
        }
        if mismatched or float(frontend_conf.get("dither", 1.0)) != 0.0:
            raise ValueError(f"{model_dir}: unsupported FSMN-VAD frontend settings {mismatched}")
        self._frontend = OnlineLfrFrontend(model_dir / "am.mvn")
        self._encoder = BatchedFsmnEncoder(
            model_dir / "model.pt",
            config["encoder_conf"],
            device,
            max_batch=max_encoder_batch,
            dtype=encoder_dtype(precision, device),
        )
        self._detector = EndpointDetector(EndpointConfig.from_model_conf(config["model_conf"]))
        self._streams: dict[str, _Stream] = {}
        # The live streams by slot.
        self._slots: list[_Stream] = []
        self._capacity = 0

    def open(self, stream_id: str, silence_ms: int) -> None:
        self.close(stream_id)
        slot = len(self._slots)
        if slot == self._capacity:
            self._resize(_sized(self._capacity + 1))
        self._encoder.reset(slot)
        self._detector.reset(slot, silence_ms)
        stream = _Stream(slot=slot, silence_ms=silence_ms)
        self._streams[stream_id] = stream
        self._slots.append(stream)

    def close(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        last = self._slots.pop()
        if last is not stream:
            self._encoder.move(last.slot, stream.slot)
            self._detector.move(last.slot, stream.slot)
            last.slot = stream.slot
            self._slots[stream.slot] = last
        live = len(self._slots)
        if live <= self._capacity // 2 and (smaller := _sized(live)) < self._capacity:
            self._resize(smaller)

    @property
    def capacity(self) -> int:
        """Stream slots allocated now."""
        return self._capacity

    def _resize(self, capacity: int) -> None:
        if capacity > self._capacity:
            self._encoder.ensure_capacity(capacity)
            self._detector.ensure_capacity(capacity)
        else:
            self._encoder.compact(len(self._slots), capacity)
            self._detector.compact(len(self._slots), capacity)
        self._capacity = capacity

    def step(self, chunks: Mapping[str, np.ndarray], final: Collection[str]) -> list[VadEvent]:
        ids = [sid for sid in dict.fromkeys([*chunks, *final]) if sid in self._streams]
        if not ids:
            return []
        streams = [self._streams[sid] for sid in ids]
        samples = [np.asarray(chunks.get(sid, _EMPTY), dtype=np.float32).reshape(-1) for sid in ids]
        is_final = [sid in final for sid in ids]
        # Live ticks bring most streams one packet and some none or two: each
        # set of streams that brings the same audio to the same held-over
        # samples goes through the features as one even batch (whole-batch
        # arrays, no per-stream splicing); only streams starting or ending
        # take the general path.
        even: dict[tuple[int, int], list[int]] = {}
        general: list[int] = []
        for i, (stream, chunk, fin) in enumerate(zip(streams, samples, is_final, strict=True)):
            stream.consumed += chunk.size
            key = even_key(stream.features, chunk, fin)
            if key is None:
                general.append(i)
            else:
                even.setdefault(key, []).append(i)
        extracted = [
            (
                group,
                self._frontend.extract_even(
                    [streams[i].features for i in group], [samples[i] for i in group]
                ),
            )
            for group in even.values()
        ]
        if general:
            features = self._frontend.extract(
                [streams[i].features for i in general],
                [samples[i] for i in general],
                [is_final[i] for i in general],
            )
            extracted.append((general, features))
        # Then one encoder call for all of them: a few streams a packet ahead
        # would otherwise pay a call's fixed cost of their own (measured: with
        # one stream in a hundred off by a packet, 25 % more per stream).
        rows, row_counts, p_sil = self._encode(
            streams,
            [i for group, _ in extracted for i in group],
            np.concatenate([feats for _, (feats, _) in extracted]),
            np.concatenate([counts for _, (_, counts) in extracted]),
        )
        events = self._detect(ids, streams, rows, row_counts, p_sil, is_final)
        for sid, stream, fin in zip(ids, streams, is_final, strict=True):
            if fin:
                events.extend(self._finish(sid, stream))
        return events

    def _encode(
        self, streams: list[_Stream], members: list[int], feats: np.ndarray, counts: np.ndarray
    ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The encoder over ``members`` (indices into ``streams``), whose feature
        rows are ``feats``, ``counts[j]`` of them for ``members[j]`` (none for a
        member without a whole frame yet). Returns the members it stepped, their
        frame counts and their silence posteriors (padded past each count)."""
        stepped = np.flatnonzero(counts)
        rows = [members[j] for j in stepped]
        if not rows:
            return rows, counts[:0], np.zeros((0, 0), dtype=np.float32)
        slots = np.array([streams[i].slot for i in rows], dtype=np.int64)
        batch_counts = counts[stepped]
        return rows, batch_counts, self._encoder.silence_posterior(slots, feats, batch_counts)

    def _detect(
        self,
        ids: list[str],
        streams: list[_Stream],
        rows: list[int],
        counts: np.ndarray,
        p_sil: np.ndarray,
        is_final: list[bool],
    ) -> list[VadEvent]:
        """One end-point pass over the encoded streams (``rows``, indices into
        ``streams``): its per-frame loop costs the same for one stream as for all."""
        if not rows:
            return []
        slots = np.array([streams[i].slot for i in rows], dtype=np.int64)
        speech = self._detector.is_speech(p_sil)
        final_rows = np.array([is_final[i] for i in rows], dtype=bool)
        events: list[VadEvent] = []
        for row, is_start, ms in self._detector.advance(slots, speech, counts, final_rows):
            i = rows[row]
            events.append(
                VadEvent(
                    ids[i],
                    "start" if is_start else "end",
                    samples_to_ms(streams[i].origin) + ms,
                )
            )
        return events

    def _finish(self, stream_id: str, stream: _Stream) -> list[VadEvent]:
        """After the last frame: speech funasr left open ends at the last sample,
        then the stream starts over (offsets keep counting from its origin)."""
        events: list[VadEvent] = []
        end = stream.origin + stream.consumed
        if self._detector.in_segment(stream.slot):
            events.append(VadEvent(stream_id, "end", samples_to_ms(end)))
        self._encoder.reset(stream.slot)
        self._detector.reset(stream.slot, stream.silence_ms)
        stream.features = FeatureState()
        stream.origin, stream.consumed = end, 0
        return events
