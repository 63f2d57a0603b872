"""The local cluster's Redis asks for a password, and runs without root.

Without the password nobody can add device tokens or publish to a device's
reply channel; with it the gateway and every test client work as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import time
import uuid
from pathlib import Path

import pytest
import redis
from conftest import DeviceFactory

from services.cluster import LocalCluster
from services.gateway.hub import REPLY_PREFIX
from services.probes import probe_redis

pytestmark = pytest.mark.e2e


def _unauthenticated(cluster: LocalCluster, *command: str) -> bytes:
    """Redis' reply to ``command`` from a client that knows no password."""
    words = [word.encode() for word in command]
    request = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
    with socket.create_connection(("127.0.0.1", cluster.ports.redis), timeout=5) as sock:
        sock.sendall(request)
        return sock.recv(256)


def test_redis_answers_only_with_the_password(cluster: LocalCluster) -> None:
    assert _unauthenticated(cluster, "PING").startswith(b"-NOAUTH")
    assert not probe_redis(cluster.ports.redis)
    assert probe_redis(cluster.ports.redis, cluster.redis_password)
    assert not probe_redis(cluster.ports.redis, "not-the-password")


async def test_tokens_cannot_be_added_without_the_password(
    cluster: LocalCluster, make_device: DeviceFactory, redis_client: redis.Redis
) -> None:
    forged = f"forged-{uuid.uuid4().hex}"
    assert _unauthenticated(cluster, "SADD", "sf:auth:tokens", forged).startswith(b"-NOAUTH")
    intruder = make_device(token=forged)
    await intruder.connect(send_hello=False)
    assert (await intruder.wait_closed(10))[0] == 1008
    # The gateway itself reads the set with the password.
    genuine = f"genuine-{uuid.uuid4().hex}"
    redis_client.sadd("sf:auth:tokens", genuine)
    bystander = make_device(token=genuine)
    await bystander.connect()
    assert bystander.session_id


async def test_reply_channel_cannot_be_published_to_without_the_password(
    cluster: LocalCluster, make_device: DeviceFactory, redis_client: redis.Redis
) -> None:
    device = make_device()
    await device.connect()
    channel = f"{REPLY_PREFIX}{device.session_id}"
    genuine = json.dumps({"type": "tts", "state": "sentence_start", "text": "genuine"})
    # The gateway subscribes to the session's channel shortly after the hello.
    deadline = time.monotonic() + 10
    while redis_client.publish(channel, genuine) == 0:
        assert time.monotonic() < deadline, "the gateway never subscribed"
        await asyncio.sleep(0.1)
    forged = json.dumps({"type": "tts", "state": "sentence_start", "text": "forged"})
    assert _unauthenticated(cluster, "PUBLISH", channel, forged).startswith(b"-NOAUTH")
    assert (await device.expect("tts", timeout=10))["text"] == "genuine"
    await asyncio.sleep(0.5)
    while not device.messages.empty():
        assert device.messages.get_nowait().get("text") != "forged"


def _process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError(f"no Uid line for {pid}")


def test_local_redis_does_not_run_as_root(cluster: LocalCluster) -> None:
    process = cluster.processes["redis"].process
    assert Path(f"/proc/{process.pid}/comm").read_text().strip() == "redis-server"
    uid = _process_uid(process.pid)
    if os.geteuid() == 0:
        assert uid == pwd.getpwnam("nobody").pw_uid
    else:
        assert uid == os.geteuid()


def test_redis_password_is_on_no_command_line(cluster: LocalCluster) -> None:
    for name, proc in cluster.processes.items():
        cmdline = Path(f"/proc/{proc.process.pid}/cmdline").read_bytes()
        assert cluster.redis_password.encode() not in cmdline, name
