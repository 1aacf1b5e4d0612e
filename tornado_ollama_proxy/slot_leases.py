"""`slots` as one limit for every proxy process that shares Redis.

A generation takes a lease on a slot at its pod before it goes: one script, run
atomically in Redis on Redis's clock, drops the pod's lapsed leases and adds
one if fewer than `slots` are left. The lease is given back when the generation
ends, and the release is published, so that a process whose requests wait for
that pod looks again at once. Each process renews its leases every second (the
same script tells it every pod's count, so a missed wake-up costs a second at
most); the leases of a process that died lapse LEASE seconds after its last
renewal. With Redis down, each process counts its own generations, as without
Redis (logged when it begins and ends).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from typing import Any, cast

import coredis

log = logging.getLogger(__name__)

PREFIX = "{ollama-proxy}:slots"  # one hash slot, for a Redis cluster too
CHANNEL = PREFIX + ":freed"
LEASE = 5.0  # seconds a lease outlives its last renewal
EVERY = 1.0  # seconds between renewals; also how long a call to Redis may take

_NOW = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
"""

# KEYS: the pod's leases. ARGV: its slots, the lease, its lifetime. {taken (0 or 1), held after}.
_ACQUIRE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return {1, held + 1}
"""
)

# KEYS: the pod's leases. ARGV: the lease, the channel, the pod's name. Publishes "name held".
_RELEASE = (
    _NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. redis.call('ZCARD', KEYS[1]))
"""
)

# KEYS: every pod's leases. ARGV: the lifetime, then per pod how many leases this process
# holds there and those leases. Renews them (adds them again if they lapsed meanwhile:
# they are still in use), and returns each pod's count.
_RENEW = (
    _NOW
    + """
local lifetime = tonumber(ARGV[1])
local at = 2
local counts = {}
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  for j = 1, n do
    redis.call('ZADD', key, t + lifetime, ARGV[at + j])
  end
  at = at + n + 1
  redis.call('ZREMRANGEBYSCORE', key, '-inf', t)
  if n > 0 then
    redis.call('EXPIRE', key, math.ceil(lifetime))
  end
  counts[i] = redis.call('ZCARD', key)
end
return counts
"""
)


class Leases:
    """This process's leases on its pods' slots, and what it knows of everyone else's.

    `others[pod]` is how many of the pod's slots other processes hold, as Redis last
    said (an acquire's answer, a release's message, a renewal); `on_freed` is called
    when one of them may have come free."""

    def __init__(self, url: str, pods: list[str], on_freed: Callable[[], None]):
        self.redis = coredis.Redis.from_url(url, decode_responses=True)
        self.pods = pods
        self.on_freed = on_freed
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.numbers = itertools.count()
        self.held: dict[str, str] = {}  # this process's leases: lease -> pod
        self.others: Counter[str] = Counter()
        self.news: Counter[str] = Counter()  # per pod, how many times Redis has told its count
        self.failing = False
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)
        self._tasks: set[asyncio.Task[None]] = set()
        self._giving: set[asyncio.Task[None]] = set()  # leases being given back

    @staticmethod
    def key(pod: str) -> str:
        return f"{PREFIX}:{pod}"

    def mine(self, pod: str) -> int:
        return sum(1 for held in self.held.values() if held == pod)

    async def acquire(self, pod: str, slots: int) -> str | None:
        """A lease on one of `pod`'s `slots`, or None when every process's leases fill
        them; "" when Redis cannot say (this process counts its own then)."""
        if self.failing:  # until a renewal finds Redis again
            return ""
        lease = f"{self.process}:{next(self.numbers)}"
        heard = self.news[pod]
        try:
            answer = await self._call(lambda: self._acquire(keys=[self.key(pod)], args=[slots, lease, LEASE]))
        except RedisDown:
            return ""
        taken, held = cast(list[int], answer)
        if not taken:
            # Full until Redis says otherwise (a release, a renewal): not asked again meanwhile.
            # Unless it has, while this was asked: a release heard meanwhile is the newer news.
            if self.news[pod] == heard:
                self.others[pod] = max(held - self.mine(pod), slots)
            return None
        self.held[lease] = pod
        self._told(pod, held)
        return lease

    def release(self, lease: str) -> None:
        """Give `lease` back (in the background: nothing waits for it); "" holds nothing."""
        pod = self.held.pop(lease, None)
        if pod is None:
            return
        giving = self._keep(self._give_back(lease, pod))
        self._giving.add(giving)
        giving.add_done_callback(self._giving.discard)

    async def _give_back(self, lease: str, pod: str) -> None:
        # Not given back (Redis down): it lapses LEASE seconds from now, unrenewed.
        with suppress(RedisDown):
            await self._call(lambda: self._release(keys=[self.key(pod)], args=[lease, CHANNEL, pod]))

    def start(self) -> None:
        """Renew this process's leases every second, and listen for slots freed elsewhere."""
        self._keep(self._renewing())
        self._keep(self._listening())

    async def close(self) -> None:
        """Stop; the leases being given back go first (within EVERY), so that no other
        process waits for them to lapse."""
        if self._giving:
            await asyncio.wait(self._giving, timeout=EVERY)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.redis.connection_pool.disconnect()

    def _keep(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _renewing(self) -> None:
        while True:
            await self.renew()
            await asyncio.sleep(EVERY)

    async def renew(self) -> None:
        arguments: list[coredis.typing.ValueT] = [LEASE]
        for pod in self.pods:
            leases = [lease for lease, held in self.held.items() if held == pod]
            arguments += [len(leases), *leases]
        try:
            answer = await self._call(lambda: self._renew(keys=[self.key(pod) for pod in self.pods], args=arguments))
        except RedisDown:
            return
        for pod, held in zip(self.pods, cast(list[int], answer), strict=True):
            self._told(pod, held)
        self.on_freed()

    async def _listening(self) -> None:
        """Each release anywhere, as it happens. The subscription outlives an outage (the
        client subscribes again as it reconnects); one that could not be made is tried
        again each second. Meanwhile the renewals tell the counts, a second late."""
        while True:
            pubsub = self.redis.pubsub(channels=[CHANNEL], ignore_subscribe_messages=True)
            try:
                while True:
                    message = await pubsub.get_message()  # None: its subscription's own
                    if message is not None:
                        self._heard(str(message["data"]))
            except Exception:  # Redis was not there
                pass
            finally:
                pubsub.close()
            await asyncio.sleep(EVERY)

    def _heard(self, message: str) -> None:
        """A release's message: the pod's name, and how many of its slots are leased now."""
        pod, _, held = message.rpartition(" ")
        if pod in self.pods and held.isdigit():
            self._told(pod, int(held))
            self.on_freed()

    def _told(self, pod: str, held: int) -> None:
        """Redis says `held` of `pod`'s slots are leased: the others' are those not ours."""
        self.others[pod] = max(0, held - self.mine(pod))
        self.news[pod] += 1

    async def _call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """One call to Redis, within EVERY; `RedisDown` when it fails (the outage logged
        once, as is its end; meanwhile every process counts its own)."""
        try:
            answer = await asyncio.wait_for(call(), EVERY)
        except Exception as error:
            if not self.failing:
                log.warning(
                    "slot leases unavailable: each process counts its own generations at each pod",
                    extra={"reason": repr(error)},
                )
            self.failing = True
            self.others.clear()
            raise RedisDown from None
        if self.failing:
            log.warning("slot leases available again")
        self.failing = False
        return answer


class RedisDown(Exception):
    """Redis did not answer in time."""
