"""How a request ends: the idle watch that ends an exchange nobody moves, and
the accounting every request gets once, however it ended."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .logs import ACCESS_LOGGER, sampled

if TYPE_CHECKING:
    from .proxy import Proxy

access_log = logging.getLogger(ACCESS_LOGGER)


class Silence:
    """Calls `on_silence` when `progress()` has not changed for `period` seconds,
    and again every `period` while that lasts; the clock stops while `paused`
    (a client slow to read is not a silent exchange).

    `progress` is a counter of what has moved, looked at four times a period:
    nothing is done per byte that moves.
    """

    def __init__(self, period: float, progress: Callable[[], int], on_silence: Callable[[], None]):
        self.loop = asyncio.get_running_loop()
        self.period = period
        self.progress = progress
        self.on_silence = on_silence
        self.paused = False
        self.seen = progress()
        self.quiet_since = self.loop.time()
        self._timer = self.loop.call_later(period / 4, self._look)

    def stop(self) -> None:
        self._timer.cancel()

    def _look(self) -> None:
        now = self.loop.time()
        progress = self.progress()
        self._timer = self.loop.call_later(self.period / 4, self._look)  # before on_silence, which may stop it
        if progress != self.seen or self.paused:
            self.seen, self.quiet_since = progress, now
        elif now - self.quiet_since >= self.period:
            self.quiet_since = now
            self.on_silence()


class AccessRecord:
    """One request's access record, filled in by the parts that handle it.

    Written once when the request ends (see `account`); bodies never, request
    headers only those `log_headers` names.
    """

    def __init__(self, request_id: str, client: str, method_in: str, path: str, route: str):
        self.request_id = request_id
        self.client = client
        self.key: str | None = None  # the access key's name, when keys are required
        self.method_in = method_in
        self.method_out: str | None = None  # set when the request goes upstream
        self.path = path
        self.route = route  # the route table's entry, "unmapped" outside it, fixed names for the proxy's own
        self.model: str | None = None  # what the body asks for, when it says
        self.stream: bool | None = None
        self.upstream_status: int | None = None
        self.status = 0  # as sent; for an error told in-band after a heartbeat's 200, the error's
        self.in_band = False  # an error was told in-band, after the proxy's own head
        self.bytes_in = 0
        self.bytes_out = 0
        self.ttfb_ms: float | None = None
        self.duration_ms = 0.0
        self.chunks = 0
        self.heartbeats = 0
        # What Ollama reported at the end of a generation or embedding:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.tokens_per_s: float | None = None
        self.load_ms: float | None = None
        self.ttft_ms: float | None = None  # to the first body byte of a streamed generation
        self.outcome: str | None = None

    def fields(self) -> dict[str, Any]:
        return vars(self)


def failed(record: AccessRecord) -> bool:
    """Whether a request ended in an error: its status or the upstream's (told in-band
    after a heartbeat), or an upstream that failed or fell silent."""
    return (
        record.status >= 400 or (record.upstream_status or 0) >= 400 or record.outcome in ("upstream_error", "timeout")
    )


def account(
    proxy: Proxy, record: AccessRecord, headers: dict[str, str] | None, forwarded: bool, generation: bool
) -> None:
    """Metrics, the status board, and the access log line for a request that has ended.
    Only `forwarded` requests (not the proxy's own endpoints) are on the board; a
    `generation` (a route that reports tokens) counts under its model's label."""
    metrics = proxy.metrics
    metrics.count_request(record)
    label = None
    if generation:
        answered = record.upstream_status is not None and 200 <= record.upstream_status < 300
        label = proxy.models.label(record.model, answered)
        metrics.count_generation(
            record, label, "error" if record.outcome == "ok" and failed(record) else record.outcome
        )
    if forwarded:
        proxy.board.add(record, label)
    if sampled(record.path, proxy.settings.access_log_sampling):
        fields = record.fields()
        if headers is not None:
            fields = {**fields, "headers": headers}
        access_log.info("request", extra=fields)
