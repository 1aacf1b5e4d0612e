"""Rate and concurrency limits per client, with counters in memory or Redis.

The algorithms and storages are the ``limits`` package's. A request is
admitted or refused before anything is sent upstream; an admitted one holds
a concurrency slot until it ends, whichever way it ends.
"""

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

from .errors import Rejection
from .limit_headers import openai_headers
from .settings import Settings
from .storage import SharedStorage, StorageDown

STRATEGIES: dict[str, type[MovingWindowRateLimiter | FixedWindowRateLimiter | SlidingWindowCounterRateLimiter]] = {
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}


@dataclass
class Admission:
    """An admitted request: the rate-limit headers for its answer, and its slot to give back."""

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
        self.fail_closed = settings.rate_limit_fail == "closed"
        self.shared = SharedStorage(
            settings.rate_limit_storage,
            settings.rate_limit_storage_timeout,
            "requests refused (503)" if self.fail_closed else "limits not enforced",
        )
        self.strategy = STRATEGIES[settings.rate_limit_strategy](self.shared.storage)
        self.per_client = settings.concurrency_per_client
        self.total = settings.concurrency_total
        self.in_flight: Counter[str] = Counter()

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
        try:
            outcome = await self.shared.call(lambda: self._hit(items, client, route))
        except StorageDown as down:
            if self.fail_closed:
                raise RateLimited(503, down.reason, {"Retry-After": "1"}, "storage") from None
            return {}
        if isinstance(outcome, RateLimited):
            raise outcome
        return outcome

    async def _hit(self, items: list[RateLimitItem], client: str, route: str) -> dict[str, str] | RateLimited:
        """Charge every limit in turn with the storage's atomic hit, so that N
        requests at once against a window with k left admit exactly k: the
        headers for the answer, or the refusal.

        A refusal by a later limit leaves the earlier ones charged (the
        storages cannot take a hit back): a refused request still counts
        against the limits listed before the one that refused it.
        """
        windows = []
        for item in items:
            admitted = await self.strategy.hit(item, route, client)
            stats = await self.strategy.get_window_stats(item, route, client)
            left = stats.reset_time - time.time()  # seconds until the window resets
            reset = math.ceil(left)
            if not admitted:
                retry = max(1, reset)
                return RateLimited(
                    429,
                    f"rate limit exceeded: {item} for {route}; retry in {retry} s",
                    {"Retry-After": str(retry), **_headers(item, 0, retry, left)},
                    "rate",
                )
            windows.append((item, stats.remaining, reset, left))
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


def _headers(item: RateLimitItem, remaining: int, reset: int, left: float) -> dict[str, str]:
    """A window's RateLimit-* headers (`reset`: whole seconds) and OpenAI's requests trio
    (`left`: the same wait, to the millisecond below a second)."""
    return {
        "RateLimit-Limit": str(item.amount),
        "RateLimit-Remaining": str(max(0, remaining)),
        "RateLimit-Reset": str(max(0, reset)),
        **openai_headers("requests", item.amount, remaining, left),
    }
