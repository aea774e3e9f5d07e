"""Prometheus metrics of one `madlens serve` app, in its own registry (never the global
one, so that two apps in one process count apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's counters and histograms.

    `madlens_requests_total{endpoint, status}`, `madlens_request_seconds{endpoint}` (until
    the last byte, streams included), `madlens_flagged_total{endpoint}` and
    `madlens_blocked_total`, `madlens_prefill_batch_size` (requests per prefill forward
    pass), `madlens_completion_tokens_total`, `madlens_queue_depth`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "madlens_requests", "HTTP requests by endpoint and status code",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "madlens_request_seconds", "Time from request to last response byte",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.flagged = Counter(
            "madlens_flagged", "Requests the monitor flagged", ["endpoint"], registry=r
        )
        self.blocked = Counter(
            "madlens_blocked", "Chat completions refused by the block policy", registry=r
        )
        self.batch_size = Histogram(
            "madlens_prefill_batch_size", "Requests per prefill forward pass",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "madlens_completion_tokens", "Tokens generated", registry=r
        )
        self.queue_depth = Gauge(
            "madlens_queue_depth", "Requests waiting for the engine", registry=r
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
