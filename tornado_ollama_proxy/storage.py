"""The storage behind the counters proxies share: rate limits, failed key attempts, token quotas.

The ``limits`` package's storages, in memory or in Redis, reached through one
path that every counter takes (`SharedStorage.call`): each call is bounded by
a timeout, so a stalled Redis stalls nobody for long; until one call has
succeeded, calls go one at a time (coredis drops the connection a burst shares
when a script is not loaded yet and sends the commands again, which counted
hits twice); and an outage is logged when it begins, once a period while it
lasts, and when it ends, never once per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from limits.storage import storage_from_string

log = logging.getLogger(__name__)

OUTAGE_LOG_PERIOD = 60.0  # seconds between reminders that the storage is still down
T = TypeVar("T")


class StorageDown(Exception):
    """A call to the storage failed or took too long; `reason` says how."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StorageCalls:
    """Calls to a storage, each through `call`. `effect` says what an outage means to
    its user, for the outage log ("limits not enforced")."""

    def __init__(self, timeout: float, effect: str):
        self.timeout = timeout
        self.outage = OutageLog(effect)
        self.warming = asyncio.Lock()
        self.warm = False

    async def call(self, work: Callable[[], Awaitable[T]]) -> T:
        """The result of `work()`, a coroutine of calls to the storage; `StorageDown`
        when it raises or outlasts the timeout, time spent waiting for one's turn while
        cold included (so that a storage that hangs from the start delays each request
        by the timeout, not by the timeouts of every request before it)."""
        try:
            result = await asyncio.wait_for(work() if self.warm else self._in_turn(work), self.timeout)
        except Exception as error:
            reason = f"rate limit storage unavailable: {type(error).__name__}: {error}"
            self.outage.failed(reason)
            raise StorageDown(reason) from None
        self.outage.over()
        self.warm = True
        return result

    async def _in_turn(self, work: Callable[[], Awaitable[T]]) -> T:
        async with self.warming:
            return await work()


class SharedStorage(StorageCalls):
    """A ``limits`` storage, called through `call`."""

    def __init__(self, url: str, timeout: float, effect: str):
        super().__init__(timeout, effect)
        self.storage = storage_from_string("async+" + url, wrap_exceptions=True)


class OutageLog:
    """Logs a storage outage when it begins, once a period while it lasts, and when it is over."""

    def __init__(self, effect: str, period: float = OUTAGE_LOG_PERIOD):
        self.effect = effect
        self.period = period
        self.began: float | None = None
        self.logged = 0.0
        self.failures = 0

    def failed(self, reason: str) -> None:
        now = time.monotonic()
        self.failures += 1
        if self.began is None:
            self.began = self.logged = now
            log.warning(f"rate limit storage unavailable: {self.effect}", extra={"reason": reason})
        elif now - self.logged >= self.period:
            self.logged = now
            log.warning(
                f"rate limit storage still unavailable: {self.effect}",
                extra={"reason": reason, "failures": self.failures, "outage_s": round(now - self.began, 1)},
            )

    def over(self) -> None:
        if self.began is not None:
            log.warning(
                "rate limit storage available again",
                extra={"failures": self.failures, "outage_s": round(time.monotonic() - self.began, 1)},
            )
            self.began, self.failures = None, 0
