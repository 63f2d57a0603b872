"""uvicorn's protocols, hardened for clients that stall, oversize or misframe.

The gateway's device port and the FunASR port both run these: a request head
must arrive in time and within bounds, a refused WebSocket handshake is
answered and closed, and a client's malformed text is closed with a reason
instead of a traceback.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.http11 import Request
from websockets.protocol import State

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

from services.common.logging_filter import RedactSecrets

log = logging.getLogger(__name__)

# A request's line and headers. Firmware sends a few hundred bytes, a proxy adds
# a few headers. Both stay under websockets' own limits (8 KiB per line, 128
# headers), so an upgrade handed on to it is never refused there.
MAX_HEAD_BYTES = 8 * 1024
MAX_HEADERS = 100

# ASGI scope extension of ``GuardedWebSocketProtocol``: a function the
# application calls with a ``BinarySink`` (or None to stop) to be handed the
# connection's binary messages as they are parsed.
BINARY_SINK = "speechfront.binary_sink"
# Takes one binary message; False leaves it to the ASGI receive queue.
BinarySink = Callable[[bytes], bool]

# The first byte of a whole binary message in one frame (FIN, no RSV bits,
# opcode 2), and the mask bit every client frame must carry.
_FIN_BINARY = 0x82
_MASKED = 0x80


def _plain_response(status: int, text: str) -> bytes:
    body = text.encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on each request's head.

    uvicorn bounds neither the time a client takes to send a request's line
    and headers nor their size: a client that sends half a request and stops
    (slowloris), or an endless header, keeps its socket and its buffer for
    ever. Here a head must arrive within ``head_timeout_s`` of the connection
    (of the request's first byte, on a kept-alive connection) and stay within
    MAX_HEAD_BYTES and MAX_HEADERS; otherwise the client gets 408 or 431 and
    the socket is closed. ``guarded_http_protocol`` sets the timeout.
    """

    head_timeout_s = 10.0

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # the bytes arriving belong to a request's head
        self._head_bytes = 0  # its line and headers, as parsed
        self._head_fed = 0  # bytes fed to the parser while it was in that head
        self._headers = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if self._head_timer is None:
                self._arm()
            # The parser keeps an unfinished header whole: bound what it holds.
            if self._head_fed > MAX_HEAD_BYTES:
                self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
                return
            self._head_fed += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._headers = True, 0, 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._count(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._count(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head, self._head_fed = False, 0
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        # What follows is the next request's head; its first byte starts its timer.
        self._in_head = True
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        if not self._refused:
            super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        if not self._refused and not self.transport.is_closing():
            super().send_400_response(msg)

    def _count(self, size: int) -> bool:
        """Add to the head's size; False once the request has been refused."""
        if self._refused:
            return False
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
        elif self._headers > MAX_HEADERS:
            self._refuse(431, f"over {MAX_HEADERS} request headers")
        return not self._refused

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, f"request head not received within {self.head_timeout_s:g} s")

    def _refuse(self, status: int, reason: str) -> None:
        self._refused = True
        self._disarm()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("refused a request from %s: %d %s", client, status, reason)
        if not self.transport.is_closing():
            self.transport.write(_plain_response(status, reason + "\n"))
            self.transport.close()


def guarded_http_protocol(head_timeout_s: float) -> type[GuardedHttpProtocol]:
    class Configured(GuardedHttpProtocol):
        pass

    Configured.head_timeout_s = head_timeout_s
    return Configured


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol, closing cleanly where it would not, and
    handing binary messages straight to a sink the application may register.

    - When websockets refuses the handshake request itself (a header line over
      its limit, too many headers, a request it cannot parse), uvicorn neither
      sends websockets' answer nor closes the socket.
    - A text message that is not UTF-8 is closed with 1007 as it should be,
      but uvicorn logs a traceback for each one; here it is closed with a reason
      and nothing is logged (the client's mistake, not the server's).
    - The device endpoint registers a sink through the ``BINARY_SINK`` scope
      extension. Each binary message the sink takes skips the ASGI receive
      queue: no event dict, no future, no wake-up of the application's task
      through its whole middleware chain and no pause and resume of the
      socket's reads, about a fifth of the gateway's CPU per 60 ms packet.
      Messages are only offered while the queue is empty, so the application
      sees every message in the order sent.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._sink: BinarySink | None = None
        self._frame_limit: int | None = None

    def data_received(self, data: bytes) -> None:
        if self._sink is not None:
            data = self._offer_whole_frames(self._sink, data)
            if not data:
                return
        super().data_received(data)
        if (
            not self.handshake_initiated
            and self.conn.handshake_exc is not None
            and not self.transport.is_closing()
        ):
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    def _offer_whole_frames(self, sink: BinarySink, data: bytes) -> bytes:
        """Hand the sink the whole binary frames at the front of ``data``; what
        is left (from the first frame it does not take) goes to websockets.

        A listening device's read is one small masked binary frame. Reading
        its two header bytes here and unmasking it in C costs a fraction of
        websockets' generator parser and uvicorn's event dispatch, which took
        about a tenth of the gateway's CPU per packet. This runs only while
        websockets holds nothing of its own (no partial frame, no fragmented
        message, no extension, connection open) and the ASGI queue is empty,
        so both still see what they would have seen, in order. Anything else
        (a control frame, a fragment, an unmasked or oversized frame, one
        split across reads, a frame the sink leaves) ends the fast path there.
        """
        conn = self.conn
        if (
            conn.state is not State.OPEN
            or conn.current_size is not None
            or conn.reader.buffer
            or conn.extensions
            or self.close_sent
            or not self.queue.empty()
        ):
            return data
        limit = self._frame_limit
        offset, end = 0, len(data)
        while end - offset >= 6:
            if data[offset] != _FIN_BINARY or not data[offset + 1] & _MASKED:
                break
            length = data[offset + 1] & 0x7F
            start = offset + 6
            if length == 126:
                start += 2
                if start > end:
                    break
                length = int.from_bytes(data[offset + 2 : offset + 4], "big")
            elif length == 127:
                break  # over 64 KiB: no audio packet is
            if (limit is not None and length > limit) or start + length > end:
                break
            payload = apply_mask(data[start : start + length], data[start - 4 : start])
            if not sink(payload):
                break
            offset = start + length
        return data[offset:] if offset else data

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:
            # The application's task has not started yet: it finds this in its scope.
            extensions = cast(dict[str, Any], self.scope["extensions"])
            extensions[BINARY_SINK] = self._set_sink

    def _set_sink(self, sink: BinarySink | None) -> None:
        self._sink = sink
        # The largest frame websockets would accept now, fixed for the connection.
        message, fragment = self.conn.max_message_size, self.conn.max_fragment_size
        self._frame_limit = min((n for n in (message, fragment) if n is not None), default=None)

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text":
            if not self.close_sent:
                try:
                    b"".join(self.frames).decode()
                except UnicodeDecodeError:
                    self.frames = []
                    self.conn.send_close(1007, "text message is not valid UTF-8")
                    self.handle_parser_exception()
                    return
        elif self._sink is not None and not self.close_sent and self.queue.empty():
            frames = self.frames
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            self.frames = [data]
            if self._sink(data):
                self.frames = []
                return
        super().send_receive_event_to_app()


def log_config() -> dict[str, Any]:
    """uvicorn's logging, with credentials redacted from every line it writes."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": RedactSecrets}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    return config
