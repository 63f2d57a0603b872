"""One load-generator process: a share of the simulated devices of one sweep step.

Thousands of devices sending a 60 ms Opus packet each at real-time pace are
more than one Python event loop can pace, so the orchestrator splits a step
over several of these processes. Each reads its devices and the pre-encoded
speech from a JSON spec, waits for the common start time, runs its devices
(connects spread over the ramp, then talk with pauses for the duty cycle)
and writes what it measured as JSON.

    python -m bench.gpu.loadgen SPEC.json RESULT.json
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.simulator.device import DeviceConfig, SimulatedDevice


@dataclass
class Clip:
    packets: list[bytes]
    # Index of the packet holding the last voiced sample.
    last_voiced: int


@dataclass
class Share:
    """What one process measured; the orchestrator adds the shares of a step up."""

    devices: int = 0
    connected: int = 0
    utterances_sent: int = 0
    recognised: int = 0
    alerts: int = 0
    # Utterances sent that got neither an stt nor an alert before the wait ran out.
    unanswered: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    processing_ms: list[float] = field(default_factory=list)
    perceived_ms: list[float] = field(default_factory=list)
    asr_batch: list[int] = field(default_factory=list)
    asr_model_ms: list[float] = field(default_factory=list)
    asr_queue_ms: list[float] = field(default_factory=list)
    # Packets that left later than their real-time slot by more than one frame (pacing lag).
    late_packets: int = 0
    packets: int = 0


def load_clips(path: Path) -> tuple[list[Clip], bytes]:
    data = json.loads(path.read_text())
    clips = [
        Clip([base64.b64decode(p) for p in c["packets"]], int(c["last_voiced"]))
        for c in data["clips"]
    ]
    return clips, base64.b64decode(data["quiet"])


def script(
    clips: list[Clip], quiet: bytes, seconds: float, duty: float, rng: random.Random
) -> tuple[list[bytes], set[int]]:
    """Packets for one device: utterances, each followed by the pause the duty cycle asks for."""
    packets: list[bytes] = []
    voiced_ends: set[int] = set()
    frames = int(seconds * 1000 / 60)
    while len(packets) < frames:
        clip = clips[rng.randrange(len(clips))]
        voiced_ends.add(len(packets) + clip.last_voiced)
        packets.extend(clip.packets)
        # At least 1 s of silence, so the VAD's end window always closes the utterance.
        pause = max(17, round(len(clip.packets) * (1 - duty) / duty))
        packets.extend([quiet] * pause)
    return packets, voiced_ends


async def run_device(
    spec: dict[str, Any], device: dict[str, Any], clips: list[Clip], quiet: bytes, share: Share
) -> None:
    rng = random.Random(int(device["seed"]))
    packets, voiced_ends = script(clips, quiet, spec["seconds"], spec["duty"], rng)
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time() + rng.uniform(0, spec["ramp_s"])))
    sim = SimulatedDevice(
        DeviceConfig(url=device["url"], token=spec["token"], device_id=device["id"])
    )
    sent_at: dict[str, float] = {}
    answers: list[dict[str, Any]] = []
    try:
        await sim.connect()
        share.connected += 1
        await sim.listen("start", "auto")
        sent_at = await _paced(sim, packets, voiced_ends, share)
        share.utterances_sent += len(voiced_ends)
        deadline = time.monotonic() + spec["answer_wait_s"]
        with contextlib.suppress(TimeoutError):
            while len(answers) < len(voiced_ends) and time.monotonic() < deadline:
                remaining = deadline - time.monotonic()
                message = await asyncio.wait_for(sim.messages.get(), remaining)
                if message.get("type") in ("stt", "alert"):
                    answers.append(message)
    except Exception as exc:
        reason = f"{sim.close_code} {sim.close_reason}" if sim.close_code else type(exc).__name__
        share.closes[reason] = share.closes.get(reason, 0) + 1
    finally:
        with contextlib.suppress(Exception):
            await sim.close()
    _score(answers, sent_at, share)
    share.unanswered += max(0, len(sent_at) - len(answers))


async def _paced(
    sim: SimulatedDevice, packets: list[bytes], voiced_ends: set[int], share: Share
) -> dict[str, float]:
    """Send at real-time pace; when each utterance's last voiced packet left, by index."""
    frame_s = 0.06
    started = time.monotonic()
    sent_at: dict[str, float] = {}
    for index, packet in enumerate(packets):
        delay = started + index * frame_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -frame_s:
            share.late_packets += 1
        await sim.send_packet(packet)
        share.packets += 1
        if index in voiced_ends:
            sent_at[str(index)] = time.monotonic()
    return sent_at


def _score(answers: list[dict[str, Any]], sent_at: dict[str, float], share: Share) -> None:
    # Packet indexes give each voiced end in session audio time, as stt's end_ms reports it.
    ends_ms = {name: (int(name) + 1) * 60 for name in sent_at}
    matched: set[str] = set()
    for message in answers:
        if message["type"] != "stt":
            share.alerts += 1
            continue
        share.recognised += 1
        timing = message["timing"]
        share.processing_ms.append(float(timing["processing_ms"]))
        share.asr_batch.append(int(timing.get("asr_batch", 0)))
        share.asr_model_ms.append(float(timing.get("asr_model_ms", 0.0)))
        share.asr_queue_ms.append(float(timing.get("asr_queue_ms", 0.0)))
        end_ms = int(timing["end_ms"])
        name = min(ends_ms, key=lambda n: abs(ends_ms[n] - end_ms), default=None)
        if name is not None and name not in matched and abs(ends_ms[name] - end_ms) < 1000:
            matched.add(name)
            share.perceived_ms.append((message["_received_at"] - sent_at[name]) * 1000)


async def run_share(spec: dict[str, Any]) -> Share:
    clips, quiet = load_clips(Path(spec["clips"]))
    share = Share(devices=len(spec["devices"]))
    await asyncio.gather(*(run_device(spec, d, clips, quiet, share) for d in spec["devices"]))
    return share


def main() -> None:
    spec_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    try:
        import uvloop  # a faster loop paces more devices per process
    except ImportError:
        share = asyncio.run(run_share(spec))
    else:
        share = uvloop.run(run_share(spec))
    result_path.write_text(json.dumps(asdict(share)))


if __name__ == "__main__":
    main()
