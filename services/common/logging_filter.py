"""Keeps credentials out of the logs.

Devices that cannot set headers pass their token as a query parameter, and
uvicorn writes every request path with its query string to the access log;
Redis URLs carry a password. ``RedactSecrets`` rewrites each record before
any handler formats it: query parameters that carry credentials, ``Bearer``
values and the password of a URL become ``[redacted]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[redacted]"

SECRET_PARAMETERS = (
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "authorization",
    "password",
    "api_key",
)
_QUERY = re.compile(
    r"(?i)([?&;](?:" + "|".join(SECRET_PARAMETERS) + r")=)[^&;#\s\"'<>]*",
)
# "Bearer x", "Bearer%20x" and "Bearer+x" (a header value, or one written into a URL).
_BEARER = re.compile(r"(?i)\b(bearer(?:\s+|%20|\+))[^\s\"'&;,<>]+")
# scheme://user:password@host
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/@:]*:)[^\s/@]+@")


def redact(text: str) -> str:
    """``text`` with every credential it carries replaced by ``[redacted]``."""
    text = _QUERY.sub(rf"\g<1>{REDACTED}", text)
    text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
    return _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)


def _redact_argument(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else is formatted with str() or repr(): redact that text if it
    # has a credential in it, otherwise keep the object (``%d`` needs a number).
    text = str(value)
    cleaned = redact(text)
    return value if cleaned == text else cleaned


class RedactSecrets(logging.Filter):
    """A filter for handlers: redacts the message, its arguments and its traceback.

    The record keeps its shape (uvicorn's access formatter unpacks ``args``),
    only the text inside changes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, Mapping):
            record.args = {key: _redact_argument(value) for key, value in args.items()}
        elif isinstance(args, tuple):
            record.args = tuple(_redact_argument(value) for value in args)
        if record.exc_info and not record.exc_text:
            # Formatters use exc_text when it is set: format the traceback once, redacted.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install(handlers: Iterable[logging.Handler]) -> None:
    """Add the filter to each handler that does not have it yet."""
    for handler in handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
