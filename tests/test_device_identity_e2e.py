"""A device is who its token says: per-device tokens, one session per device, own results only.

One cluster with a token secret and shared tokens off (the default). Tokens
are computed here as xiaozhi-esp32-server computes them, not with the
gateway's own code. In every test a bystander device speaks throughout and
must still get its text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest
import redis
from support.waiting import eventually
from support.wer import word_error_rate

from services.cluster import LocalCluster
from services.simulator.device import DeviceConfig, SimulatedDevice
from services.simulator.speech import synthesize, trim_silence

pytestmark = pytest.mark.e2e

SECRET = "identity-e2e-secret"
SHARED_TOKEN = "identity-shared-token"
MAX_AGE_S = 3600
BYSTANDER_SENTENCE = "turn the heating up a little"
SENTENCE = "please open the garage door"
REPLACED = (1000, "replaced by a new connection for this device")


def xiaozhi_token(client_id: str, device_id: str, issued: float | None = None) -> str:
    stamp = int(time.time() if issued is None else issued)
    digest = hmac.new(
        SECRET.encode(), f"{client_id}|{device_id}|{stamp}".encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=") + f".{stamp}"


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(
        tmp_path_factory.mktemp("identity"),
        extra_env={
            "SF_GATEWAY_AUTH_SECRET": SECRET,
            "SF_GATEWAY_AUTH_TOKEN_MAX_AGE_S": str(MAX_AGE_S),
            # Configured but not opted in: must not admit anyone.
            "SF_GATEWAY_AUTH_TOKENS": SHARED_TOKEN,
        },
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def store(identity: LocalCluster) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(identity.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def devices(identity: LocalCluster) -> AsyncIterator[list[SimulatedDevice]]:
    made: list[SimulatedDevice] = []
    yield made
    for device in made:
        await device.close()


def make(
    cluster: LocalCluster,
    made: list[SimulatedDevice],
    device_id: str,
    *,
    client_id: str | None = None,
    token: str | None = None,
    query: str = "",
) -> SimulatedDevice:
    """A device presenting ``device_id``; by default with its own valid token."""
    client_id = client_id or f"client-of-{device_id}"
    device = SimulatedDevice(
        DeviceConfig(
            url=cluster.device_url + query,
            device_id=device_id,
            client_id=client_id,
            token=xiaozhi_token(client_id, device_id) if token is None else token,
        )
    )
    made.append(device)
    return device


@contextlib.asynccontextmanager
async def bystander(cluster: LocalCluster, made: list[SimulatedDevice]) -> AsyncIterator[None]:
    """Another device mid-utterance while the test runs; it must still get its text."""
    device = make(cluster, made, f"bystander-{time.monotonic_ns()}")
    await device.connect()
    talk = asyncio.ensure_future(device.speak_auto([synthesize(BYSTANDER_SENTENCE)]))
    await asyncio.sleep(1.0)
    yield
    [result] = await talk
    assert word_error_rate([BYSTANDER_SENTENCE], [result.text]) <= 0.2, result.text
    assert result.message["session_id"] == device.session_id


async def refused(device: SimulatedDevice) -> str:
    await device.connect(send_hello=False)
    code, reason = await device.wait_closed(10)
    assert code == 1008, (code, reason)
    return reason


async def say_manually(device: SimulatedDevice, text: str) -> None:
    """Speak and end the utterance with listen stop: its result is then in flight."""
    await device.listen("start", "manual")
    await device.stream(trim_silence(synthesize(text)))
    await device.listen("stop")


def stt_messages(device: SimulatedDevice) -> list[dict[str, object]]:
    found = []
    while not device.messages.empty():
        message = device.messages.get_nowait()
        if message.get("type") == "stt":
            found.append(message)
    return found


async def test_a_token_computed_as_xiaozhi_does_works_unchanged(
    identity: LocalCluster, devices: list[SimulatedDevice], store: redis.Redis
) -> None:
    async with bystander(identity, devices):
        device = make(identity, devices, "aa:bb:cc:00:00:01")
        await device.connect()
        [result] = await device.speak_auto([synthesize(SENTENCE)])
        assert word_error_rate([SENTENCE], [result.text]) <= 0.2, result.text
        assert store.hget("sf:device:aa:bb:cc:00:00:01", "session_id") == device.session_id


async def test_a_token_for_one_device_is_refused_for_another(
    identity: LocalCluster, devices: list[SimulatedDevice]
) -> None:
    async with bystander(identity, devices):
        token = xiaozhi_token("client-a", "aa:bb:cc:00:00:02")
        other = make(identity, devices, "aa:bb:cc:00:00:03", client_id="client-a", token=token)
        reason = await refused(other)
        assert reason == "unauthorized: token not valid for this Device-Id and Client-Id"
        other_client = make(
            identity, devices, "aa:bb:cc:00:00:02", client_id="client-b", token=token
        )
        assert "not valid" in await refused(other_client)


@pytest.mark.parametrize(
    ("issued_offset_s", "reason"),
    [(-MAX_AGE_S - 60, "token expired"), (3600, "token issued in the future")],
    ids=["expired", "future"],
)
async def test_expired_and_future_tokens_are_refused(
    identity: LocalCluster, devices: list[SimulatedDevice], issued_offset_s: int, reason: str
) -> None:
    async with bystander(identity, devices):
        token = xiaozhi_token("client-t", "aa:bb:cc:00:00:04", time.time() + issued_offset_s)
        device = make(identity, devices, "aa:bb:cc:00:00:04", client_id="client-t", token=token)
        assert await refused(device) == f"unauthorized: {reason}"


async def test_a_shared_token_is_refused_unless_opted_in(
    identity: LocalCluster, devices: list[SimulatedDevice], store: redis.Redis
) -> None:
    store.sadd("sf:auth:tokens", "token-in-redis")
    async with bystander(identity, devices):
        configured = make(identity, devices, "aa:bb:cc:00:00:05", token=SHARED_TOKEN)
        assert "shared tokens are off" in await refused(configured)
        in_redis = make(identity, devices, "aa:bb:cc:00:00:05", token="token-in-redis")
        assert (await refused(in_redis)).startswith("unauthorized")


async def test_a_claimed_device_id_other_than_the_tokens_is_refused(
    identity: LocalCluster, devices: list[SimulatedDevice]
) -> None:
    async with bystander(identity, devices):
        # The token and header name one device, the query another.
        device = make(identity, devices, "aa:bb:cc:00:00:06", query="?device-id=aa:bb:cc:00:00:07")
        assert "device-id header and query parameter disagree" in await refused(device)


async def test_a_second_connection_for_a_device_closes_the_first(
    identity: LocalCluster, devices: list[SimulatedDevice], store: redis.Redis
) -> None:
    device_id = "aa:bb:cc:00:00:08"
    async with bystander(identity, devices):
        first = make(identity, devices, device_id)
        await first.connect()
        await say_manually(first, SENTENCE)  # its result is being computed
        second = make(identity, devices, device_id)
        await second.connect()
        assert await first.wait_closed(10) == REPLACED
        # The first connection's result reaches the device once: on the first
        # connection if it was quicker, else handed to the second.
        await eventually(lambda: store.hexists(f"sf:session:{first.session_id}", "disconnected_at"))
        on_first = stt_messages(first)
        if on_first:
            assert word_error_rate([SENTENCE], [str(on_first[0]["text"])]) <= 0.2, on_first
        else:
            late = await second.expect("stt", timeout=20)
            assert late["redelivered"] is True
            assert late["original_session_id"] == first.session_id
            assert word_error_rate([SENTENCE], [str(late["text"])]) <= 0.2, late
        # The device's route names the new session only, once the old one has closed.
        route = f"sf:device:{device_id}"
        await eventually(lambda: store.hget(route, "session_id") == second.session_id)
        [result] = await second.speak_auto([synthesize("what time is it now")])
        assert word_error_rate(["what time is it now"], [result.text]) <= 0.2, result.text
        assert result.message["session_id"] == second.session_id
        assert store.hget(route, "session_id") == second.session_id


async def test_undelivered_results_of_a_device_never_reach_another(
    identity: LocalCluster, devices: list[SimulatedDevice], store: redis.Redis
) -> None:
    owner_id, other_id = "aa:bb:cc:00:00:09", "aa:bb:cc:00:00:0a"
    key = f"sf:undelivered:{owner_id}"
    async with bystander(identity, devices):
        owner = make(identity, devices, owner_id)
        await owner.connect()
        await say_manually(owner, SENTENCE)
        await owner.close()  # gone before its result: the result waits in Redis
        await eventually(lambda: store.llen(key) == 1)

        other = make(identity, devices, other_id)
        await other.connect()
        # Its own token cannot claim the owner's id, nor can a shared token.
        other_token = xiaozhi_token(f"client-of-{other_id}", other_id)
        impostor = make(
            identity, devices, owner_id, client_id=f"client-of-{other_id}", token=other_token
        )
        assert "not valid" in await refused(impostor)
        assert "unauthorized" in await refused(
            make(identity, devices, owner_id, token=SHARED_TOKEN)
        )
        await asyncio.sleep(1.0)
        assert stt_messages(other) == []
        assert store.llen(key) == 1

        back = make(identity, devices, owner_id)
        await back.connect()
        redelivered = await back.expect("stt", timeout=10)
        assert redelivered["redelivered"] is True
        assert word_error_rate([SENTENCE], [str(redelivered["text"])]) <= 0.2, redelivered
        assert store.llen(key) == 0
        assert stt_messages(other) == []
        # The transcript was written under the owner's id, never the other's.
        entries = cast(list[tuple[str, dict[str, str]]], store.xrange("sf:transcripts"))
        written = [(e["device_id"], e["text"]) for _, e in entries]
        assert any(
            device == owner_id and word_error_rate([SENTENCE], [text]) <= 0.2
            for device, text in written
        ), written
        assert all(device != other_id for device, _ in written), written
