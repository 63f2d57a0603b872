"""Waiting on a condition in a test: polled, bounded, and named when it fails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(check: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    """Until ``check()`` is true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what or "condition not met in time")
        await asyncio.sleep(0.05)
