"""A device's speech, end to end: WebSocket -> VAD -> ASR -> stt, through real processes."""

from __future__ import annotations

import json
import urllib.request

import pytest
import redis
from conftest import DeviceFactory
from support.waiting import eventually
from support.wer import word_error_rate

from services.cluster import LocalCluster
from services.simulator.speech import synthesize

pytestmark = pytest.mark.e2e

SENTENCE = "please turn on the lights in the living room"


async def test_auto_mode_sentence_is_recognised(make_device: DeviceFactory) -> None:
    device = make_device()
    await device.connect()
    [result] = await device.speak_auto([synthesize(SENTENCE)])
    assert word_error_rate([SENTENCE], [result.text]) <= 0.10, result.text
    assert result.message["session_id"] == device.session_id
    assert result.message["language"] == "en"
    assert result.message["timing"]["end_cause"] == "vad"
    assert result.latency_s is not None and 0 < result.latency_s < 10


async def test_two_utterances_separated_by_silence_give_two_results_in_order(
    make_device: DeviceFactory,
) -> None:
    # Phrases tiny.en hears the same through Opus wherever a cut falls within
    # +-50 ms: "remind me to call my sister" came back with 1 to 3 words wrong
    # as its start moved by 10 ms, so a VAD change of one frame failed this.
    first, second = "what time is it now", "remind me to buy some milk"
    device = make_device()
    await device.connect()
    results = await device.speak_auto([synthesize(first), synthesize(second)], gap_s=1.5)
    assert [r.message["seq"] for r in results] == [1, 2]
    assert word_error_rate([first], [results[0].text]) <= 0.2, results[0].text
    assert word_error_rate([second], [results[1].text]) <= 0.2, results[1].text
    assert results[0].message["timing"]["end_ms"] < results[1].message["timing"]["start_ms"]


async def test_listening_again_over_near_silence_gives_only_the_next_sentence(
    make_device: DeviceFactory,
) -> None:
    first, second = "what time is it now", "play some jazz music"
    device = make_device()
    await device.connect()
    await device.speak_auto([synthesize(first)])
    # The new listen period opens on the Opus decoder's near-silent tail, where
    # a fresh FSMN-VAD stream reports a 500 ms phantom utterance; it must not
    # reach the ASR (which would answer "you").
    [result] = await device.speak_auto([synthesize(second)], lead_s=1.5)
    assert result.message["seq"] == 2
    assert word_error_rate([second], [result.text]) <= 0.25, result.text


async def test_manual_mode_gives_one_result_per_start_stop_pair(make_device: DeviceFactory) -> None:
    sentences = ["open the garage door", "play some music please"]
    device = make_device()
    await device.connect()
    results = await device.speak_manual([synthesize(s) for s in sentences])
    assert len(results) == 2
    assert all(r.message["timing"]["end_cause"] == "listen_stop" for r in results)
    assert word_error_rate(sentences, [r.text for r in results]) <= 0.2


async def test_realtime_mode_is_cut_by_vad_like_auto(make_device: DeviceFactory) -> None:
    device = make_device()
    await device.connect()
    [result] = await device.speak_auto([synthesize("how is the weather today")], mode="realtime")
    assert word_error_rate(["how is the weather today"], [result.text]) <= 0.2


@pytest.mark.parametrize("version", [1, 2, 3])
async def test_every_binary_protocol_version_carries_audio(
    make_device: DeviceFactory, version: int
) -> None:
    sentence = "close the bedroom window"
    device = make_device(protocol_version=version, speed=2.0)
    await device.connect()
    [result] = await device.speak_auto([synthesize(sentence)])
    assert word_error_rate([sentence], [result.text]) <= 0.2, result.text


async def test_unknown_message_types_are_tolerated(make_device: DeviceFactory) -> None:
    device = make_device(speed=2.0)
    await device.connect()
    await device.send_json({"session_id": device.session_id, "type": "mcp", "payload": {}})
    await device.send_json({"session_id": device.session_id, "type": "something_new"})
    await device.send_json({"session_id": device.session_id, "type": "abort", "reason": "x"})
    await device.listen("detect", text="hello xiaozhi")
    [result] = await device.speak_auto([synthesize("stop the music")])
    assert word_error_rate(["stop the music"], [result.text]) <= 0.34


async def test_session_record_in_redis_holds_device_and_last_result(
    make_device: DeviceFactory, redis_client: redis.Redis
) -> None:
    device = make_device(speed=2.0)
    await device.connect()
    [result] = await device.speak_auto([synthesize("turn off the fan")])
    key = f"sf:session:{device.session_id}"
    # The result is sent to the device first and recorded just after.
    await eventually(
        lambda: redis_client.hget(key, "last_utterance_id") == result.message["utterance_id"],
        5,
        "the result was not recorded",
    )
    record = redis_client.hgetall(key)
    assert record["device_id"] == device.config.device_id
    assert record["client_id"] == device.config.client_id
    assert record["last_utterance_id"] == result.message["utterance_id"]
    assert json.loads(record["last_result"])["text"] == result.text
    assert 0 < redis_client.ttl(f"sf:session:{device.session_id}") <= 3600
    route = redis_client.hgetall(f"sf:device:{device.config.device_id}")
    assert route["session_id"] == device.session_id


def test_health_readiness_and_metrics_endpoints(cluster: LocalCluster) -> None:
    with urllib.request.urlopen(f"{cluster.gateway_url}/healthz", timeout=5) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(f"{cluster.gateway_url}/readyz", timeout=5) as reply:
        body = json.loads(reply.read())
    assert body["checks"] == {"vad": True, "redis": True, "draining": False}
    assert body["status"] == "ready"
    with urllib.request.urlopen(f"{cluster.gateway_url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert "speechfront_gateway_sessions" in text
    for port in (
        cluster.ports.vad_metrics,
        cluster.ports.asr_metrics,
        cluster.ports.speaker_metrics,
    ):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert "speechfront_" in reply.read().decode()
