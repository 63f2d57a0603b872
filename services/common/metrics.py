"""Prometheus metrics shared by the services.

Metric names are an interface (dashboards and autoscalers query them), so they
are defined once here. Labels stay low-cardinality: a service name, an outcome
or a reason, never a device or session id.
"""

from __future__ import annotations

import sys

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
AUDIO_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)

REQUESTS = Counter(
    "speechfront_requests_total",
    "Compute requests handled, by service and outcome (ok, rejected, expired, error).",
    ["service", "outcome"],
)
QUEUE_DEPTH = Gauge(
    "speechfront_queue_depth",
    "Requests waiting for the model, by service.",
    ["service"],
)
BATCH_SIZE = Histogram(
    "speechfront_batch_size",
    "Requests (or streams, for vad) served by one model call.",
    ["service"],
    buckets=BATCH_SIZE_BUCKETS,
)
BATCH_AUDIO_SECONDS = Histogram(
    "speechfront_batch_audio_seconds",
    "Seconds of audio in one model call.",
    ["service"],
    buckets=AUDIO_SECONDS_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "speechfront_queue_wait_seconds",
    "Time a request waited before its model call started.",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
MODEL_SECONDS = Histogram(
    "speechfront_model_seconds",
    "Wall time of one model call.",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
ASR_REDECODES = Counter(
    "speechfront_asr_redecodes_total",
    "Utterance pieces Whisper decoded a second time, with a longer window, after a loop.",
)
AUDIO_SECONDS = Counter(
    "speechfront_audio_seconds_total",
    "Seconds of audio processed, by service.",
    ["service"],
)


GPU_MEMORY_BYTES = Gauge(
    "speechfront_gpu_memory_bytes",
    "GPU memory held by this service's model (allocated, and the peak since start).",
    ["service", "kind"],
)


def record_gpu_memory(service: str) -> None:
    """Update the GPU memory gauges when this process has put a model on a GPU."""
    torch = sys.modules.get("torch")  # never import torch just to find out
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    GPU_MEMORY_BYTES.labels(service, "allocated").set(torch.cuda.memory_allocated())
    GPU_MEMORY_BYTES.labels(service, "peak").set(torch.cuda.max_memory_allocated())


def serve_metrics(port: int, host: str) -> None:
    """Expose the default registry on its own HTTP port (gRPC services), on the
    address the service itself binds: a service kept on loopback keeps its
    metrics there too. An IPv6 address may come in gRPC's brackets."""
    start_http_server(port, addr=host.strip("[]"))
