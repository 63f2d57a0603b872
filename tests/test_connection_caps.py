"""Admission counts connections from the upgrade, per credential and per address."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect
from test_admission import gateway as admission_gateway

HELLO = {"type": "hello", "transport": "websocket", "audio_params": {"format": "opus"}}


def gateway(**overrides: object) -> TestClient:
    return admission_gateway(allow_anonymous=True, **overrides)


def headers(device: str, token: str = "t", address: str | None = None) -> dict[str, str]:
    found = {"Device-Id": device, "Authorization": f"Bearer {token}"}
    if address is not None:
        found["X-Forwarded-For"] = address
    return found


def test_connections_without_hello_count_against_the_session_limit() -> None:
    with (
        gateway(max_sessions=2) as client,
        client.websocket_connect("/xiaozhi/v1/", headers=headers("a")),
        client.websocket_connect("/xiaozhi/v1/", headers=headers("b")),
        pytest.raises(WebSocketDenialResponse) as refused,
        client.websocket_connect("/xiaozhi/v1/", headers=headers("c")),
    ):
        pass
    assert refused.value.status_code == 503


def test_one_credential_cannot_take_more_than_its_share() -> None:
    with (
        gateway(max_sessions_per_token=2) as client,
        client.websocket_connect("/xiaozhi/v1/", headers=headers("a", "shared")),
        client.websocket_connect("/xiaozhi/v1/", headers=headers("b", "shared")),
    ):
        with (
            pytest.raises(WebSocketDenialResponse) as refused,
            client.websocket_connect("/xiaozhi/v1/", headers=headers("c", "shared")),
        ):
            pass
        assert "credential" in refused.value.json()["error"]
        with client.websocket_connect("/xiaozhi/v1/", headers=headers("d", "other")) as other:
            other.send_json(HELLO)
            assert other.receive_json()["type"] == "hello"


def test_one_address_cannot_take_more_than_its_share_when_capped() -> None:
    settings = {"max_sessions_per_address": 1, "client_address_header": "X-Forwarded-For"}
    with (
        gateway(**settings) as client,
        client.websocket_connect("/xiaozhi/v1/", headers=headers("a", "1", "10.0.0.1")),
    ):
        with (
            pytest.raises(WebSocketDenialResponse) as refused,
            client.websocket_connect("/xiaozhi/v1/", headers=headers("b", "2", "10.0.0.1")),
        ):
            pass
        assert "address" in refused.value.json()["error"]
        with client.websocket_connect("/xiaozhi/v1/", headers=headers("c", "3", "10.0.0.2")):
            pass


def test_a_closed_connection_gives_its_place_back() -> None:
    with gateway(max_sessions=1) as client:
        with client.websocket_connect("/xiaozhi/v1/", headers=headers("a")) as first:
            first.send_json(HELLO)
            first.receive_json()
        with client.websocket_connect("/xiaozhi/v1/", headers=headers("b")) as second:
            second.send_json(HELLO)
            assert second.receive_json()["type"] == "hello"


def test_an_idle_session_is_closed() -> None:
    with (
        gateway(idle_timeout_s=0.5) as client,
        client.websocket_connect("/xiaozhi/v1/", headers=headers("idle")) as ws,
    ):
        ws.send_json(HELLO)
        ws.receive_json()
        started = time.monotonic()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1001 and "idle" in closed.value.reason
    assert time.monotonic() - started < 5
