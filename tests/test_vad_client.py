"""The VAD client's background task outlives whatever its callbacks do."""

from __future__ import annotations

import asyncio

from services.gateway.vad_client import VadStreamClient
from services.probes import free_port


async def test_the_connection_task_survives_a_failing_lost_handler() -> None:
    calls = 0

    def on_lost(client: VadStreamClient) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a session could not be moved")

    # Nothing listens there: every attempt fails and reports the streams lost.
    address = f"127.0.0.1:{free_port()}"
    client = VadStreamClient(address, lambda e: None, on_lost, connect_timeout_s=0.3)
    client.start()
    try:
        for _ in range(200):
            if calls >= 2:
                break
            await asyncio.sleep(0.05)
        assert calls >= 2
        assert client._task is not None and not client._task.done()
    finally:
        await client.stop()
