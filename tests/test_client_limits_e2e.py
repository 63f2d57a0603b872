"""One connection's flood closes that connection; a bystander still gets its text.

Each test runs a flood against the local cluster while another device speaks,
and checks both: the flooder is closed with 1008 and a reason, and the
bystander's sentence comes back as usual.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np
import opuslib
import pytest
import redis
from conftest import DeviceFactory
from support.wer import word_error_rate

from services.common.audio import SAMPLE_RATE, float_to_pcm16
from services.gateway.framing import PayloadType, encode_frame
from services.simulator.device import SimulatedDevice
from services.simulator.speech import synthesize

pytestmark = pytest.mark.e2e

BYSTANDER_SENTENCE = "turn the heating up a little"


async def with_bystander(
    make_device: DeviceFactory,
    flood: Callable[[SimulatedDevice], Awaitable[None]],
    **device: object,
) -> tuple[SimulatedDevice, tuple[int | None, str]]:
    bystander = make_device()
    await bystander.connect()
    heard = asyncio.ensure_future(bystander.speak_auto([synthesize(BYSTANDER_SENTENCE)]))
    await asyncio.sleep(0.5)
    flooder = make_device(**device)
    await flooder.connect()
    flooding = asyncio.ensure_future(flood(flooder))
    closed = await flooder.wait_closed(15)
    flooding.cancel()
    [result] = await heard
    assert word_error_rate([BYSTANDER_SENTENCE], [result.text]) <= 0.2, result.text
    assert result.latency_s is not None and result.latency_s < 5.0, result.latency_s
    return flooder, closed


async def until_closed(device: SimulatedDevice, send: Callable[[], Awaitable[None]]) -> None:
    """Send until the gateway closes the connection (bounded in count)."""
    for _ in range(100_000):
        if device.closed.is_set():
            return
        try:
            await send()
        except Exception:
            return
        await asyncio.sleep(0)


async def test_a_flood_of_listen_toggles_closes_that_connection(make_device: DeviceFactory) -> None:
    async def toggle(device: SimulatedDevice) -> None:
        states = iter(["start", "stop"] * 50_000)
        await until_closed(device, lambda: device.listen(next(states), "auto"))

    _, (code, reason) = await with_bystander(make_device, toggle)
    assert code == 1008 and "too many text messages" in reason


async def test_large_abort_messages_close_that_connection(make_device: DeviceFactory) -> None:
    reason_text = "x" * 60_000

    async def abort(device: SimulatedDevice) -> None:
        await until_closed(
            device, lambda: device.send_json({"type": "abort", "reason": reason_text})
        )

    _, (code, reason) = await with_bystander(make_device, abort)
    assert code == 1008 and "byte rate" in reason


async def test_audio_faster_than_real_time_closes_that_connection(
    make_device: DeviceFactory,
) -> None:
    """120 ms packets at 6x real time stay under the frame-count limit but not the audio one."""
    encoder = opuslib.Encoder(SAMPLE_RATE, 1, opuslib.APPLICATION_VOIP)
    frame = float_to_pcm16(0.05 * np.sin(np.arange(SAMPLE_RATE * 120 // 1000) / 7.0))
    packet = encoder.encode(frame, SAMPLE_RATE * 120 // 1000)

    async def fast(device: SimulatedDevice) -> None:
        started = time.monotonic()
        for index in range(2000):  # 240 s of audio at most, sent in 40 s at most
            if device.closed.is_set():
                return
            delay = started + index * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await device.send_raw(encode_frame(3, packet, PayloadType.OPUS))
            except Exception:
                return

    async def flood(device: SimulatedDevice) -> None:
        await device.listen("start", "auto")
        await fast(device)

    hello_120ms = {"audio_params": {"format": "opus", "frame_duration": 120}}
    _, (code, reason) = await with_bystander(make_device, flood, hello_extra=hello_120ms)
    assert code == 1008 and "faster than real time" in reason


async def test_free_text_is_stored_truncated(
    make_device: DeviceFactory, redis_client: redis.Redis
) -> None:
    device = make_device()
    await device.connect()
    await device.send_json({"type": "abort", "reason": "y" * 5000})
    key = f"sf:session:{device.session_id}"
    for _ in range(200):
        if redis_client.hget(key, "last_abort"):
            break
        await asyncio.sleep(0.02)
    stored = redis_client.hget(key, "last_abort")
    assert stored is not None and 0 < len(stored) <= 128


@pytest.mark.parametrize(
    ("params", "fragment"),
    [({"sample_rate": 96_000_000}, "sample_rate"), ({"channels": 2}, "channels")],
    ids=["sample_rate", "channels"],
)
async def test_a_hello_with_unsupported_audio_params_is_refused(
    make_device: DeviceFactory, params: dict[str, int], fragment: str
) -> None:
    device = make_device(hello_extra={"audio_params": {"format": "opus", **params}})
    with pytest.raises(Exception):  # noqa: B017 - the hello reply never comes
        await device.connect()
    code, reason = await device.wait_closed(10)
    assert code == 1007 and fragment in reason
