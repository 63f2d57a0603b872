"""Admission control: the gateway refuses what it cannot take, clearly and early."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.limits import WindowBudget


def gateway(**overrides: object) -> TestClient:
    # Nothing listens on these ports: admission is decided before any of them is used.
    settings = GatewaySettings(
        redis_url="redis://127.0.0.1:1/0",
        vad_target="127.0.0.1:1",
        asr_target="127.0.0.1:1",
        speaker_target="127.0.0.1:1",
        funasr_port=0,  # no FunASR listener on a fixed port from an in-process test
        **overrides,  # type: ignore[arg-type]
    )
    return TestClient(create_app(settings))


def test_gateway_at_its_session_limit_refuses_the_upgrade_with_503() -> None:
    hello = {"type": "hello", "transport": "websocket", "audio_params": {"format": "opus"}}
    with (
        gateway(max_sessions=1, allow_anonymous=True) as client,
        client.websocket_connect("/xiaozhi/v1/", headers={"Device-Id": "first"}) as first,
    ):
        first.send_json(hello)
        assert first.receive_json()["type"] == "hello"
        with (
            pytest.raises(WebSocketDenialResponse) as refused,
            client.websocket_connect("/xiaozhi/v1/", headers={"Device-Id": "second"}),
        ):
            pass
    assert refused.value.status_code == 503
    assert refused.value.headers["retry-after"] == "5"
    assert "session limit" in refused.value.json()["error"]


def test_draining_gateway_refuses_new_devices_and_reports_not_ready() -> None:
    with gateway() as client:
        client.app.state.ctx.draining = True  # type: ignore[attr-defined]
        with (
            pytest.raises(WebSocketDenialResponse) as refused,
            client.websocket_connect("/xiaozhi/v1/", headers={"Device-Id": "aa:bb"}),
        ):
            pass
        assert refused.value.status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "draining"
        assert (
            'speechfront_gateway_connections_total{outcome="refused_draining"}'
            in client.get("/metrics").text
        )


def test_frame_rate_limit_allows_a_device_pace_and_refuses_a_flood() -> None:
    limiter = WindowBudget(per_s=50, window_s=2.0)
    assert all(limiter.spend() for _ in range(34))  # 2 s of 60 ms frames
    flood = WindowBudget(per_s=50, window_s=2.0)
    assert not all(flood.spend() for _ in range(101))
