"""Bad input closes only the offending connection; other devices never notice."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable

import pytest
import redis
from conftest import DeviceFactory
from support.wer import word_error_rate

from services.gateway.framing import encode_frame
from services.simulator.device import SimulatedDevice
from services.simulator.speech import synthesize

pytestmark = pytest.mark.e2e

HEALTHY_SENTENCE = "turn the heating up a little"


async def _lying_v3_header(device: SimulatedDevice) -> None:
    await device.send_raw(struct.pack(">BBH", 0, 0, 500) + b"\x00" * 20)


async def _non_opus_bytes(device: SimulatedDevice) -> None:
    await device.send_raw(encode_frame(3, b"hello world, not opus at all"))


async def _json_array(device: SimulatedDevice) -> None:
    await device.send_raw("[1, 2, 3]")


async def _audio_before_hello(device: SimulatedDevice) -> None:
    await device.send_raw(struct.pack(">BBH", 0, 0, 3) + b"abc")


Misbehaviour = Callable[[SimulatedDevice], Awaitable[None]]

CASES: list[tuple[str, Misbehaviour, bool, int, str]] = [
    # name, action, whether it says hello first, close code, reason fragment
    ("lying_header", _lying_v3_header, True, 1007, "header says 500 payload bytes"),
    ("non_opus", _non_opus_bytes, True, 1007, "Opus"),
    ("json_not_object", _json_array, True, 1007, "must be a JSON object"),
    ("missing_hello", _audio_before_hello, False, 1008, "expected a hello"),
]


@pytest.mark.parametrize(
    ("action", "hello", "code", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_bad_input_closes_only_that_connection(
    make_device: DeviceFactory, action: Misbehaviour, hello: bool, code: int, reason: str
) -> None:
    healthy = make_device()
    await healthy.connect()
    healthy_result = asyncio.ensure_future(healthy.speak_auto([synthesize(HEALTHY_SENTENCE)]))
    await asyncio.sleep(1.0)  # the healthy device is mid-utterance

    bad = make_device(protocol_version=3)
    await bad.connect(send_hello=hello)
    await action(bad)
    close_code, close_reason = await bad.wait_closed(10)
    assert close_code == code
    assert reason in close_reason

    [result] = await healthy_result
    assert word_error_rate([HEALTHY_SENTENCE], [result.text]) <= 0.2, result.text


async def test_wrong_token_is_refused_with_a_reason(make_device: DeviceFactory) -> None:
    device = make_device(token="not-a-valid-token")
    await device.connect(send_hello=False)
    code, reason = await device.wait_closed(10)
    assert code == 1008
    assert "unauthorized" in reason


async def test_missing_token_is_refused(make_device: DeviceFactory) -> None:
    device = make_device(token=None)
    await device.connect(send_hello=False)
    assert (await device.wait_closed(10))[0] == 1008


async def test_token_added_to_redis_is_accepted(
    make_device: DeviceFactory, redis_client: redis.Redis
) -> None:
    redis_client.sadd("sf:auth:tokens", "token-from-redis")
    device = make_device(token="token-from-redis")
    await device.connect()
    assert device.session_id


async def test_wrong_listen_mode_closes_with_reason(make_device: DeviceFactory) -> None:
    device = make_device()
    await device.connect()
    await device.listen("start", "sideways")
    code, reason = await device.wait_closed(10)
    assert code == 1007
    assert "listen mode" in reason
