"""Ports and readiness probes for processes started on this machine.

The local cluster (``services/cluster.py``) and the tests use these to hand
out loopback ports and to wait until a process answers as what it is.
"""

from __future__ import annotations

import socket
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Ports this process has handed out: the OS may offer a port again as soon as
# the probing socket closes, before the process it was meant for has bound it,
# and two services on one port would answer each other's health checks.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no unused port found")


def port_free(host: str, port: int) -> bool:
    """Whether a new server could listen on ``host:port`` now.

    With SO_REUSEADDR the bind succeeds over connections left in TIME_WAIT but
    fails while any socket still listens there (even one with SO_REUSEPORT, as
    gRPC servers set), so a restart never shares a port with its predecessor.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _resp_command(*words: str) -> bytes:
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def probe_redis(port: int, password: str | None = None, timeout: float = 1.0) -> bool:
    """Whether Redis answers PING (after AUTH, when it wants a password)."""
    request = (_resp_command("AUTH", password) if password else b"") + b"PING\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            reply = b""
            while b"+PONG" not in reply and b"-" not in reply:
                data = sock.recv(64)
                if not data:
                    break
                reply += data
            return b"+PONG" in reply and b"-" not in reply
    except OSError:
        return False


def probe_grpc(port: int, timeout: float = 1.0) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def probe_http(url: str, timeout: float = 1.0) -> bool:
    """200 from ``url``; for a ``/readyz`` also a gateway's answer (a metrics
    server on the same port would say 200 to any path)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            if reply.status != 200:
                return False
            return not url.endswith("/readyz") or b'"ready":true' in reply.read(4096)
    except OSError:
        return False


def probe_tcp(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False
