"""What the machine's core does right now, measured next to a live step.

A shared 2-core machine runs the same work 20 % faster or slower from one
minute to the next, so a live figure alone cannot say whether the service
or the machine moved. Each step of ``bench.listeners`` is therefore paired
with two fixed in-process workloads measured in the same minute:

- ``libopus_ms_per_device_s``: libopus (the gateway's binding, a fresh
  decoder) over the very packets the devices sent: the gateway's floor,
  what one device-second costs before any of the gateway's own work;
- ``engine_ms_per_stream_s``: the VAD's batched engine, built as the service
  builds it, stepping as many streams as there were devices, a 60 ms packet
  each per step: the replica's floor, what a stream-second costs with no
  gRPC, no event loop and no other process sharing the core.

The live figures over these say how much each service adds to its floor,
mostly apart from the machine's speed at that moment.
"""

from __future__ import annotations

import time
from functools import cache

import numpy as np
import torch

from services.gateway.opus import LibopusDecoder
from services.vad.config import VadSettings
from services.vad.engine import VadEngine
from services.vad.server import build_engine

PACKET_S = 0.06
_PACKET_SAMPLES = 960
_WARM_STEPS = 5


def libopus_ms_per_device_s(packets: list[bytes], repeat: int = 3) -> float:
    """libopus's CPU per second of audio on ``packets`` (one stream's, in order),
    the lowest of ``repeat`` passes."""
    best = float("inf")
    for _ in range(repeat):
        decoder = LibopusDecoder()
        started = time.process_time()
        for packet in packets:
            decoder.decode(packet)
        best = min(best, time.process_time() - started)
    return best * 1000 / (len(packets) * PACKET_S)


@cache
def _engine(precision: str) -> VadEngine:
    # One thread, as the local cluster runs every service (OMP_NUM_THREADS=1).
    torch.set_num_threads(1)
    return build_engine(VadSettings(precision=precision))


def engine_ms_per_stream_s(
    streams: int, audio: np.ndarray, precision: str, steps: int = 25
) -> float:
    """The VAD engine's CPU per stream-second, ``streams`` streams stepped together
    over ``steps`` packets of ``audio`` (float samples in [-1, 1))."""
    engine = _engine(precision)
    ids = [f"yardstick-{i}" for i in range(streams)]
    for stream_id in ids:
        engine.open(stream_id, 500)
    try:
        used = 0.0
        for step in range(_WARM_STEPS + steps):
            at = (step * _PACKET_SAMPLES) % (audio.size - _PACKET_SAMPLES)
            chunk = audio[at : at + _PACKET_SAMPLES]
            started = time.process_time()
            engine.step(dict.fromkeys(ids, chunk), [])
            if step >= _WARM_STEPS:
                used += time.process_time() - started
    finally:
        for stream_id in ids:
            engine.close(stream_id)
    return used * 1000 / (streams * steps * PACKET_S)
