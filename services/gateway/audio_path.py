"""Settings of the listening audio path: Opus decoding and the wire to the VAD.

Each choice keeps the earlier path selectable, so a benchmark can run both
against the same cluster build (``bench.listeners``) and an operator can
fall back without a release. Read once per process from the gateway's
``SF_GATEWAY_`` environment.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AudioPathSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SF_GATEWAY_", extra="ignore")

    # "direct": libopus called into one preallocated buffer per thread;
    # "opuslib": the opuslib binding (a fresh buffer and a list of Python
    # ints per packet), kept as the baseline.
    opus_binding: Literal["direct", "opuslib"] = "direct"
    # "ticks": every session's frames of one short tick travel as one packed
    # VadRequest; "frames": one AudioFrame message per frame, merged only
    # while a backlog waits (the earlier path).
    vad_wire: Literal["ticks", "frames"] = "ticks"
    # 20 ms: a gateway writes at most 50 times a second to each replica
    # however many devices listen, and a write costs both ends more than its
    # bytes do (at 300 listening devices, against 5 ms: 2-4 % less gateway
    # CPU and 5-8 % less VAD CPU). A frame waits 10 ms on average before its
    # write (2.5 at 5 ms), against the VAD's own 60 ms tick.
    vad_send_tick_ms: float = Field(
        20.0, gt=0, le=20, description="How long frames for a VAD replica gather before a write."
    )


@cache
def audio_path_settings() -> AudioPathSettings:
    return AudioPathSettings()
