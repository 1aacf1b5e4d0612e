"""What every handler shares: the settings and the parts built from them, and the
requests in flight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from . import access_line
from .balancer import default_chooser
from .fair_queue import FairQueue
from .health import HealthCheck
from .logs import ACCESS_LOGGER, CREDENTIALS, sampled
from .metrics import Metrics
from .pool import Chooser, Pool
from .quota import Quotas
from .record import AccessRecord, failed
from .routes import RouteTable
from .settings import Settings
from .status import StatusBoard
from .token_windows import windows_of
from .usage import ModelLabels

log = logging.getLogger(__name__)
# Headers a proxy in front adds: Cloudflare's, the de facto one, and RFC 7239's.
FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "CF-Connecting-IP")


class InFlight:
    """Counts requests being handled, so a shutdown can wait for them to end."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: list[asyncio.Future[None]] = []

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            for waiter in self._idle:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle.clear()

    async def wait_idle(self) -> None:
        if self.count:
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter


access_log = logging.getLogger(ACCESS_LOGGER)


class Proxy:
    """Everything a handler needs: settings, routes, limiter, authenticator, the pool of
    upstreams, health, metrics, the status board, what is in flight."""

    def __init__(
        self,
        settings: Settings,
        routes: RouteTable,
        limiter: Any = None,
        authenticator: Any = None,
        chooser: Chooser | None = None,
    ):
        self.settings = settings
        self.routes = routes
        self.limiter = limiter
        self.authenticator = authenticator
        # Request headers never logged: credentials, the client key, what the authenticator consumes.
        self.secret_headers = CREDENTIALS | {
            name.lower()
            for name in (
                *((settings.client_key_header,) if settings.client_key_header else ()),
                *getattr(authenticator, "removed_headers", ()),
            )
        }
        self.trusted_networks = settings.trusted_networks
        self.exempt_networks = settings.exempt_networks
        self.idle_timeout = settings.idle_timeout
        self.metrics = Metrics()
        self.pool = Pool(settings, chooser or default_chooser(), self.metrics)
        self.key_entries = {key.name: key for key in getattr(authenticator, "keys", ())}
        # Generations wait in the proxy only for pods whose slots are known, or for their
        # key's other generations to end.
        queued = any(pod.slots is not None for pod in self.pool.pods) or any(
            key.max_concurrent is not None for key in self.key_entries.values()
        )
        self.queue = FairQueue(self.pool, settings, self.metrics) if queued else None
        quota_keys = any(windows_of(key) for key in self.key_entries.values())
        self.quotas = Quotas(settings) if quota_keys else None
        self.health = HealthCheck(self.pool, settings.health_cache_seconds)
        self.models = ModelLabels(settings.metrics_max_models)
        self.board = StatusBoard(settings.worker_count)
        self.in_flight = InFlight()
        self.exchanges: set[Any] = set()  # the forwarded requests under way, for the status page
        self.draining = False  # set when a shutdown begins: new requests are turned away
        self.forwarding_noticed = False

    def start(self) -> None:
        """What runs beside the requests, once the loop does: the pool's watch and shared
        load, the queue's slot leases."""
        self.pool.start()
        if self.queue is not None:
            self.queue.start()

    async def close(self) -> None:
        self.pool.close()
        if self.queue is not None:
            await self.queue.close()

    def notice_forwarding(self, headers: Mapping[str, str]) -> None:
        """An open proxy reached through another proxy (a tunnel such as cloudflared or
        ngrok, a web server on this host) is open to whoever reaches that one: say so, once."""
        if self.forwarding_noticed:
            return
        found = next((name for name in FORWARDING_HEADERS if name in headers), None)
        if found is not None:
            self.forwarding_noticed = True
            log.warning(
                "no access keys, and requests arrive through another proxy: whoever reaches that one can use this one",
                extra={"header": found, "fix": "set api_keys (see README), or keep the other proxy private"},
            )

    def account(self, record: AccessRecord, headers: dict[str, str] | None, forwarded: bool, generation: bool) -> None:
        """Metrics, the status board, and the access log line for a request that has ended.
        Only `forwarded` requests (not the proxy's own endpoints) are on the board; a
        `generation` (a route that reports tokens) counts under its model's label."""
        metrics = self.metrics
        metrics.count_request(record)
        if record.upstream in self.pool.by_name:  # one pod's name: a request that went to several counts there
            metrics.child(metrics.upstream_requests, record.upstream, record.outcome).inc()
        label = None
        if generation:
            answered = record.upstream_status is not None and 200 <= record.upstream_status < 300
            label = self.models.label(record.model, answered)
            metrics.count_generation(
                record, label, "error" if record.outcome == "ok" and failed(record) else record.outcome
            )
        if forwarded:
            self.board.add(record, label)
        if sampled(record.path, self.settings.access_log_sampling):
            fields = record.fields()
            if headers is not None:
                fields = {**fields, "headers": headers}
            if not access_line.write(fields):
                access_log.info("request", extra=fields)
