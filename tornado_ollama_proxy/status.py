"""What the pod is doing, for the status page: figures kept in memory since start.

Everything here is updated once per request, when it ends (`StatusBoard.add`),
and summed up only when the page asks (`StatusBoard.snapshot`). Model names
come from clients: the board is keyed by the metrics' bounded model labels
(`usage.ModelLabels`); samples for the medians and the chart are bounded too.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from .record import AccessRecord, failed

SAMPLES = 500  # per model, for its medians
CHART_SECONDS = 600  # the tokens/s chart covers the last 10 minutes
BUCKET_SECONDS = 10


@dataclass
class ModelStats:
    """One model label's figures since start; the medians are over its last SAMPLES requests."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    speeds: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    ttfts: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))

    def add(self, record: AccessRecord) -> None:
        self.requests += 1
        self.errors += failed(record)
        self.prompt_tokens += record.prompt_tokens or 0
        self.completion_tokens += record.completion_tokens or 0
        if record.tokens_per_s is not None:
            self.speeds.append(record.tokens_per_s)
        if record.ttft_ms is not None:
            self.ttfts.append(record.ttft_ms / 1000)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "median_tokens_per_s": round(statistics.median(self.speeds), 2) if self.speeds else None,
            "median_ttft_s": round(statistics.median(self.ttfts), 3) if self.ttfts else None,
        }


class StatusBoard:
    """Totals since start, per-model figures, and completion tokens per 10 s for the chart."""

    def __init__(self, workers: int):
        self.workers = workers
        self.started = time.time()
        self.totals: Counter[str] = Counter()
        self.corrections: Counter[str] = Counter()
        self.models: dict[str, ModelStats] = {}
        self.buckets: deque[list[int]] = deque()  # [start (s), completion tokens], oldest first

    def add(self, record: AccessRecord, label: str | None) -> None:
        """A request has ended; `label` is its model's label when it was a generation."""
        totals = self.totals
        totals["requests"] += 1
        totals["errors"] += failed(record)
        if record.outcome in ("rate_limited", "client_gone", "unauthorized", "forbidden"):
            totals[record.outcome] += 1
        if record.method_out is not None and record.method_out != record.method_in:
            self.corrections[f"{record.method_in} → {record.method_out}"] += 1
        if label is None:
            return
        stats = self.models.get(label)
        if stats is None:
            stats = self.models[label] = ModelStats()
        stats.add(record)
        if record.completion_tokens:
            self._count_tokens(record.completion_tokens)

    def _count_tokens(self, tokens: int) -> None:
        now = int(time.time())
        start = now - now % BUCKET_SECONDS
        buckets = self.buckets
        if buckets and buckets[-1][0] == start:
            buckets[-1][1] += tokens
        else:
            buckets.append([start, tokens])
        while buckets[0][0] <= now - CHART_SECONDS:
            buckets.popleft()

    def chart(self) -> list[dict[str, float]]:
        """Tokens per second in each 10 s of the last 10 minutes, oldest first (zeros included)."""
        now = time.time()
        latest = int(now) - int(now) % BUCKET_SECONDS
        counts = {start: tokens for start, tokens in self.buckets}
        return [
            {"seconds_ago": round(now - start, 1), "tokens_per_s": round(counts.get(start, 0) / BUCKET_SECONDS, 2)}
            for start in range(latest - CHART_SECONDS + BUCKET_SECONDS, latest + 1, BUCKET_SECONDS)
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "totals": {
                name: self.totals[name]
                for name in ("requests", "errors", "rate_limited", "client_gone", "unauthorized", "forbidden")
            },
            "corrections": dict(self.corrections),
            "models": {name: stats.summary() for name, stats in sorted(self.models.items())},
            "tokens_per_s": self.chart(),
            "worker": {"pid": os.getpid(), "workers": self.workers},
        }
