"""Where a service's replicas are: a static list, or a DNS name to resolve.

A headless Service in Kubernetes resolves to one address per ready pod, so
re-resolving it follows replicas as they come and go.
"""

from __future__ import annotations

import socket


def parse_target(target: str) -> tuple[list[str], str | None]:
    """Static replica addresses, or the ``name:port`` to resolve for ``dns:`` targets."""
    target = target.strip()
    if target.startswith("dns:"):
        rest = target.removeprefix("dns:")
        if rest.startswith("//"):  # dns://[authority]/name:port
            rest = rest[2:].split("/", 1)[-1]
        return [], rest
    if target.startswith("unix:") or "://" in target:
        return [target], None
    body = target.removeprefix("ipv4:").removeprefix("ipv6:")
    return [a.strip() for a in body.split(",") if a.strip()], None


def resolve(name_port: str) -> list[str]:
    """Every address a DNS name has (a headless Service: one per ready pod)."""
    host, port = name_port.rsplit(":", 1)
    infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    found = set()
    for family, *_, sockaddr in infos:
        ip = str(sockaddr[0])
        found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(found)
