"""Prometheus metrics, correct with several worker processes.

Each application has its own registry. When ``PROMETHEUS_MULTIPROC_DIR`` is
set (prometheus_client's multiprocess mode, needed once several processes
serve one port) values go to files in that folder and a scrape merges them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from .record import AccessRecord

PREFIX = "ollama_proxy"
# Token streams and pulls run for minutes: the buckets reach 30 minutes.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TTFB_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Generation speed, from a CPU's few tokens/s to a large GPU's hundreds.
SPEED_BUCKETS = (1, 2.5, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)


class Metrics:
    def __init__(self) -> None:
        # (route, method_out, status) -> that request's children of requests, duration and
        # ttfb; bounded as the labels are (routes, methods, statuses)
        self._children: dict[tuple[str, str | None, int], tuple[Any, Any, Any]] = {}
        self._child: dict[tuple[Any, tuple[Any, ...]], Any] = {}  # see `child`
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
        self.bytes_in, self.bytes_out = self.bytes.labels("in"), self.bytes.labels("out")
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
        self.tokens = Counter(
            f"{PREFIX}_tokens",
            "Tokens Ollama reported, by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=r,
        )
        self.key_tokens = Counter(
            f"{PREFIX}_key_tokens",
            "Tokens Ollama reported, by access key name (from the settings: bounded) and kind.",
            ["key", "kind"],
            registry=r,
        )
        self.generations = Counter(
            f"{PREFIX}_generations",
            "Requests to routes that report tokens, by model, route and outcome.",
            ["model", "route", "outcome"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request to the first body byte of a streamed generation.",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            f"{PREFIX}_tokens_per_second",
            "Generation speed per request (eval_count / eval_duration).",
            ["model"],
            buckets=SPEED_BUCKETS,
            registry=r,
        )
        self.model_load = Histogram(
            f"{PREFIX}_model_load_seconds",
            "Model load time Ollama reported (load_duration).",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        # Per pod of the pool; label values are the pods' configured names only.
        self.upstream_requests = Counter(
            f"{PREFIX}_upstream_requests",
            "Forwarded requests by the pod that answered last, and outcome.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.upstream_in_flight = Gauge(
            f"{PREFIX}_upstream_in_flight",
            "Requests this process has in flight at each pod.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_healthy = Gauge(
            f"{PREFIX}_upstream_healthy",
            "1 while a pod takes requests, 0 while it is ejected.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.upstream_ejections = Counter(
            f"{PREFIX}_upstream_ejections",
            "Times a pod was taken out of the pool after failures.",
            ["upstream"],
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_retries",
            "Requests sent again, by the pod they left and why (not_received, closed, busy, not_found).",
            ["upstream", "cause"],
            registry=r,
        )
        self.digest_conflicts = Gauge(
            f"{PREFIX}_digest_conflicts",
            "Model names two pods list with different digests.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.client_disconnects = Counter(
            f"{PREFIX}_client_disconnects",
            "Clients that left while their answer was being relayed.",
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Generations waiting for a free slot.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time generations waited for a free slot before they went (0 for those that did not wait).",
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.queue_refused = Counter(
            f"{PREFIX}_queue_refused",
            "Generations refused a place in line or dropped from it, by reason (full, full_per_key, timeout).",
            ["reason"],
            registry=r,
        )

    def child(self, metric: Any, *labels: Any) -> Any:
        """`metric.labels(*labels)`, looked up once per label set (`labels` takes a lock
        and checks its arguments every time): for what changes with every request."""
        key = (metric, labels)
        found = self._child.get(key)
        if found is None:
            found = self._child[key] = metric.labels(*labels)
        return found

    def count_request(self, record: AccessRecord) -> None:
        """Any request that ended. Runs for every request: each label set's children are
        looked up once (`labels` takes a lock and checks its arguments every time)."""
        route = record.route
        children = self._children.get((route, record.method_out, record.status))
        if children is None:
            children = self._children[route, record.method_out, record.status] = (
                self.requests.labels(route, record.method_out or "none", record.status),
                self.duration.labels(route),
                self.ttfb.labels(route),
            )
        requests, duration, ttfb = children
        requests.inc()
        duration.observe(record.duration_ms / 1000)
        if record.ttfb_ms is not None:
            ttfb.observe(record.ttfb_ms / 1000)
        if record.bytes_in:
            self.bytes_in.inc(record.bytes_in)
        if record.bytes_out:
            self.bytes_out.inc(record.bytes_out)

    def count_generation(self, record: AccessRecord, model: str, outcome: str | None) -> None:
        """A generation or embedding that ended, under its (bounded) model label."""
        self.generations.labels(model, record.route, outcome).inc()
        for kind, tokens in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens)):
            if tokens:
                self.tokens.labels(model, kind).inc(tokens)
                if record.key is not None:
                    self.key_tokens.labels(record.key, kind).inc(tokens)
        if record.ttft_ms is not None:
            self.time_to_first_token.labels(model).observe(record.ttft_ms / 1000)
        if record.tokens_per_s is not None:
            self.tokens_per_second.labels(model).observe(record.tokens_per_s)
        if record.load_ms is not None:
            self.model_load.labels(model).observe(record.load_ms / 1000)

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape returns, and its content type."""
        registry = self.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
