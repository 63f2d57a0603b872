"""Results are computed concurrently and delivered in utterance order."""

from __future__ import annotations

import asyncio

from services.gateway.delivery import DeliveryQueue
from services.gateway.hub import SessionHub
from services.gateway.store import SessionStore
from services.gateway.vad_router import VadRouter
from services.protos import vad_pb2


async def test_results_leave_in_submission_order_whatever_order_they_finish_in() -> None:
    queue, delivered = DeliveryQueue(limit=4), []
    gates = [asyncio.Event() for _ in range(3)]

    async def compute(i: int) -> int:
        await gates[i].wait()
        return i

    async def deliver(i: int) -> None:
        delivered.append(i)

    for i in range(3):
        queue.submit(compute(i), deliver)
    for i in (2, 1, 0):  # the last finishes first
        gates[i].set()
        await asyncio.sleep(0)
    await queue.wait_idle(5)
    assert delivered == [0, 1, 2]


async def test_a_failed_result_does_not_hold_back_the_next() -> None:
    queue, delivered = DeliveryQueue(limit=4), []

    async def fail() -> int:
        raise RuntimeError("model fell over")

    async def ok() -> int:
        return 7

    async def deliver(i: int) -> None:
        delivered.append(i)

    queue.submit(fail(), deliver)
    queue.submit(ok(), deliver)
    await queue.wait_idle(5)
    assert delivered == [7]


async def test_the_queue_reports_full_at_its_limit() -> None:
    queue, gate = DeliveryQueue(limit=2), asyncio.Event()

    async def deliver(_: None) -> None:
        return None

    for _ in range(2):
        queue.submit(gate.wait(), deliver)  # type: ignore[arg-type]
    assert queue.full
    gate.set()
    await queue.wait_idle(5)
    assert not queue.full and queue.pending == 0


class _Session:
    """Fake session: only what the hub calls on it."""

    def __init__(self, session_id: str, fail: bool = False) -> None:
        self.session_id = session_id
        self.fail = fail
        self.lost: list[object] = []

    def on_vad_lost(self, client: object) -> None:
        if self.fail:
            raise RuntimeError("cannot move")
        self.lost.append(client)


async def test_the_hub_moves_every_session_past_one_that_fails() -> None:
    # Nothing listens on this Redis port; the hub only needs the store for replies.
    hub = SessionHub(SessionStore("redis://127.0.0.1:1/0", 60, 1))
    sessions = [_Session("a"), _Session("b", fail=True), _Session("c")]
    for s in sessions:
        hub.sessions[s.session_id] = s  # type: ignore[assignment]
    router = VadRouter("127.0.0.1:1", lambda e: None, lambda c: None)
    client = router.clients["127.0.0.1:1"]
    hub.on_vad_lost(client)
    assert sessions[0].lost == [client] and sessions[2].lost == [client]


async def test_vad_events_reach_only_the_stream_they_name() -> None:
    hub = SessionHub(SessionStore("redis://127.0.0.1:1/0", 60, 1))
    got: dict[str, list[str]] = {"x": [], "y": []}
    hub.bind_stream("s1/1", lambda e: got["x"].append(e.stream_id))
    hub.bind_stream("s2/1", lambda e: got["y"].append(e.stream_id))

    hub.on_vad_event(vad_pb2.SpeechEvent(stream_id="s2/1"))
    hub.on_vad_event(vad_pb2.SpeechEvent(stream_id="unknown/1"))
    hub.unbind_stream("s1/1")
    hub.on_vad_event(vad_pb2.SpeechEvent(stream_id="s1/1"))
    assert got == {"x": [], "y": ["s2/1"]}
