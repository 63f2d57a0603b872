"""A small TCP front for the local cluster's gateways (in Kubernetes a Service does this).

Each new connection goes to the next gateway in turn; a gateway that refuses
the connection (dead, or not started yet) is skipped. Bytes are relayed both
ways untouched, so WebSocket upgrades and HTTP work through it.

Like a Service's endpoints, which follow readiness probes, a gateway that
fails ``/readyz`` twice in a row (a frozen process still accepts TCP
connections, so connecting alone proves nothing) gets no new connections
until it passes again. When none is ready, all are tried.

    python -m services.front --listen 8000 --backends 127.0.0.1:8001,127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging

log = logging.getLogger("speechfront.front")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def probe_ready(host: str, port: int, timeout: float = 1.0) -> bool:
    """GET /readyz answered 200 within ``timeout``."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET /readyz HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        status = await asyncio.wait_for(reader.readline(), timeout)
        return status.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


class Front:
    def __init__(
        self, backends: list[tuple[str, int]], probe_interval_s: float = 1.0, failures: int = 2
    ) -> None:
        self._backends = backends
        self._turn = itertools.cycle(range(len(backends)))
        self._probe_interval_s = probe_interval_s
        self._failures = failures
        self._misses = [0] * len(backends)

    def ready(self, index: int) -> bool:
        return self._misses[index] < self._failures

    async def watch(self) -> None:
        """Probe every gateway's readiness forever."""
        while True:
            results = await asyncio.gather(*(probe_ready(h, p) for h, p in self._backends))
            for index, ok in enumerate(results):
                was_ready = self.ready(index)
                self._misses[index] = 0 if ok else self._misses[index] + 1
                if was_ready != self.ready(index):
                    state = "ready again" if ok else "not ready: no new connections"
                    log.warning("gateway %s:%d %s", *self._backends[index], state)
            await asyncio.sleep(self._probe_interval_s)

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Each connection tries every gateway once, from its own turn on: the
        # shared turn moves on while it waits, and would send it to a dead
        # gateway twice when several devices reconnect at once.
        first = next(self._turn)
        count = len(self._backends)
        order = [(first + i) % count for i in range(count)]
        ready = [i for i in order if self.ready(i)] or order
        for index in ready:
            host, port = self._backends[index]
            try:
                backend_r, backend_w = await asyncio.wait_for(
                    asyncio.open_connection(host, port), 2.0
                )
            except (OSError, TimeoutError):
                continue
            await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))
            return
        log.warning("no gateway accepted the connection")
        client_w.close()


async def serve(port: int, backends: list[tuple[str, int]], host: str = "127.0.0.1") -> None:
    front = Front(backends)
    watcher = asyncio.create_task(front.watch())
    server = await asyncio.start_server(front.handle, host, port)
    try:
        async with server:
            await server.serve_forever()
    finally:
        watcher.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--backends", required=True, help="host:port,host:port")
    args = parser.parse_args()
    backends = [(b.rsplit(":", 1)[0], int(b.rsplit(":", 1)[1])) for b in args.backends.split(",")]
    logging.basicConfig(level="INFO")
    asyncio.run(serve(args.listen, backends, args.host))


if __name__ == "__main__":
    main()
