"""A call that a stopping replica cancels is retried on another replica at once.

A server shutting down cancels the calls it still holds at the end of its
grace period; for the gateway that is a replica gone, not a failed utterance.
The replicas are the compute pool tests' stand-ins over real gRPC.
"""

from __future__ import annotations

import grpc
from test_compute_pool import FAST_ENOUGH, compute_over, counter, recognize, stub_replicas


async def test_a_call_cancelled_by_a_stopping_replica_is_answered_by_another() -> None:
    async with stub_replicas("a", "b") as (a, b), compute_over(a, b) as clients:
        b.refuse = grpc.StatusCode.CANCELLED
        retries = counter("speechfront_gateway_compute_retries_total")
        for i in range(6):  # round-robin reaches b within two calls
            text, seconds = await recognize(clients, f"cancelled-{i}")
            assert (text, seconds < FAST_ENOUGH) == ("a", True)
            if b.arrivals:
                break
        assert b.arrivals
        assert counter("speechfront_gateway_compute_retries_total") > retries
