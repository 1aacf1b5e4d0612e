"""Rate and concurrency limits per client, with counters in memory or Redis.

The algorithms and storages are the ``limits`` package's. A request is
admitted or refused before anything is sent upstream; an admitted one holds
a concurrency slot until it ends, whichever way it ends.
"""

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from limits import RateLimitItem, parse_many
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.storage import storage_from_string

from .errors import Rejection
from .settings import Settings

log = logging.getLogger(__name__)

STRATEGIES: dict[str, type[MovingWindowRateLimiter | FixedWindowRateLimiter | SlidingWindowCounterRateLimiter]] = {
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}
OUTAGE_LOG_PERIOD = 60.0  # seconds between reminders that the storage is still down


@dataclass
class Admission:
    """An admitted request: the RateLimit-* headers for its answer, and its slot to give back."""

    headers: dict[str, str] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None


class RateLimited(Rejection):
    """A refusal by the limiter; `reason` labels the metric."""

    def __init__(self, status: int, message: str, headers: dict[str, str], reason: str):
        super().__init__(status, message, headers)
        self.reason = reason


class LimitsRateLimiter:
    """Moving/fixed/sliding windows from ``limits``, plus in-process concurrency caps."""

    def __init__(self, settings: Settings):
        self.default = parse_many(settings.rate_limit) if settings.rate_limit else []
        self.per_route = {route: parse_many(text) for route, text in settings.rate_limit_routes.items()}
        scheme = settings.rate_limit_storage
        self.storage = storage_from_string("async+" + scheme, wrap_exceptions=True)
        self.strategy = STRATEGIES[settings.rate_limit_strategy](self.storage)
        self.timeout = settings.rate_limit_storage_timeout
        self.fail_closed = settings.rate_limit_fail == "closed"
        self.per_client = settings.concurrency_per_client
        self.total = settings.concurrency_total
        self.in_flight: Counter[str] = Counter()
        self.outage = OutageLog()
        # Until a call to the storage has succeeded, calls go one at a time: the first
        # loads the storage's scripts into Redis. coredis drops a connection that
        # concurrent commands share when one of them fails (a script not loaded yet)
        # and sends the others again, which counted hits twice: 8 of a limit of 10.
        self.warming = asyncio.Lock()
        self.warm = False

    async def admit(self, client: str, route: str) -> Admission:
        """Admit the request or raise `RateLimited`; nothing has been forwarded yet."""
        items = self.per_route.get(route, self.default)
        release = self._take_slot(client)
        try:
            headers = await self._check_rates(items, client, route) if items else {}
        except RateLimited:
            release()
            raise
        return Admission(headers, release)

    async def _check_rates(self, items: list[RateLimitItem], client: str, route: str) -> dict[str, str]:
        if self.warm:
            return await self._check_rates_now(items, client, route)
        async with self.warming:
            return await self._check_rates_now(items, client, route)

    async def _check_rates_now(self, items: list[RateLimitItem], client: str, route: str) -> dict[str, str]:
        try:
            headers = await asyncio.wait_for(self._hit(items, client, route), self.timeout)
        except RateLimited:
            self.outage.over()
            self.warm = True
            raise
        except Exception as error:
            reason = f"rate limit storage unavailable: {type(error).__name__}: {error}"
            self.outage.failed(reason, enforced=self.fail_closed)
            if self.fail_closed:
                raise RateLimited(503, reason, {"Retry-After": "1"}, "storage") from None
            return {}
        self.outage.over()
        self.warm = True
        return headers

    async def _hit(self, items: list[RateLimitItem], client: str, route: str) -> dict[str, str]:
        """Charge every limit in turn with the storage's atomic hit, so that N
        requests at once against a window with k left admit exactly k.

        A refusal by a later limit leaves the earlier ones charged (the
        storages cannot take a hit back): a refused request still counts
        against the limits listed before the one that refused it.
        """
        windows = []
        for item in items:
            admitted = await self.strategy.hit(item, route, client)
            stats = await self.strategy.get_window_stats(item, route, client)
            reset = math.ceil(stats.reset_time - time.time())
            if not admitted:
                retry = max(1, reset)
                raise RateLimited(
                    429,
                    f"rate limit exceeded: {item} for {route}; retry in {retry} s",
                    {"Retry-After": str(retry), **_headers(item, 0, retry)},
                    "rate",
                )
            windows.append((item, stats.remaining, reset))
        return _headers(*min(windows, key=lambda window: window[1]))  # the tightest

    def _take_slot(self, client: str) -> Callable[[], None]:
        if self.total is not None and sum(self.in_flight.values()) >= self.total:
            raise RateLimited(
                503,
                f"the proxy is serving its limit of {self.total} requests at once; retry shortly",
                {"Retry-After": "1"},
                "concurrency_total",
            )
        if self.per_client is not None and self.in_flight[client] >= self.per_client:
            raise RateLimited(
                429,
                f"too many requests in flight for this client: at most {self.per_client} at once",
                {"Retry-After": "1"},
                "concurrency_client",
            )
        self.in_flight[client] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight[client] -= 1
                if not self.in_flight[client]:
                    del self.in_flight[client]

        return release


class OutageLog:
    """Logs a storage outage when it begins, once a period while it lasts, and when it is over:
    never once per request."""

    def __init__(self, period: float = OUTAGE_LOG_PERIOD):
        self.period = period
        self.began: float | None = None
        self.logged = 0.0
        self.failures = 0

    def failed(self, reason: str, *, enforced: bool) -> None:
        now = time.monotonic()
        self.failures += 1
        effect = "requests refused (503)" if enforced else "limits not enforced"
        if self.began is None:
            self.began = self.logged = now
            log.warning(f"rate limit storage unavailable: {effect}", extra={"reason": reason})
        elif now - self.logged >= self.period:
            self.logged = now
            log.warning(
                f"rate limit storage still unavailable: {effect}",
                extra={"reason": reason, "failures": self.failures, "outage_s": round(now - self.began, 1)},
            )

    def over(self) -> None:
        if self.began is not None:
            log.warning(
                "rate limit storage available again",
                extra={"failures": self.failures, "outage_s": round(time.monotonic() - self.began, 1)},
            )
            self.began, self.failures = None, 0


def _headers(item: RateLimitItem, remaining: int, reset: int) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(item.amount),
        "RateLimit-Remaining": str(max(0, remaining)),
        "RateLimit-Reset": str(max(0, reset)),
    }
