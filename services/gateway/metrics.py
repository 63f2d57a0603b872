"""Gateway metrics (names are an interface: dashboards and autoscalers use them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

SESSIONS = Gauge("speechfront_gateway_sessions", "Device sessions connected to this gateway.")
CONNECTIONS = Counter(
    "speechfront_gateway_connections_total",
    "WebSocket connection attempts, by outcome.",
    ["outcome"],
)
CLOSES = Counter(
    "speechfront_gateway_closes_total",
    "Connections the gateway closed because of the device's input or load, by reason.",
    ["reason"],
)
FRAMES = Counter("speechfront_gateway_frames_total", "Opus audio frames received from devices.")
UTTERANCES = Counter(
    "speechfront_gateway_utterances_total",
    "Utterances cut from device audio, by outcome.",
    ["outcome"],
)
PROCESSING_SECONDS = Histogram(
    "speechfront_gateway_processing_seconds",
    "From the end-of-speech decision (or listen stop) to the stt message leaving the gateway.",
    buckets=LATENCY_BUCKETS,
)
COMPUTE_SECONDS = Histogram(
    "speechfront_gateway_compute_seconds",
    "Round trip of one compute call from the gateway, by service.",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
SPEAKER_MATCHES = Counter(
    "speechfront_gateway_speaker_matches_total",
    "Utterances checked against enrolled voiceprints, by outcome.",
    ["outcome"],
)
VAD_REPLAYS = Counter(
    "speechfront_gateway_vad_replays_total",
    "Sessions re-pinned to another VAD replica, with their unfinished audio replayed.",
)
VAD_SHED = Counter(
    "speechfront_gateway_vad_shed_total",
    "VAD streams given up because their replica's backlog was full; re-opened with replay.",
)
