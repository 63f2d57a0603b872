"""One load-generator process of a models-only step: utterances straight to asr and speaker.

On one machine the gateways and the VAD need CPU in proportion to the devices
(Opus decoding, framing, streaming), so the whole-cluster sweep may run out of
cores before the GPU runs out of work. This drives the GPU services alone at
the rate N devices would produce utterances (the same clips, the same duty
cycle): each device "speaks" a clip, then sends it to asr and speaker at once,
as the gateway does at the end of an utterance, and pauses. The latency is
from that moment to the later of the two answers.

    python -m bench.gpu.direct SPEC.json RESULT.json
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.gpu.loadgen import Share
from services.protos import asr_pb2, asr_pb2_grpc, speaker_pb2, speaker_pb2_grpc


def load_pcm(path: Path) -> list[bytes]:
    with np.load(path) as data:
        return [data[k].astype("<i2").tobytes() for k in sorted(data.files)]


async def run_device(
    spec: dict[str, Any],
    device: dict[str, Any],
    clips: list[bytes],
    asr: asr_pb2_grpc.AsrStub,
    speaker: speaker_pb2_grpc.SpeakerStub,
    share: Share,
) -> None:
    rng = random.Random(int(device["seed"]))
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time() + rng.uniform(0, spec["ramp_s"])))
    end = time.monotonic() + spec["seconds"]
    pending: list[asyncio.Task[None]] = []
    while time.monotonic() < end:
        pcm = clips[rng.randrange(len(clips))]
        speech_s = len(pcm) / 32000
        await asyncio.sleep(speech_s)
        share.utterances_sent += 1
        pending.append(asyncio.create_task(_recognise(spec, pcm, asr, speaker, share)))
        await asyncio.sleep(max(1.0, speech_s * (1 - spec["duty"]) / spec["duty"]))
    await asyncio.gather(*pending)


async def _recognise(
    spec: dict[str, Any],
    pcm: bytes,
    asr: asr_pb2_grpc.AsrStub,
    speaker: speaker_pb2_grpc.SpeakerStub,
    share: Share,
) -> None:
    started = time.monotonic()
    timeout = spec["answer_wait_s"]
    try:
        text, _ = await asyncio.gather(
            asr.Recognize(
                asr_pb2.RecognizeRequest(pcm=pcm, sample_rate=16000, language="auto", use_itn=True),
                timeout=timeout,
            ),
            speaker.Embed(speaker_pb2.EmbedRequest(pcm=pcm, sample_rate=16000), timeout=timeout),
        )
    except grpc.aio.AioRpcError as exc:
        share.alerts += 1
        reason = exc.code().name
        share.closes[reason] = share.closes.get(reason, 0) + 1
        return
    share.recognised += 1
    share.processing_ms.append((time.monotonic() - started) * 1000)
    share.asr_batch.append(int(text.batch_size))
    share.asr_model_ms.append(float(text.model_ms))
    share.asr_queue_ms.append(float(text.queue_ms))


async def run_share(spec: dict[str, Any]) -> Share:
    clips = load_pcm(Path(spec["pcm"]))
    share = Share(devices=len(spec["devices"]), connected=len(spec["devices"]))
    channels = {t: grpc.aio.insecure_channel(t) for t in {*spec["asr"], *spec["speaker"]}}
    try:
        tasks = []
        for i, device in enumerate(spec["devices"]):
            asr = asr_pb2_grpc.AsrStub(channels[spec["asr"][i % len(spec["asr"])]])
            spk = speaker_pb2_grpc.SpeakerStub(channels[spec["speaker"][i % len(spec["speaker"])]])
            tasks.append(run_device(spec, device, clips, asr, spk, share))
        await asyncio.gather(*tasks)
    finally:
        for channel in channels.values():
            await channel.close()
    return share


def main() -> None:
    spec_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    share = asyncio.run(run_share(json.loads(spec_path.read_text())))
    result_path.write_text(json.dumps(asdict(share)))


if __name__ == "__main__":
    main()
