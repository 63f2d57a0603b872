"""What one connection may cost the gateway: input rates, field sizes, connection counts.

Every limit is per connection (or per credential and per address for the
connection counts), so one client's flood is answered by closing that client,
never by slowing the others. Rates are budgets over a short window, which
lets a device flush what it buffered during a network hiccup without being
cut off, but not keep sending faster than it can speak.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from services.gateway.errors import INVALID_PAYLOAD, POLICY_VIOLATION, ConnectionRejected

HELLO_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)
# Longest free-text value kept from a device message (wake word, abort reason).
MAX_FIELD_CHARS = 128
# Largest JSON value kept verbatim from a hello (features, audio params).
MAX_STORED_JSON_BYTES = 512


class WindowBudget:
    """At most ``per_s`` units per second averaged over ``window_s``, plus ``burst``."""

    def __init__(self, per_s: float, window_s: float, burst: float = 0.0) -> None:
        self._budget = per_s * window_s + burst
        self._window_s = window_s
        self._window_start = time.monotonic()
        self._spent = 0.0

    def spend(self, amount: float = 1.0) -> bool:
        now = time.monotonic()
        if now - self._window_start >= self._window_s:
            self._window_start, self._spent = now, 0.0
        self._spent += amount
        return self._spent <= self._budget


@dataclass(frozen=True)
class InputLimits:
    frames_per_s: float
    audio_realtime_factor: float
    text_messages_per_s: float
    text_bytes_per_s: float
    window_s: float = 5.0
    # Audio a device may send on top of the rate, e.g. catching up after a stall.
    audio_burst_s: float = 2.0


class InputGuard:
    """Checks one connection's input as it arrives; raises to close that connection."""

    def __init__(self, limits: InputLimits) -> None:
        w = limits.window_s
        self._frames = WindowBudget(limits.frames_per_s, w)
        # Seconds of audio per second of wall time: a device speaks in real time.
        self._audio = WindowBudget(limits.audio_realtime_factor, w, limits.audio_burst_s)
        self._messages = WindowBudget(limits.text_messages_per_s, w)
        self._bytes = WindowBudget(limits.text_bytes_per_s, w)

    def frame(self) -> None:
        """One audio packet arrived (checked before it is decoded)."""
        if not self._frames.spend():
            raise ConnectionRejected(POLICY_VIOLATION, "audio frame rate over the limit")

    def audio(self, seconds: float) -> None:
        """A packet decoded to ``seconds`` of audio."""
        if not self._audio.spend(seconds):
            raise ConnectionRejected(POLICY_VIOLATION, "audio sent faster than real time")

    def text(self, size: int) -> None:
        if not self._messages.spend():
            raise ConnectionRejected(POLICY_VIOLATION, "too many text messages")
        if not self._bytes.spend(size):
            raise ConnectionRejected(POLICY_VIOLATION, "text messages over the byte rate limit")


def short_text(value: object, limit: int = MAX_FIELD_CHARS) -> str:
    """A free-text field as it may be stored: a string, at most ``limit`` characters."""
    return str(value)[:limit] if isinstance(value, str | int | float) else ""


def bounded_json(value: object) -> Any:
    """A JSON value small enough to store; larger ones are replaced by a marker."""
    try:
        encoded = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return {"dropped": "not JSON"}
    if len(encoded.encode()) > MAX_STORED_JSON_BYTES:
        return {"dropped": f"over {MAX_STORED_JSON_BYTES} bytes"}
    return value


def validate_audio_params(hello: dict[str, Any]) -> None:
    """The uplink format a hello declares, where it declares one, must be one we decode."""
    params = hello.get("audio_params")
    if params is None:
        return
    if not isinstance(params, dict):
        raise ConnectionRejected(INVALID_PAYLOAD, "audio_params must be an object")
    rate = params.get("sample_rate", 16000)
    if rate not in HELLO_SAMPLE_RATES or isinstance(rate, bool):
        raise ConnectionRejected(INVALID_PAYLOAD, f"unsupported sample_rate {rate!r}")
    channels = params.get("channels", 1)
    if channels != 1 or isinstance(channels, bool):
        raise ConnectionRejected(INVALID_PAYLOAD, f"unsupported channels {channels!r}: mono only")


class ConnectionCounts:
    """Live connections per credential and per client address, from the upgrade on.

    Credentials are held as short hashes, never as the token itself.
    """

    def __init__(self, per_token: int, per_address: int) -> None:
        """``per_address`` 0 leaves addresses uncapped."""
        self._per_token = per_token
        self._per_address = per_address
        self._tokens: Counter[str] = Counter()
        self._addresses: Counter[str] = Counter()
        self.total = 0

    @staticmethod
    def token_key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()[:16] if token else ""

    def refusal(self, token_key: str, address: str) -> str | None:
        """Why one more connection would be over a cap, or None."""
        if token_key and self._tokens[token_key] >= self._per_token:
            return "too many connections with this credential"
        if self._per_address and address and self._addresses[address] >= self._per_address:
            return "too many connections from this address"
        return None

    def add(self, token_key: str, address: str) -> None:
        self._tokens[token_key] += 1
        self._addresses[address] += 1
        self.total += 1

    def remove(self, token_key: str, address: str) -> None:
        for counts, key in ((self._tokens, token_key), (self._addresses, address)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]
        self.total -= 1
