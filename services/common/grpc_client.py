"""Client channels to the gRPC services.

A target may list several replicas (``ipv4:127.0.0.1:5001,127.0.0.1:5002``)
or name a headless Service (``dns:///asr.speech.svc.cluster.local:50052``);
either way the channel balances calls round-robin over every address. The
gateway's compute pool (``services/gateway/replicas.py``) opens one such
channel per replica instead, so it can see and route around each one.

Keepalive: a peer that stops answering without closing its connection (a
stopped process, a partition) is found within ``KEEPALIVE_TIME_MS +
KEEPALIVE_TIMEOUT_MS``, on idle connections too. The servers' side of this
agreement is in ``grpc_service.server_options``: they must accept a ping this
often, or they answer GOAWAY ``too_many_pings``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

from services.common.grpc_service import MAX_MESSAGE_BYTES

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

log = logging.getLogger(__name__)

KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 4_000


def keepalive_options() -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Ping idle connections too: a replica that hung between calls is
        # found before the next call waits on it.
        ("grpc.keepalive_permit_without_calls", 1),
        # By default a client stops pinging after two pings with no data sent.
        ("grpc.http2.max_pings_without_data", 0),
        # Any ping (flow-control pings sent along with a request, too) that
        # goes unanswered this long closes the connection. A call's own ping
        # blocks the keepalive ping, so without this a call on a stopped peer
        # waits out the default 60 s ping timeout instead of the keepalive's.
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ]


def normalise_target(target: str) -> str:
    """Accept a bare comma-separated ``host:port`` list as well as gRPC target URIs."""
    if "://" in target or target.startswith(("ipv4:", "ipv6:", "unix:")):
        return target
    if "," in target:
        return "ipv4:" + target
    return target


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        normalise_target(target),
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *keepalive_options(),
            ("grpc.enable_retries", 1),
            # A restarted or newly started replica is picked up within seconds
            # (the default backoff grows to two minutes).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ],
    )


async def close_channel(channel: grpc.aio.Channel, grace: float | None = None) -> None:
    """Close a channel, giving up after ``grace`` plus a few seconds.

    grpc's aio close waits for the calls it cancels to finish; one stuck in
    the core would otherwise hold a stop (or a gateway's shutdown) forever.
    """
    limit = (grace or 0.0) + 5.0
    try:
        async with asyncio.timeout(limit):
            await channel.close(grace)
    except TimeoutError:
        log.warning("a gRPC channel did not close within %.0f s; left to the collector", limit)
    except Exception as exc:  # a channel already broken is as good as closed
        log.debug("closing a gRPC channel failed: %s", exc)
