"""Per-device tokens: xiaozhi-esp32-server's format, bound to one device, with an age."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from test_admission import gateway

from services.cli import main as cli
from services.gateway.auth import (
    DEFAULT_MAX_AGE_S,
    MAX_FUTURE_SKEW_S,
    TokenRefused,
    issue_token,
    split_token,
    verify_token,
)

SECRET = "s3cret"
CLIENT, DEVICE = "c1", "aa:bb:cc:dd:ee:ff"
ISSUED = 1_700_000_000
# printf 'c1|aa:bb:cc:dd:ee:ff|1700000000' | openssl dgst -sha256 -hmac s3cret -binary
#   | base64 | tr '+/' '-_' | tr -d '='
OPENSSL_SIGNATURE = "_2wgHc-hDDMRfF8rmBokTzNhr8UtN8zXCznpJhWOoqw"
HELLO = {"type": "hello", "transport": "websocket", "audio_params": {"format": "opus"}}


def reference_token(secret: str, client_id: str, device_id: str, timestamp: int) -> str:
    """The algorithm as xiaozhi-esp32-server documents it, written out independently."""
    content = f"{client_id}|{device_id}|{timestamp}".encode()
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=") + f".{timestamp}"


def refusal(
    token: str,
    client_id: str = CLIENT,
    device_id: str = DEVICE,
    *,
    now: float,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_future_skew_s: float = MAX_FUTURE_SKEW_S,
) -> str:
    with pytest.raises(TokenRefused) as refused:
        verify_token(
            SECRET,
            token,
            client_id,
            device_id,
            now=now,
            max_age_s=max_age_s,
            max_future_skew_s=max_future_skew_s,
        )
    return refused.value.reason


# -- the algorithm ---------------------------------------------------------


def test_issued_token_matches_the_reference_algorithm_and_openssl() -> None:
    token = issue_token(SECRET, CLIENT, DEVICE, now=ISSUED)
    assert token == reference_token(SECRET, CLIENT, DEVICE, ISSUED)
    assert token == f"{OPENSSL_SIGNATURE}.{ISSUED}"
    signature, stamp = token.split(".")
    # 32 bytes of HMAC: 44 base64 characters, one of them the stripped "=".
    assert len(signature) == 43 and "=" not in token
    assert "+" not in signature and "/" not in signature
    assert stamp == str(ISSUED)


def test_a_token_computed_elsewhere_is_accepted_unchanged() -> None:
    now = time.time()
    verify_token(SECRET, reference_token(SECRET, CLIENT, DEVICE, int(now)), CLIENT, DEVICE)
    verify_token(SECRET, issue_token(SECRET, CLIENT, DEVICE), CLIENT, DEVICE, now=now + 5)


def test_a_token_admits_only_its_own_device_and_client() -> None:
    token = issue_token(SECRET, CLIENT, DEVICE, now=ISSUED)
    at = ISSUED + 60
    assert "not valid" in refusal(token, CLIENT, "aa:bb:cc:dd:ee:00", now=at)
    assert "not valid" in refusal(token, "c2", DEVICE, now=at)
    with pytest.raises(TokenRefused):
        verify_token("other-secret", token, CLIENT, DEVICE, now=ISSUED + 60)
    # A re-stamped signature does not carry over to another timestamp.
    signature = token.split(".")[0]
    assert "not valid" in refusal(f"{signature}.{ISSUED + 1}", now=at)


def test_the_padded_signature_is_not_the_token() -> None:
    token = issue_token(SECRET, CLIENT, DEVICE, now=ISSUED)
    signature, stamp = token.split(".")
    assert "not valid" in refusal(f"{signature}=.{stamp}", now=ISSUED)


def test_expiry_follows_the_configured_age() -> None:
    token = issue_token(SECRET, CLIENT, DEVICE, now=ISSUED)
    day = 24 * 3600
    verify_token(SECRET, token, CLIENT, DEVICE, now=ISSUED + 30 * day)  # default: 30 days
    assert refusal(token, now=ISSUED + 30 * day + 1) == "token expired"
    verify_token(SECRET, token, CLIENT, DEVICE, max_age_s=60, now=ISSUED + 60)
    assert refusal(token, max_age_s=60, now=ISSUED + 61) == "token expired"


def test_a_token_from_the_future_is_refused_beyond_a_small_skew() -> None:
    token = issue_token(SECRET, CLIENT, DEVICE, now=ISSUED)
    verify_token(SECRET, token, CLIENT, DEVICE, now=ISSUED - 300)
    assert refusal(token, now=ISSUED - 301) == "token issued in the future"
    assert refusal(token, now=ISSUED - 3600, max_future_skew_s=10) == "token issued in the future"


@pytest.mark.parametrize(
    "token",
    ["", "no-dot", "a.b.1700000000", ".1700000000", "sig.", "sig.17e8", "sig.-1", "sig. 17"],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert split_token(token) is None
    assert refusal(token, now=ISSUED) == "malformed token"


def test_ids_that_would_make_the_signed_content_ambiguous_are_refused() -> None:
    # "a|b" + "c" and "a" + "b|c" sign the same content: neither is accepted.
    token = reference_token(SECRET, "a|b", "c", ISSUED)
    assert "|" in refusal(token, "a", "b|c", now=ISSUED)
    with pytest.raises(ValueError):
        issue_token(SECRET, "a|b", "c")


def test_no_secret_means_no_token() -> None:
    with pytest.raises(ValueError):
        issue_token("", CLIENT, DEVICE)
    with pytest.raises(TokenRefused):
        verify_token("", issue_token(SECRET, CLIENT, DEVICE), CLIENT, DEVICE)


# -- speechfront issue-token -------------------------------------------------


def test_issue_token_command_prints_a_token_for_the_device(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli(["issue-token", "--secret", SECRET, "--device-id", DEVICE, "--client-id", CLIENT])
    token = capsys.readouterr().out.strip()
    verify_token(SECRET, token, CLIENT, DEVICE)
    assert token == reference_token(SECRET, CLIENT, DEVICE, int(token.split(".")[1]))

    monkeypatch.setenv("SF_GATEWAY_AUTH_SECRET", "from-env")
    cli(["issue-token", "--device-id", DEVICE, "--client-id", CLIENT])
    verify_token("from-env", capsys.readouterr().out.strip(), CLIENT, DEVICE)

    monkeypatch.delenv("SF_GATEWAY_AUTH_SECRET")
    with pytest.raises(SystemExit):
        cli(["issue-token", "--device-id", DEVICE, "--client-id", CLIENT])


# -- the gateway, in process ---------------------------------------------------


def device_gateway(**overrides: object) -> TestClient:
    return gateway(auth_secret=SECRET, auth_tokens=["shared-token"], **overrides)


def handshake(
    token: str, device_id: str = DEVICE, client_id: str = CLIENT, **extra: str
) -> dict[str, str]:
    return {
        "Device-Id": device_id,
        "Client-Id": client_id,
        "Authorization": f"Bearer {token}",
        **extra,
    }


def refused_with(client: TestClient, headers: dict[str, str], url: str = "/xiaozhi/v1/") -> str:
    with (
        client.websocket_connect(url, headers=headers) as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_json()
    assert closed.value.code == 1008
    return str(closed.value.reason)


def test_gateway_accepts_a_device_token_and_refuses_it_for_another_device() -> None:
    token = reference_token(SECRET, CLIENT, DEVICE, int(time.time()))
    with device_gateway() as client:
        with client.websocket_connect("/xiaozhi/v1/", headers=handshake(token)) as ws:
            ws.send_json(HELLO)
            assert ws.receive_json()["type"] == "hello"
        reason = refused_with(client, handshake(token, device_id="aa:bb:cc:dd:ee:00"))
        assert reason == "unauthorized: token not valid for this Device-Id and Client-Id"
        assert "not valid" in refused_with(client, handshake(token, client_id="c2"))


def test_gateway_refuses_expired_and_future_tokens() -> None:
    now = int(time.time())
    with device_gateway(auth_token_max_age_s=3600) as client:
        old = reference_token(SECRET, CLIENT, DEVICE, now - 3601)
        assert refused_with(client, handshake(old)) == "unauthorized: token expired"
        future = reference_token(SECRET, CLIENT, DEVICE, now + 3600)
        assert refused_with(client, handshake(future)) == "unauthorized: token issued in the future"


def test_shared_tokens_are_refused_unless_opted_in() -> None:
    with device_gateway() as client:
        assert "shared tokens are off" in refused_with(client, handshake("shared-token"))
    with (
        device_gateway(allow_shared_tokens=True) as client,
        client.websocket_connect("/xiaozhi/v1/", headers=handshake("shared-token")) as ws,
    ):
        ws.send_json(HELLO)
        assert ws.receive_json()["type"] == "hello"


def test_a_device_id_in_the_query_that_disagrees_with_the_header_is_refused() -> None:
    token = issue_token(SECRET, CLIENT, DEVICE)
    with device_gateway() as client:
        reason = refused_with(client, handshake(token), "/xiaozhi/v1/?device-id=aa:bb:cc:dd:ee:00")
        assert "device-id header and query parameter disagree" in reason
        # The same claim in both places is one claim.
        with client.websocket_connect(
            f"/xiaozhi/v1/?device-id={DEVICE}", headers=handshake(token)
        ) as ws:
            ws.send_json(HELLO)
            assert ws.receive_json()["type"] == "hello"


def test_a_second_connection_for_a_device_closes_the_first_with_1000() -> None:
    token = issue_token(SECRET, CLIENT, DEVICE)
    other = issue_token(SECRET, CLIENT, "aa:bb:cc:dd:ee:01")
    with device_gateway() as client:
        hub = client.app.state.ctx.hub  # type: ignore[attr-defined]
        with (
            client.websocket_connect("/xiaozhi/v1/", headers=handshake(token)) as first,
            client.websocket_connect(
                "/xiaozhi/v1/", headers=handshake(other, "aa:bb:cc:dd:ee:01")
            ) as bystander,
        ):
            first.send_json(HELLO)
            first_id = first.receive_json()["session_id"]
            bystander.send_json(HELLO)
            bystander_id = bystander.receive_json()["session_id"]
            with client.websocket_connect("/xiaozhi/v1/", headers=handshake(token)) as second:
                second.send_json(HELLO)
                second_id = second.receive_json()["session_id"]
                with pytest.raises(WebSocketDisconnect) as closed:
                    first.receive_json()
                assert closed.value.code == 1000
                assert closed.value.reason == "replaced by a new connection for this device"
                assert hub.devices[DEVICE].session_id == second_id != first_id
                assert hub.devices["aa:bb:cc:dd:ee:01"].session_id == bystander_id
                assert set(hub.sessions) >= {second_id, bystander_id}
