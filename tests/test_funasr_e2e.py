"""FunASR's WebSocket protocol on the cluster, spoken as its clients speak it."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis
from support.wer import word_error_rate
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.cluster import LocalCluster
from services.common.audio import SAMPLE_RATE, float_to_pcm16, resample, write_wav
from services.gateway.compat.keys import KEYS_SET
from services.simulator.funasr_client import FunasrClient
from services.simulator.speech import silence, synthesize, trim_silence

pytestmark = pytest.mark.e2e

KEY = "funasr-test-key"
FIRST, SECOND = "turn on the kitchen lights", "what is the capital of france"
_TAGS = re.compile(r"<\|([^|]+)\|>")


def speech(*sentences: str, gap_s: float = 1.5) -> bytes:
    parts = [silence(0.3)]
    for sentence in sentences:
        parts += [trim_silence(synthesize(sentence)), silence(gap_s)]
    return float_to_pcm16(np.concatenate(parts))


def untagged(text: str) -> str:
    return _TAGS.sub("", text)


@pytest.fixture(scope="module")
def key(redis_client: redis.Redis) -> str:
    """A key in the Redis set, as an operator adds one."""
    redis_client.sadd(KEYS_SET, KEY)
    return KEY


@pytest.fixture
async def client(cluster: LocalCluster, key: str) -> AsyncIterator[FunasrClient]:
    funasr = FunasrClient(cluster.funasr_url, key)
    await funasr.connect()
    yield funasr
    await funasr.close()


async def test_offline_utterance_in_one_message_reads_whole_as_xiaozhi_reads_it(
    client: FunasrClient,
) -> None:
    pcm = speech(FIRST, SECOND)
    started = time.monotonic()
    await client.config("offline", wav_name="xiaozhi-session", itn=False)
    await client.ws.send(pcm)
    await client.end()
    text = await client.read_like_xiaozhi()
    took = time.monotonic() - started
    # Both segments, in order; every message before the last said is_final false.
    assert word_error_rate([f"{FIRST} {SECOND}"], [untagged(text)]) <= 0.2, text
    assert [m.message["is_final"] for m in client.received] == [False, True]
    assert all(m.message["wav_name"] == "xiaozhi-session" for m in client.received)
    # The VAD took the audio as fast as it could, not at real-time pace.
    assert took < len(pcm) / 2 / SAMPLE_RATE, took


async def test_offline_text_carries_sensevoice_tags_xiaozhi_parses(client: FunasrClient) -> None:
    await client.config("offline", itn=False)
    await client.ws.send(speech(FIRST))
    await client.end()
    text = await client.read_like_xiaozhi()
    tags = _TAGS.findall(text)
    assert len(tags) == 4 and tags[0] == "en" and tags[3] == "woitn", text
    assert text.startswith("<|") and untagged(text).strip()


async def test_end_of_input_is_acknowledged_final_with_the_wav_name(client: FunasrClient) -> None:
    await client.config("offline", wav_name="clip-7")
    await client.ws.send(speech(FIRST))
    await client.end(is_end=True)
    messages = await client.until_end()
    last = messages[-1]
    assert last["is_end"] is True and last["is_final"] is True and "error" not in last
    assert all(m["wav_name"] == "clip-7" for m in messages)
    assert last["timestamp"][0][0] < last["timestamp"][0][1]


async def test_several_inputs_on_one_connection_each_get_their_own_results(
    client: FunasrClient,
) -> None:
    texts = []
    for i, sentence in enumerate((FIRST, SECOND)):
        await client.config("offline", wav_name=f"input-{i}")
        await client.ws.send(speech(sentence))
        await client.end(is_end=True)
        messages = await client.until_end()
        assert {m["wav_name"] for m in messages} == {f"input-{i}"}
        texts.append(untagged("".join(m["text"] for m in messages)))
    assert word_error_rate([FIRST, SECOND], texts) <= 0.2, texts


async def test_audio_after_an_end_is_a_new_input_with_the_same_settings(
    client: FunasrClient,
) -> None:
    await client.config("offline", wav_name="again")
    await client.ws.send(speech(FIRST))
    await client.end()
    await client.read_like_xiaozhi()
    await client.ws.send(speech(SECOND))  # no new config message
    await client.end()
    text = await client.read_like_xiaozhi()
    assert word_error_rate([SECOND], [untagged(text)]) <= 0.2, text
    assert client.received[-1].message["wav_name"] == "again"


async def test_pcm_at_8_khz_is_resampled_and_recognised(client: FunasrClient) -> None:
    narrow = resample(np.concatenate([silence(0.3), synthesize(FIRST), silence(0.8)]), 16000, 8000)
    await client.config("offline", audio_fs=8000)
    await client.ws.send(float_to_pcm16(narrow))
    await client.end()
    assert word_error_rate([FIRST], [untagged(await client.read_like_xiaozhi())]) <= 0.2


async def test_a_wav_file_sent_with_its_wav_format_is_decoded_and_recognised(
    client: FunasrClient,
) -> None:
    samples = np.concatenate([silence(0.3), synthesize(SECOND), silence(0.8)])
    await client.config("offline", wav_format="wav", wav_name="file.wav")
    await client.ws.send(write_wav(resample(samples, 16000, 22050), 22050))
    await client.end(is_end=True)
    messages = await client.until_end()
    text = untagged("".join(m["text"] for m in messages))
    assert word_error_rate([SECOND], [text]) <= 0.2, messages


async def test_2pass_at_real_time_pace_sends_partials_while_the_segment_is_spoken(
    client: FunasrClient,
) -> None:
    # Long enough (about 5 s) that partials have time to agree while it is spoken.
    sentence = "please turn on the lights in the living room and play some jazz music"
    voiced = trim_silence(synthesize(sentence, speed_wpm=140))
    pcm = float_to_pcm16(np.concatenate([silence(0.3), voiced, silence(1.2)]))
    speech_ends = time.monotonic() + 0.3 + voiced.size / SAMPLE_RATE
    await client.config("2pass", wav_name="live")
    await client.stream(pcm)
    await client.end(is_end=True)
    messages = await client.until_end()
    partials = [r for r in client.received if r.message["mode"] == "2pass-online"]
    finals = [r.message for r in client.received if r.message["mode"] == "2pass-offline"]
    assert partials, [r.message for r in client.received]
    assert partials[0].at < speech_ends  # heard while the sentence was still being spoken
    assert all(not r.message["is_final"] for r in partials)
    assert word_error_rate([sentence], [untagged(finals[0]["text"])]) <= 0.2, finals
    assert messages[-1]["is_end"] and messages[-1]["is_final"]


async def test_online_partials_append_up_to_the_sentence(client: FunasrClient) -> None:
    sentence = "close the curtains in the bedroom"
    pcm = float_to_pcm16(np.concatenate([silence(0.3), synthesize(sentence), silence(1.2)]))
    await client.config("online", wav_name="online")
    await client.stream(pcm)
    await client.end(is_end=True)
    messages = await client.until_end()
    online = [m for m in messages if m["mode"] == "online" and m["text"]]
    assert len(online) >= 2, messages
    assert word_error_rate([sentence], ["".join(m["text"] for m in online)]) <= 0.34, online


async def test_audio_before_the_config_message_closes_with_a_reason(client: FunasrClient) -> None:
    await client.ws.send(speech(FIRST))
    error = await client.recv()
    assert error["is_final"] is False and error["is_end"] is True
    assert "config" in error["error"]
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_unknown_mode_is_an_error_to_the_client(client: FunasrClient) -> None:
    await client.config("streaming-please")
    error = await client.recv()
    assert "unsupported mode" in error["error"] and error["is_final"] is False
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


async def test_wrong_key_is_refused_at_the_upgrade_and_others_carry_on(
    cluster: LocalCluster, client: FunasrClient
) -> None:
    intruder = FunasrClient(cluster.funasr_url, "not-a-key", semicolon=False)
    with pytest.raises(InvalidStatus) as refused:
        await intruder.connect()
    assert refused.value.response.status_code == 401
    await client.config("offline")
    await client.ws.send(speech(FIRST))
    await client.end()
    assert word_error_rate([FIRST], [untagged(await client.read_like_xiaozhi())]) <= 0.2
