"""Running a grpc.aio service: health checking, metrics port, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import logging_filter
from services.common.metrics import serve_metrics
from services.common.settings import ServiceSettings
from services.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The shortest interval between a client's pings that servers accept; the
# clients' keepalive time must not be shorter.
MIN_CLIENT_PING_INTERVAL_MS = 4_000


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        # The server's own pings find clients that went away silently.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Accept the clients' keepalive pings (services/common/grpc_client.py:
        # every 5 s, idle connections included). By default a server allows
        # one ping per 5 minutes on a connection with calls and one per 2 hours
        # on an idle one, and answers the third early ping with GOAWAY
        # too_many_pings; 0 strikes never sends a client away for pinging.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Records of every logger that propagates pass the root's handlers.
    logging_filter.install(logging.getLogger().handlers)


async def run_grpc_service(
    name: str,
    settings: ServiceSettings,
    register: Callable[[grpc.aio.Server], None],
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    alive: Callable[[], bool] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop taking work and drain.

    ``start`` runs before the port reports SERVING (models loaded and warm).
    The health service name ``liveness`` (the kubelet's liveness probe) reports
    ``alive()`` every second: the event loop answering is not enough when the
    inference thread hangs.
    On the signal, in this order: health reports NOT_SERVING; the server stops
    taking new calls (it sends GOAWAY, and a call that arrives anyway fails
    UNAVAILABLE, which clients retry on another replica) while the calls it
    has accepted go on; ``stop`` finishes that in-flight work (a batcher
    drains its queue, the VAD ends its streams so gateways move at once);
    then the server is gone, at the latest ``shutdown_grace_s`` after the
    signal. Draining first and refusing later would take new calls into a
    queue that the cut-off then fails.
    """
    server = grpc.aio.server(options=server_options(settings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    register(server)
    bound = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if bound == 0:
        raise SystemExit(f"{name}: cannot bind {settings.host}:{settings.port}")
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, settings.host)
    await server.start()
    await start()
    for service in ("", name, LIVENESS):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving on %s:%d (metrics :%d)", name, settings.host, bound, settings.metrics_port)
    watch = asyncio.create_task(_watch_liveness(health_servicer, alive)) if alive else None

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()

    log.info("%s stopping: no new calls, draining in-flight work", name)
    for service in ("", name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    closing = asyncio.create_task(server.stop(settings.shutdown_grace_s))
    try:
        await stop()
    finally:
        await closing
        await cancel_and_wait(watch)
    log.info("%s stopped", name)


LIVENESS = "liveness"


async def _watch_liveness(
    health_servicer: health.aio.HealthServicer, alive: Callable[[], bool]
) -> None:
    reported = True
    while True:
        await asyncio.sleep(1.0)
        now = alive()
        if now != reported:
            serving = health_pb2.HealthCheckResponse.SERVING
            await health_servicer.set(
                LIVENESS, serving if now else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            if not now:
                log.error("not alive: the inference thread has not come back; liveness fails")
            reported = now


def status_for(exc: BaseException) -> grpc.StatusCode:
    """Map the batcher's and validators' errors onto gRPC status codes."""
    from services.common.batching import DeadlineExpiredError, QueueFullError, ShuttingDownError

    if isinstance(exc, ShuttingDownError):
        # Not this request's fault nor a lasting overload: another replica takes it.
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, DeadlineExpiredError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL
