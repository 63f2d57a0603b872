"""Partial results of the FunASR endpoint under load, and what they cost the finals.

N FunASR 2pass streams speak sentences at real-time pace (60 ms chunks,
pauses between sentences) into one local cluster, in rounds that alternate
between partial results on (``chunk_size`` [5, 10, 5]: a partial every
600 ms) and off (a stride of 6 s, longer than any sentence), so a machine
whose load drifts weighs on both sides alike.
Reported: the delay from the end of each stride's audio to its partial
leaving the gateway (p50/p95, from the gateway's histogram), how many
partials were sent, skipped or dropped, and each run's final latency (last
voiced chunk sent → ``2pass-offline`` text received, p50/p95) with their
ratio. Results go to ``bench-results/compat_bench.json``.

    .venv/bin/python -m bench.compat_bench --streams 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from services.cluster import LocalCluster
from services.common.audio import SAMPLE_RATE, float_to_pcm16
from services.simulator.funasr_client import FunasrClient
from services.simulator.phrases import SENTENCES, VOICES
from services.simulator.speech import silence, synthesize, trim_silence

CHUNK_MS = 60
GAP_S = 1.5


def script(index: int, sentences: int) -> tuple[bytes, list[int]]:
    """One stream's audio and the byte offset where each sentence's voice ends."""
    parts, ends, length = [silence(0.3 + 0.05 * index)], [], 0
    length = parts[0].size
    for k in range(sentences):
        text = SENTENCES[(index + k) % len(SENTENCES)]
        voiced = trim_silence(synthesize(text, VOICES[(index + k) % len(VOICES)]))
        parts += [voiced, silence(GAP_S)]
        ends.append((length + voiced.size) * 2)
        length += voiced.size + int(GAP_S * SAMPLE_RATE)
    return float_to_pcm16(np.concatenate(parts)), ends


async def one_stream(url: str, index: int, sentences: int, partials: bool) -> list[float]:
    """Final latencies of one stream's sentences (seconds)."""
    pcm, ends = script(index, sentences)
    client = FunasrClient(url)
    await client.connect()
    step = SAMPLE_RATE * CHUNK_MS // 1000 * 2
    voiced_sent: list[float] = []
    try:
        chunk = [5, 10, 5] if partials else [5, 100, 5]
        await client.config("2pass", wav_name=f"stream-{index}", chunk_size=chunk)
        started = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), step)):
            await client.ws.send(pcm[offset : offset + step])
            while len(voiced_sent) < len(ends) and offset + step >= ends[len(voiced_sent)]:
                voiced_sent.append(time.monotonic())
            due = started + (i + 1) * CHUNK_MS / 1000
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        await client.end(is_end=True)
        await client.until_end(timeout=60)
    finally:
        await client.close()
    finals = [
        r.at for r in client.received if r.message["mode"] == "2pass-offline" and r.message["text"]
    ]
    return [at - sent for at, sent in zip(finals, voiced_sent, strict=False)]


def scrape(url: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith("speechfront_gateway_funasr_partial"):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def histogram_quantile(buckets: dict[str, float], q: float) -> float | None:
    """Linear interpolation within the cumulative bucket holding quantile ``q``."""
    pairs: list[tuple[float, float]] = []
    for key, count in buckets.items():
        found = re.search(r'le="([^"]+)"', key)
        if found is not None:
            le = found.group(1)
            pairs.append((float("inf") if le == "+Inf" else float(le), count))
    pairs.sort()
    if not pairs or pairs[-1][1] == 0:
        return None
    target = q * pairs[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for upper, count in pairs:
        if count >= target:
            if upper == float("inf"):
                return lower_le
            share = (target - lower_count) / max(count - lower_count, 1e-9)
            return lower_le + share * (upper - lower_le)
        lower_le, lower_count = upper, count
    return None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q * 100)) if values else None


async def one_round(
    cluster: LocalCluster, streams: int, sentences: int, partials: bool
) -> dict[str, Any]:
    """N streams at once; their final latencies and the partial counters' change."""
    metrics_url = f"{cluster.gateway_url}/metrics"
    before = scrape(metrics_url)
    latencies = await asyncio.gather(
        *(one_stream(cluster.funasr_url, i, sentences, partials) for i in range(streams))
    )
    after = scrape(metrics_url)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    buckets = {k: v for k, v in delta.items() if "_partial_seconds_bucket" in k}
    outcomes = {
        m.group(1): v
        for k, v in delta.items()
        if (m := re.search(r'partials_total\{outcome="([^"]+)"\}', k)) is not None
    }
    return {
        "finals": [x for stream in latencies for x in stream],
        "buckets": buckets,
        "outcomes": outcomes,
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [x for r in rounds for x in r["finals"]]
    buckets: dict[str, float] = {}
    outcomes: dict[str, float] = {}
    for r in rounds:
        for k, v in r["buckets"].items():
            buckets[k] = buckets.get(k, 0.0) + v
        for k, v in r["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0.0) + v
    return {
        "finals": len(finals),
        "final_p50_s": percentile(finals, 0.5),
        "final_p95_s": percentile(finals, 0.95),
        "final_p50_per_round_s": [percentile(r["finals"], 0.5) for r in rounds],
        "partial_p50_s": histogram_quantile(buckets, 0.5),
        "partial_p95_s": histogram_quantile(buckets, 0.95),
        "partial_outcomes": outcomes,
    }


async def main_async(args: argparse.Namespace) -> None:
    # Synthesise every clip before the clock starts.
    for i in range(args.streams):
        script(i, args.sentences)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    env = {"SF_GATEWAY_COMPAT_OPEN": "true", "SF_GATEWAY_MAX_SESSIONS_PER_TOKEN": "1000"}
    with (
        tempfile.TemporaryDirectory(prefix="compat-bench-") as tmp,
        LocalCluster(Path(tmp), extra_env=env) as cluster,
    ):
        await one_stream(cluster.funasr_url, 0, 1, True)  # warm the models
        for _ in range(args.rounds):
            for partials in (False, True):
                result = await one_round(cluster, args.streams, args.sentences, partials)
                runs[partials].append(result)
    without, with_partials = summary(runs[False]), summary(runs[True])
    report = {
        "streams": args.streams,
        "sentences_per_stream": args.sentences,
        "rounds": args.rounds,
        "without_partials": without,
        "with_partials": with_partials,
    }
    if without["final_p50_s"] and with_partials["final_p50_s"]:
        report["final_p50_ratio"] = with_partials["final_p50_s"] / without["final_p50_s"]
        report["final_p95_ratio"] = with_partials["final_p95_s"] / without["final_p95_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--sentences", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="alternating runs of each side")
    parser.add_argument("--out", default="bench-results/compat_bench.json")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
