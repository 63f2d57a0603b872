"""Metrics of the compatible APIs (names are an interface, like the gateway's)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

REQUESTS = Counter(
    "speechfront_gateway_compat_requests_total",
    "Requests and connections of the compatible APIs, by API and outcome.",
    ["api", "outcome"],
)
FUNASR_CONNECTIONS = Gauge(
    "speechfront_gateway_funasr_connections", "FunASR WebSocket connections open on this gateway."
)
FUNASR_RESULTS = Counter(
    "speechfront_gateway_funasr_results_total",
    "FunASR results sent, by mode (online, offline, 2pass-online, 2pass-offline).",
    ["mode"],
)
PARTIALS = Counter(
    "speechfront_gateway_funasr_partials_total",
    "Partial re-recognitions, by outcome (sent, unchanged, skipped, dropped, stale).",
    ["outcome"],
)
# Finer than the latency buckets: a partial is due within a stride (600 ms).
PARTIAL_BUCKETS = (
    0.025,
    0.05,
    0.075,
    0.1,
    0.125,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.6,
    0.8,
    1.0,
    1.5,
    2.0,
    3.0,
)
PARTIAL_SECONDS = Histogram(
    "speechfront_gateway_funasr_partial_seconds",
    "From the arrival of a stride's last audio to its partial result leaving the gateway.",
    buckets=PARTIAL_BUCKETS,
)
FINAL_SECONDS = Histogram(
    "speechfront_gateway_funasr_final_seconds",
    "From a segment's end (VAD decision or end of input) to its full text leaving the gateway.",
    buckets=LATENCY_BUCKETS,
)
