"""A small TCP front for the local cluster's gateways (in Kubernetes a Service does this).

Each new connection goes to the next gateway in turn; a gateway that refuses
the connection (dead, or not started yet) is skipped. Bytes are relayed both
ways untouched, so WebSocket upgrades and HTTP work through it.

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


class Front:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self._backends = backends
        self._turn = itertools.cycle(range(len(backends)))

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Each connection tries every gateway once, from its own turn on: the
        # shared turn moves on while it waits, and would send it to a dead
        # gateway twice when several devices reconnect at once.
        first = next(self._turn)
        for i in range(len(self._backends)):
            host, port = self._backends[(first + i) % len(self._backends)]
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
    server = await asyncio.start_server(front.handle, host, port)
    async with server:
        await server.serve_forever()


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
