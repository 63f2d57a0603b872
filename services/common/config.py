"""Configuration loading shared by every service.

Each service has one pydantic-settings model read from the environment
(prefix ``SF_<SERVICE>_``). Loading validates it at start-up and turns a
validation error into a message naming the environment variables at fault,
instead of a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

# Where `make models` unpacks the lite-profile weights; overridable per service.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


class ConfigError(SystemExit):
    """Raised (as a clean exit with status 2) when the environment is invalid."""


def load_settings(cls: type[SettingsT]) -> SettingsT:
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = [f"invalid configuration for {cls.__name__}:"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            env = f"{prefix}{field}".upper()
            lines.append(f"  {env}: {err['msg']} (got {err.get('input')!r})")
        print("\n".join(lines), file=sys.stderr)
        raise ConfigError(2) from None
