"""Per-connection limits: budgets over a window, and what is kept of free text."""

from __future__ import annotations

import pytest

from services.gateway.errors import ConnectionRejected
from services.gateway.limits import (
    MAX_STORED_JSON_BYTES,
    InputGuard,
    InputLimits,
    bounded_json,
    short_text,
    validate_audio_params,
)

LIMITS = InputLimits(
    frames_per_s=50, audio_realtime_factor=2.0, text_messages_per_s=10, text_bytes_per_s=1000
)


def test_a_device_streaming_in_real_time_is_never_stopped() -> None:
    guard = InputGuard(LIMITS)
    for _ in range(80):  # 4.8 s of 60 ms packets, within one 5 s window
        guard.frame()
        guard.audio(0.06)


def test_audio_at_six_times_real_time_is_refused_within_the_window() -> None:
    guard = InputGuard(LIMITS)
    with pytest.raises(ConnectionRejected, match="faster than real time"):
        for _ in range(120):  # 14.4 s of audio: over 2x real time in 5 s plus 2 s
            guard.frame()
            guard.audio(0.12)


def test_many_small_text_messages_are_refused() -> None:
    guard = InputGuard(LIMITS)
    with pytest.raises(ConnectionRejected, match="too many text messages"):
        for _ in range(51):
            guard.text(10)


def test_a_few_large_text_messages_are_refused() -> None:
    guard = InputGuard(LIMITS)
    with pytest.raises(ConnectionRejected, match="byte rate"):
        for _ in range(10):
            guard.text(1000)


def test_free_text_is_cut_and_non_text_dropped() -> None:
    assert short_text("x" * 1000) == "x" * 128
    assert short_text({"nested": "object"}) == ""
    assert short_text(42) == "42"


def test_large_json_values_are_not_stored() -> None:
    small = {"mcp": True}
    assert bounded_json(small) == small
    large = {"features": "y" * (MAX_STORED_JSON_BYTES + 1)}
    assert bounded_json(large) == {"dropped": f"over {MAX_STORED_JSON_BYTES} bytes"}


@pytest.mark.parametrize(
    "params",
    [{"sample_rate": 96_000_000}, {"sample_rate": True}, {"channels": 2}, {"channels": True}],
)
def test_hello_audio_params_outside_what_is_decoded_are_refused(params: dict[str, object]) -> None:
    with pytest.raises(ConnectionRejected):
        validate_audio_params({"audio_params": {"format": "opus", **params}})


def test_the_firmware_hello_is_accepted() -> None:
    params = {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}
    validate_audio_params({"audio_params": params})
    validate_audio_params({})
