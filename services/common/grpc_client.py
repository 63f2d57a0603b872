"""Client channels to the compute services, balanced across replicas.

A target may list several replicas (``ipv4:127.0.0.1:5001,127.0.0.1:5002``)
or name a headless Service (``dns:///asr.speech.svc.cluster.local:50052``);
either way the channel balances calls round-robin over every address.
"""

from __future__ import annotations

import json

import grpc

from services.common.grpc_service import MAX_MESSAGE_BYTES

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


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
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 1),
            # A restarted or newly started replica is picked up within seconds
            # (the default backoff grows to two minutes).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ],
    )
