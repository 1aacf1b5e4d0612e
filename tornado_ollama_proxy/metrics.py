"""Prometheus metrics, correct with several worker processes.

Each application has its own registry. When ``PROMETHEUS_MULTIPROC_DIR`` is
set (prometheus_client's multiprocess mode, needed once several processes
serve one port) values go to files in that folder and a scrape merges them.
"""

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "ollama_proxy"
# Token streams and pulls run for minutes: the buckets reach 30 minutes.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TTFB_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by route, method sent upstream and status.",
            ["route", "method_out", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Requests being handled.", registry=r, multiprocess_mode="livesum"
        )
        self.streams = Gauge(
            f"{PREFIX}_streams_in_flight", "Upstream answers being relayed.", registry=r, multiprocess_mode="livesum"
        )
        self.ttfb = Histogram(
            f"{PREFIX}_time_to_first_byte_seconds",
            "Time from request to the upstream's first answer byte.",
            ["route"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request to its end.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            f"{PREFIX}_body_bytes",
            "Body bytes relayed, in (from clients) and out (to clients).",
            ["direction"],
            registry=r,
        )
        self.corrections = Counter(
            f"{PREFIX}_method_corrections",
            "Requests sent upstream with another method than they arrived with.",
            ["route", "method_in", "method_out"],
            registry=r,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream failures by kind.",
            ["kind"],
            registry=r,
        )
        self.rate_limited = Counter(
            f"{PREFIX}_rate_limited",
            "Requests refused by the limiter, by route and reason.",
            ["route", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures",
            "Requests refused for their key, by reason (missing, invalid, scope, throttled).",
            ["reason"],
            registry=r,
        )
        self.client_disconnects = Counter(
            f"{PREFIX}_client_disconnects",
            "Clients that left while their answer was being relayed.",
            registry=r,
        )

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape returns, and its content type."""
        registry = self.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
