"""Audio handed straight from uvicorn's WebSocket protocol to the session
(``BINARY_SINK``) is checked, ordered and refused exactly as through the
ASGI receive queue: a gateway of the test's own, on the server config the
gateway runs, with real WebSockets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import opuslib
import pytest
import uvicorn
import websockets
from prometheus_client import REGISTRY
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

from services.common.audio import SAMPLE_RATE, float_to_pcm16
from services.gateway.app import create_app, server_config
from services.gateway.config import GatewaySettings
from services.gateway.connection import Inbound
from services.gateway.framing import PayloadType, encode_frame
from services.probes import free_port
from services.simulator.device import DeviceConfig, SimulatedDevice

FRAME_SAMPLES = SAMPLE_RATE * 60 // 1000


@pytest.fixture(scope="module")
def gateway_port() -> Iterator[int]:
    # Nothing listens on these: sessions wait for a VAD replica, which is enough here.
    settings = GatewaySettings(
        host="127.0.0.1",
        port=free_port(),
        redis_url="redis://127.0.0.1:1/0",
        vad_target="127.0.0.1:1",
        asr_target="127.0.0.1:1",
        speaker_target="127.0.0.1:1",
        funasr_port=0,
        allow_anonymous=True,
        max_frames_per_s=40,
        max_audio_speed=100.0,
    )
    server = uvicorn.Server(server_config(create_app(settings), settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        yield settings.port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The frames the sink took."""
    frames: list[bytes] = []
    take = Inbound.take

    def counting(self: Inbound, data: bytes) -> bool:
        took = take(self, data)
        if took:
            frames.append(data)
        return took

    monkeypatch.setattr(Inbound, "take", counting)
    return frames


@pytest.fixture
async def device(gateway_port: int, taken: list[bytes]) -> AsyncIterator[SimulatedDevice]:
    """A listening device whose session is in its receive loop: the sink has taken a frame
    (with Redis unreachable, the session's first messages may queue while it starts)."""
    config = DeviceConfig(url=f"ws://127.0.0.1:{gateway_port}/xiaozhi/v1/")
    device = SimulatedDevice(config)
    await device.connect()
    await device.listen("start", "auto")
    try:
        packet = encode_frame(3, packets(1)[0], PayloadType.OPUS)
        deadline = time.monotonic() + 10
        while not taken:
            assert time.monotonic() < deadline, "the sink took no frame"
            await device.send_raw(packet)
            await asyncio.sleep(0.1)
        taken.clear()
        yield device
    finally:
        await device.close()


def packets(count: int) -> list[bytes]:
    encoder = opuslib.Encoder(SAMPLE_RATE, 1, opuslib.APPLICATION_VOIP)
    tone = 0.05 * np.sin(np.arange(FRAME_SAMPLES * count) / 7.0)
    pcm = float_to_pcm16(tone)
    step = FRAME_SAMPLES * 2
    return [encoder.encode(pcm[i : i + step], FRAME_SAMPLES) for i in range(0, len(pcm), step)]


def connection_of(device: SimulatedDevice) -> ClientConnection:
    assert device._ws is not None
    return device._ws


def on_the_wire(device: SimulatedDevice, frames: list[Frame]) -> bytes:
    """The bytes the device's WebSocket would send for ``frames``, masked."""
    protocol = connection_of(device).protocol
    for frame in frames:
        protocol.send_frame(frame)
    return b"".join(protocol.data_to_send())


def write_raw(device: SimulatedDevice, data: bytes) -> None:
    """One write on the device's socket, so one read at the server: several
    frames at once, as a device does when its network stalls and then flushes."""
    connection_of(device).transport.write(data)


def audio_frame(packet: bytes) -> Frame:
    return Frame(Opcode.BINARY, encode_frame(3, packet, PayloadType.OPUS))


@pytest.fixture
def parsed_by_websockets(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The binary messages that went through websockets' parser and uvicorn's dispatch."""
    messages: list[bytes] = []
    handle = WebSocketsSansIOProtocol.handle_bytes

    def counting(self: WebSocketsSansIOProtocol, event: Frame) -> None:
        messages.append(bytes(event.data))
        handle(self, event)

    monkeypatch.setattr(WebSocketsSansIOProtocol, "handle_bytes", counting)
    return messages


def frames_handled() -> float:
    return REGISTRY.get_sample_value("speechfront_gateway_frames_total") or 0.0


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_audio_is_taken_as_parsed_and_reaches_the_session(
    device: SimulatedDevice, taken: list[bytes]
) -> None:
    before = frames_handled()
    for packet in packets(10):
        await device.send_raw(encode_frame(3, packet, PayloadType.OPUS))
        await asyncio.sleep(0.06)
    await eventually(lambda: frames_handled() - before >= 10)
    assert len(taken) >= 8  # all of them, unless one came while the loop was busy
    assert not device.closed.is_set()


async def test_json_frames_between_audio_frames_still_reach_the_loop(
    device: SimulatedDevice, taken: list[bytes]
) -> None:
    audio = packets(4)
    for packet in audio[:2]:
        await device.send_raw(encode_frame(3, packet, PayloadType.OPUS))
    # A JSON frame the session refuses: handled by the loop, in order, and closing.
    await device.send_raw(
        encode_frame(3, b'{"type": "listen", "state": "bogus"}', PayloadType.JSON)
    )
    for packet in audio[2:]:
        await device.send_raw(encode_frame(3, packet, PayloadType.OPUS))
    code, reason = await device.wait_closed(10)
    assert code == 1007 and "listen state" in reason
    assert all(frame[0] == PayloadType.OPUS for frame in taken)


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        (b"\x00\x00\x00\x09abc", 1007, "payload bytes"),  # header says 9, 3 follow
        (b"\x07\x00\x00\x00", 1007, "payload type"),
        (encode_frame(3, b"\xff" * 40, PayloadType.OPUS), 1007, "Opus"),
    ],
)
async def test_a_bad_frame_taken_by_the_sink_closes_with_its_reason(
    device: SimulatedDevice, taken: list[bytes], frame: bytes, code: int, words: str
) -> None:
    good = packets(1)[0]
    await device.send_raw(encode_frame(3, good, PayloadType.OPUS))
    await eventually(lambda: len(taken) >= 1)
    await asyncio.sleep(0.1)
    await device.send_raw(frame)
    closed_code, reason = await device.wait_closed(10)
    assert closed_code == code and words in reason, (closed_code, reason)


async def test_frames_over_the_rate_close_with_1008(
    device: SimulatedDevice, taken: list[bytes]
) -> None:
    packet = packets(1)[0]
    for _ in range(400):  # 40 frames/s over a 5 s window: 200 allowed
        try:
            await device.send_raw(encode_frame(3, packet, PayloadType.OPUS))
        except websockets.ConnectionClosed:
            break
    code, reason = await device.wait_closed(10)
    assert code == 1008 and "frame rate" in reason
    assert len(taken) >= 100


async def test_audio_frames_arriving_in_one_read_are_each_handled_once_without_websockets_parser(
    device: SimulatedDevice, taken: list[bytes], parsed_by_websockets: list[bytes]
) -> None:
    before = frames_handled()
    audio = packets(6)
    write_raw(device, on_the_wire(device, [audio_frame(packet) for packet in audio]))
    await eventually(lambda: frames_handled() - before >= 6)
    await asyncio.sleep(0.1)
    assert frames_handled() - before == 6
    assert taken == [encode_frame(3, packet, PayloadType.OPUS) for packet in audio]
    assert parsed_by_websockets == []
    assert not device.closed.is_set()


async def test_a_frame_split_across_reads_is_handled_once(
    device: SimulatedDevice, taken: list[bytes]
) -> None:
    audio = packets(3)
    wire = on_the_wire(device, [audio_frame(packet) for packet in audio])
    before = frames_handled()
    cut = len(wire) // 2  # inside the second frame
    write_raw(device, wire[:cut])
    await eventually(lambda: frames_handled() - before >= 1)
    await asyncio.sleep(0.1)
    write_raw(device, wire[cut:])
    await eventually(lambda: frames_handled() - before >= 3)
    await asyncio.sleep(0.1)
    assert frames_handled() - before == 3
    assert [frame[4:] for frame in taken] == audio


async def test_a_json_frame_in_the_same_read_as_audio_keeps_its_place(
    device: SimulatedDevice, taken: list[bytes]
) -> None:
    audio = packets(3)
    bogus = encode_frame(3, b'{"type": "listen", "state": "bogus"}', PayloadType.JSON)
    frames = [audio_frame(audio[0]), Frame(Opcode.BINARY, bogus), audio_frame(audio[1])]
    write_raw(device, on_the_wire(device, frames))
    code, reason = await device.wait_closed(10)
    assert code == 1007 and "listen state" in reason
    # The audio after the refused message was not handled ahead of it.
    assert [frame[4:] for frame in taken] == audio[:1]


async def test_a_ping_among_audio_frames_is_answered_and_the_audio_handled(
    device: SimulatedDevice, taken: list[bytes]
) -> None:
    connection = connection_of(device)
    audio = packets(2)
    before = frames_handled()
    pong = asyncio.get_running_loop().create_future()
    connection.pending_pings[b"fast"] = (pong, connection.loop.time())
    frames = [audio_frame(audio[0]), Frame(Opcode.PING, b"fast"), audio_frame(audio[1])]
    write_raw(device, on_the_wire(device, frames))
    await asyncio.wait_for(pong, 5)
    await eventually(lambda: frames_handled() - before >= 2)
    assert [frame[4:] for frame in taken] == audio


async def test_an_unmasked_client_frame_closes_with_a_protocol_error(
    device: SimulatedDevice, taken: list[bytes]
) -> None:
    payload = encode_frame(3, packets(1)[0], PayloadType.OPUS)
    write_raw(device, bytes([0x82, len(payload)]) + payload)  # mask bit clear
    code, _ = await device.wait_closed(10)
    assert code == 1002
    assert taken == []
