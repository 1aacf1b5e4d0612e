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

CLIENT, UPSTREAM = "client", "upstream"  # who was silent, when the watch expires


class Watchdog:
    """Ends an exchange in which nothing has moved for `timeout` seconds.

    Movement is a body byte from the client, the upstream taking body bytes,
    an answer byte from the upstream, or the client taking a relayed piece.
    While the client is slow to take the answer (`paused`) the clock stops: a
    slow reader is not a dead upstream. On expiry, `expire` learns who was
    silent: the client, while its body was expected and the upstream was not
    holding it back (`client_turn`), else the upstream.
    """

    def __init__(self, timeout: float, expire: Callable[[str], None]):
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.expire = expire
        self.last = self.loop.time()
        self.client_turn = False
        self.paused = False
        self._timer = self.loop.call_later(timeout, self._check)

    def touch(self) -> None:
        self.last = self.loop.time()

    def stop(self) -> None:
        self._timer.cancel()

    def _check(self) -> None:
        quiet = self.loop.time() - self.last
        if self.paused or quiet < self.timeout:
            # Movement since the timer was set, or a slow client: look again later.
            self._timer = self.loop.call_later(self.timeout if self.paused else self.timeout - quiet, self._check)
            return
        # Still watching (until stopped): after the upstream's silence, the client's may follow.
        self.last = self.loop.time()
        self._timer = self.loop.call_later(self.timeout, self._check)
        self.expire(CLIENT if self.client_turn else UPSTREAM)


class AccessRecord:
    """One request's access record, filled in by the parts that handle it.

    Written once when the request ends (see `account`); bodies never, request
    headers only those `log_headers` names.
    """

    def __init__(self, request_id: str, client: str, method_in: str, path: str):
        self.request_id = request_id
        self.client = client
        self.key: str | None = None  # the access key's name, when keys are required
        self.method_in = method_in
        self.method_out: str | None = None  # set when the request goes upstream
        self.path = path
        self.route = path  # the route table's entry, "unmapped" outside it
        self.upstream_status: int | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.ttfb_ms: float | None = None
        self.duration_ms = 0.0
        self.chunks = 0
        self.outcome: str | None = None

    def fields(self) -> dict[str, Any]:
        return vars(self)


def account(proxy: Proxy, record: AccessRecord, headers: dict[str, str] | None) -> None:
    """Metrics and the access log line for a request that has ended."""
    metrics = proxy.metrics
    metrics.requests.labels(record.route, record.method_out or "none", record.status).inc()
    metrics.duration.labels(record.route).observe(record.duration_ms / 1000)
    if record.ttfb_ms is not None:
        metrics.ttfb.labels(record.route).observe(record.ttfb_ms / 1000)
    if record.bytes_in:
        metrics.bytes.labels("in").inc(record.bytes_in)
    if record.bytes_out:
        metrics.bytes.labels("out").inc(record.bytes_out)
    if sampled(record.path, proxy.settings.access_log_sampling):
        fields = record.fields()
        if headers is not None:
            fields = {**fields, "headers": headers}
        access_log.info("request", extra=fields)
