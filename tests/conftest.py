"""Shared fixtures: a real local cluster (Redis, vad, asr, speaker, gateway) on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from services.cluster import LocalCluster
from services.simulator.device import DeviceConfig, SimulatedDevice

# End-to-end tests run five services, Redis and their clients on two cores: one
# that loses a race with the machine gets a second run, and the summary line
# says how many did ("N rerun"). A test that fails twice fails the suite.
E2E_RERUNS = 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=E2E_RERUNS, reruns_delay=2))


DEVICE_TOKEN = "test-device-token"
ADMIN_TOKEN = "test-admin-token"
# Measured for the lite d-vector model on espeak voices (see services/speaker/dvector.py).
SPEAKER_THRESHOLD = "0.86"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The whole speech path as separate processes, as `make run` starts it."""
    run_dir: Path = tmp_path_factory.mktemp("cluster")
    with LocalCluster(
        run_dir,
        extra_env={
            # One shared token for every simulated device (testing opt-in).
            "SF_GATEWAY_AUTH_TOKENS": DEVICE_TOKEN,
            "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true",
            "SF_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "SF_GATEWAY_SPEAKER_THRESHOLD": SPEAKER_THRESHOLD,
        },
    ) as local:
        yield local


@pytest.fixture(scope="session")
def redis_client(cluster: LocalCluster) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    yield client
    client.close()


DeviceFactory = Callable[..., SimulatedDevice]


@pytest.fixture
async def make_device(cluster: LocalCluster) -> AsyncIterator[DeviceFactory]:
    """Build simulated devices against the cluster; all are closed after the test."""
    devices: list[SimulatedDevice] = []

    def build(**overrides: object) -> SimulatedDevice:
        settings: dict[str, object] = {"url": cluster.device_url, "token": DEVICE_TOKEN}
        settings.update(overrides)
        device = SimulatedDevice(DeviceConfig(**settings))  # type: ignore[arg-type]
        devices.append(device)
        return device

    yield build
    for device in devices:
        await device.close()
