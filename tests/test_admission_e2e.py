"""Admission holds against a client that hoards connections, and a bystander still speaks.

A second gateway process with small caps joins the shared local cluster (its
Redis, VAD, ASR and speaker). Each test hoards or idles connections against it
the way a hostile or broken client would, then checks both sides: the hoarder
is refused (HTTP 503 with a reason) or closed, and a bystander device on the
same gateway gets its sentence back within its usual latency.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import websockets
from support.processes import stop_process
from support.wer import word_error_rate
from websockets.exceptions import InvalidStatus

from services.cluster import LocalCluster
from services.probes import free_port, probe_http
from services.simulator.device import DeviceConfig, SimulatedDevice, SttResult
from services.simulator.speech import synthesize

pytestmark = pytest.mark.e2e

MAX_SESSIONS = 6
PER_TOKEN = 3
IDLE_TIMEOUT_S = 2.0
TOKENS = ("hoarder-token", "bystander-token", "late-token")
SENTENCE = "what is the weather like tomorrow"


@pytest.fixture(scope="module")
def capped_gateway(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway with small caps on the shared cluster's services; its device URL."""
    port = free_port()
    env = cluster.env()
    env.update(
        {
            "SF_GATEWAY_HOST": "127.0.0.1",
            "SF_GATEWAY_PORT": str(port),
            "SF_GATEWAY_GATEWAY_ID": "capped",
            "SF_GATEWAY_AUTH_TOKENS": ",".join(TOKENS),
            "SF_GATEWAY_MAX_SESSIONS": str(MAX_SESSIONS),
            "SF_GATEWAY_MAX_SESSIONS_PER_TOKEN": str(PER_TOKEN),
            "SF_GATEWAY_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
        }
    )
    log_path: Path = tmp_path_factory.mktemp("capped") / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "gateway"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )
    try:
        deadline = time.monotonic() + 60
        while not probe_http(f"http://127.0.0.1:{port}/readyz"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"capped gateway did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"ws://127.0.0.1:{port}/xiaozhi/v1/"
    finally:
        stop_process(process, 20)


@pytest.fixture
async def devices(capped_gateway: str) -> AsyncIterator[list[SimulatedDevice]]:
    """Devices made by a test, all closed after it."""
    made: list[SimulatedDevice] = []
    yield made
    for device in made:
        await device.close()


def device(url: str, token: str, made: list[SimulatedDevice]) -> SimulatedDevice:
    built = SimulatedDevice(DeviceConfig(url=url, token=token))
    made.append(built)
    return built


async def hoard(
    url: str, token: str, attempts: int
) -> tuple[list[websockets.ClientConnection], int, str]:
    """Open upgrades without ever sending ``hello`` until one is refused.

    What is held, and the refusal's status and body (0 and "" if none was).
    """
    held: list[websockets.ClientConnection] = []
    for i in range(attempts):
        headers = {"Device-Id": f"hoard-{token}-{i}", "Authorization": f"Bearer {token}"}
        try:
            held.append(await websockets.connect(url, additional_headers=headers, open_timeout=10))
        except InvalidStatus as refused:
            return held, refused.response.status_code, refused.response.body.decode()
    return held, 0, ""


async def release(held: list[websockets.ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in held))


def assert_heard(results: list[SttResult]) -> None:
    [result] = results
    assert word_error_rate([SENTENCE], [result.text]) <= 0.2, result.text
    assert result.latency_s is not None and result.latency_s < 5.0, result.latency_s


async def test_upgrades_held_without_hello_stop_at_the_session_limit(
    capped_gateway: str, devices: list[SimulatedDevice]
) -> None:
    bystander = device(capped_gateway, TOKENS[1], devices)
    await bystander.connect()
    speaking = asyncio.ensure_future(bystander.speak_auto([synthesize(SENTENCE)]))
    first, _, _ = await hoard(capped_gateway, TOKENS[0], PER_TOKEN + 1)
    second, status, reason = await hoard(capped_gateway, TOKENS[2], PER_TOKEN + 1)
    try:
        # The bystander's connection counts too: the hoard stops one short of the limit.
        assert len(first) + len(second) == MAX_SESSIONS - 1
        assert status == 503 and "credential" not in reason, reason
        assert_heard(await speaking)
    finally:
        await release(first + second)


async def test_one_credential_filling_its_share_leaves_room_for_other_devices(
    capped_gateway: str, devices: list[SimulatedDevice]
) -> None:
    held, status, reason = await hoard(capped_gateway, TOKENS[0], PER_TOKEN + 5)
    try:
        assert len(held) == PER_TOKEN and status == 503 and "credential" in reason, reason
        bystander = device(capped_gateway, TOKENS[1], devices)
        await bystander.connect()
        assert_heard(await bystander.speak_auto([synthesize(SENTENCE)]))
    finally:
        await release(held)


async def test_an_idle_session_is_closed_and_a_listening_one_is_not(
    capped_gateway: str, devices: list[SimulatedDevice]
) -> None:
    idle = device(capped_gateway, TOKENS[0], devices)
    await idle.connect()
    bystander = device(capped_gateway, TOKENS[1], devices)
    await bystander.connect()
    # The bystander listens in silence for longer than the idle timeout before it speaks.
    speaking = asyncio.ensure_future(
        bystander.speak_auto([synthesize(SENTENCE)], lead_s=IDLE_TIMEOUT_S + 1.5)
    )
    code, reason = await idle.wait_closed(IDLE_TIMEOUT_S + 5)
    assert code == 1001 and "idle" in reason
    assert_heard(await speaking)
    assert not bystander.closed.is_set()
