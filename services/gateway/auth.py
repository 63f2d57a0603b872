"""Per-device tokens, in the format xiaozhi-esp32-server issues them.

A token is bound to one device's ``Client-Id`` and ``Device-Id``::

    signature = urlsafe_base64(HMAC-SHA256(secret, f"{client_id}|{device_id}|{timestamp}"))
    token     = signature.rstrip("=") + "." + str(timestamp)

``secret`` is UTF-8, ``timestamp`` the Unix time of issue in whole seconds.
The token carries no identity of its own: it is checked against the ids the
device presents when it connects, so a token only ever opens a session for
the device it was issued to. With the same secret (xiaozhi-esp32-server's
``server.auth_key``), tokens issued by an existing xiaozhi deployment (its OTA
endpoint hands them to devices) are accepted here unchanged, and tokens issued
here by ``speechfront issue-token`` are accepted there.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

DEFAULT_MAX_AGE_S = 30 * 24 * 3600
# A token stamped later than now by more than this (clocks disagree) is refused.
MAX_FUTURE_SKEW_S = 300
# Far longer than any real token (43 signature characters, a dot, 10 digits).
MAX_TOKEN_LENGTH = 256
# The signed content joins the ids with "|": ids containing it would be ambiguous.
SEPARATOR = "|"


class TokenRefused(Exception):
    """The token does not admit this device; ``reason`` says why (safe to show it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _signature(secret: str, client_id: str, device_id: str, timestamp: int) -> str:
    content = f"{client_id}{SEPARATOR}{device_id}{SEPARATOR}{timestamp}"
    digest = hmac.new(secret.encode(), content.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _check_ids(client_id: str, device_id: str) -> None:
    if not device_id:
        raise TokenRefused("a Device-Id is required")
    if SEPARATOR in client_id or SEPARATOR in device_id:
        raise TokenRefused(f"Device-Id and Client-Id may not contain {SEPARATOR!r}")


def issue_token(secret: str, client_id: str, device_id: str, now: float | None = None) -> str:
    """A token for this device, stamped ``now`` (default: the current time)."""
    if not secret:
        raise ValueError("the token secret is empty")
    try:
        _check_ids(client_id, device_id)
    except TokenRefused as exc:
        raise ValueError(exc.reason) from None
    timestamp = int(time.time() if now is None else now)
    return f"{_signature(secret, client_id, device_id, timestamp)}.{timestamp}"


def split_token(token: str) -> tuple[str, int] | None:
    """(signature, timestamp) when ``token`` has the per-device shape, else None."""
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        return None
    signature, stamp = token.split(".")
    if not signature or not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        return None
    return signature, int(stamp)


def verify_token(
    secret: str,
    token: str,
    client_id: str,
    device_id: str,
    *,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    now: float | None = None,
    max_future_skew_s: float = MAX_FUTURE_SKEW_S,
) -> None:
    """Return when ``token`` admits (client_id, device_id); raise ``TokenRefused`` otherwise.

    The signature is checked first (in constant time), so only a genuine token
    is ever reported as expired or as stamped in the future.
    """
    if not secret:
        raise TokenRefused("no token secret configured")
    _check_ids(client_id, device_id)
    parts = split_token(token)
    if parts is None:
        raise TokenRefused("malformed token")
    signature, timestamp = parts
    expected = _signature(secret, client_id, device_id, timestamp)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise TokenRefused("token not valid for this Device-Id and Client-Id")
    age = int(time.time() if now is None else now) - timestamp
    if age > max_age_s:
        raise TokenRefused("token expired")
    if age < -max_future_skew_s:
        raise TokenRefused("token issued in the future")
