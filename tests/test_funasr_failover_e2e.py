"""FunASR inputs survive the loss of their VAD replica, as device sessions do."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import numpy as np
import pytest
from support.wer import word_error_rate

from services.cluster import LocalCluster
from services.common.audio import float_to_pcm16
from services.simulator.funasr_client import FunasrClient
from services.simulator.phrases import SENTENCES, VOICES
from services.simulator.speech import silence, synthesize, trim_silence

pytestmark = pytest.mark.e2e

STREAMS = 4


@pytest.fixture(scope="module")
def two_vads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(
        tmp_path_factory.mktemp("funasr-failover"),
        replicas={"vad": 2},
        extra_env={"SF_GATEWAY_COMPAT_OPEN": "true"},
    ) as cluster:
        yield cluster


async def speak(url: str, index: int, sentences: list[str]) -> list[str]:
    parts = [silence(0.3)]
    for sentence in sentences:
        parts += [trim_silence(synthesize(sentence, VOICES[index % len(VOICES)])), silence(1.5)]
    client = FunasrClient(url)
    await client.connect()
    try:
        await client.config("2pass", wav_name=f"stream-{index}")
        await client.stream(float_to_pcm16(np.concatenate(parts)))
        await client.end(is_end=True)
        messages = await client.until_end(timeout=30)
    finally:
        await client.close()
    finals = [m["text"] for m in messages if m["mode"] == "2pass-offline" and m["text"]]
    return [re.sub(r"<\|[^|]+\|>", "", text) for text in finals]


async def test_every_sentence_is_recognised_when_a_vad_replica_dies_mid_stream(
    two_vads: LocalCluster,
) -> None:
    spoken = [[SENTENCES[(i + k) % len(SENTENCES)] for k in range(3)] for i in range(STREAMS)]
    talks = [
        asyncio.create_task(speak(two_vads.funasr_url, i, sentences))
        for i, sentences in enumerate(spoken)
    ]
    await asyncio.sleep(3.0)  # inside the second sentence of every stream
    two_vads.kill("vad")
    heard = await asyncio.gather(*talks)
    for sentences, texts in zip(spoken, heard, strict=True):
        assert len(texts) == len(sentences), texts
        assert word_error_rate(sentences, texts) <= 0.25, texts
