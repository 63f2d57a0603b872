"""Configuration is validated at start-up with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.common.config import ConfigError, load_settings
from services.gateway.config import GatewaySettings


def test_auth_tokens_are_read_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SF_GATEWAY_AUTH_TOKENS", "one, two,,three")
    assert load_settings(GatewaySettings).auth_tokens == ["one", "two", "three"]


def test_open_mode_is_off_unless_switched_on() -> None:
    assert GatewaySettings().allow_anonymous is False


def test_invalid_value_names_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SF_GATEWAY_PORT", "99999")
    with pytest.raises(ConfigError):
        load_settings(GatewaySettings)
    assert "SF_GATEWAY_PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("service", "variable", "value"),
    [("asr", "SF_ASR_MAX_BATCH", "0"), ("vad", "SF_VAD_ENGINE", "webrtc")],
)
def test_service_refuses_to_start_on_bad_config(service: str, variable: str, value: str) -> None:
    env = dict(os.environ, **{variable: value})
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", service],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert variable in done.stderr
