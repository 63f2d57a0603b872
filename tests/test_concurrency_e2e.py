"""Many devices at once: each gets its own text back, never another device's."""

from __future__ import annotations

import asyncio

import pytest
from conftest import DeviceFactory
from support.wer import word_error_rate

from services.simulator.speech import synthesize

pytestmark = pytest.mark.e2e

SENTENCES = [
    "turn on the kitchen lights",
    "what is the weather like tomorrow",
    "play some jazz music",
    "wake me up early tomorrow",
    "how far is the moon from the earth",
    "remind me to water the plants",
    "close the curtains in the bedroom",
    "tell me a funny story",
    "who won the football game last night",
    "open the front door",
    "call my brother on his mobile",
    "what is the capital of france",
    "make it a bit louder",
    "what songs do you know",
    "is it going to rain this afternoon",
    "switch off the radio",
    "read me the latest news",
    "start the vacuum cleaner",
    "how do you spell necessary",
    "good night and sweet dreams",
]
VOICES = ["en", "en+f3", "en+m7", "en-us+f5"]


async def test_twenty_devices_each_get_their_own_text(make_device: DeviceFactory) -> None:
    devices = [make_device() for _ in SENTENCES]
    await asyncio.gather(*(device.connect() for device in devices))
    audio = [synthesize(s, VOICES[i % len(VOICES)]) for i, s in enumerate(SENTENCES)]
    results = await asyncio.gather(
        *(
            device.speak_auto([clip], timeout=90)
            for device, clip in zip(devices, audio, strict=True)
        )
    )
    texts = [r[0].text for r in results]
    for i, (device, [result]) in enumerate(zip(devices, results, strict=True)):
        assert result.message["session_id"] == device.session_id
        # The closest of all twenty sentences must be the one this device spoke.
        distances = [word_error_rate([s], [texts[i]]) for s in SENTENCES]
        assert distances.index(min(distances)) == i, (SENTENCES[i], texts[i])
    assert word_error_rate(SENTENCES, texts) <= 0.15, texts
