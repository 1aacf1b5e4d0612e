"""Rolling windows of tokens per access key: in memory, or in Redis with one script each
way, so that every proxy sharing it keeps one quota exactly.

Each window is kept in buckets (a second for a minute, a minute for a day): a bucket
counts while any of it is inside the window, so the windows err on the side of the
quota. A reservation takes from every window of its key at once, or from none.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, cast

import coredis

if TYPE_CHECKING:
    from .auth import ApiKey

PREFIX = "{ollama-proxy}:quota"  # one hash slot, for a Redis cluster too
TICKET_LIVES = 300  # seconds a reservation's ticket is kept in Redis: the longest stall it covers
# A key entry's quota settings: the window each one limits, and its bucket, in seconds.
WINDOWS = {"tokens_per_minute": (60, 1), "tokens_per_day": (86400, 60)}


@dataclass(frozen=True, slots=True)
class Window:
    """One of a key's limits: `limit` tokens in any `seconds`, counted in buckets of `bucket` seconds."""

    name: str
    seconds: int
    bucket: int
    limit: int


def windows_of(key: ApiKey) -> tuple[Window, ...]:
    """The windows a key's entry sets (none: no quota)."""
    return tuple(
        Window(name, seconds, bucket, limit)
        for name, (seconds, bucket) in WINDOWS.items()
        if (limit := getattr(key, name)) is not None
    )


@dataclass(frozen=True, slots=True)
class Taken:
    """A storage's answer to a reservation: the tokens granted (0: refused), its clock's
    second, each window's use before it, and, when refused, each window's buckets (to
    tell when enough frees)."""

    granted: int
    now: int
    used: tuple[int, ...]
    buckets: tuple[dict[int, int], ...] = ()
    ticket: str = ""  # Redis's name for the reservation


class MemoryTokens:
    """A process's own windows: bucket start -> tokens, per key and window."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[int, int]] = {}

    async def take(self, name: str, windows: Sequence[Window], need: int, want: int, now: int | None = None) -> Taken:
        """Grant min(want, what every window has left) when that is at least `need`;
        `now`: this machine's clock unless told."""
        now = int(time.time()) if now is None else now
        held = [self.buckets.setdefault(f"{name}:{window.name}", {}) for window in windows]
        used = []
        for window, buckets in zip(windows, held, strict=True):
            for stamp in [stamp for stamp in buckets if stamp + window.bucket <= now - window.seconds]:
                del buckets[stamp]
            used.append(sum(buckets.values()))
        granted = min(want, *(window.limit - use for window, use in zip(windows, used, strict=True)))
        if granted < need:
            return Taken(0, now, tuple(used), tuple(dict(buckets) for buckets in held))
        for window, buckets in zip(windows, held, strict=True):
            stamp = now - now % window.bucket
            buckets[stamp] = buckets.get(stamp, 0) + granted
        return Taken(granted, now, tuple(used))

    async def give(self, name: str, windows: Sequence[Window], stamps: Sequence[int], change: int, _: str) -> None:
        for window, stamp in zip(windows, stamps, strict=True):
            buckets = self.buckets[f"{name}:{window.name}"]
            if stamp in buckets:  # else it has left the window: nothing to correct
                buckets[stamp] += change


# KEYS: a hash per window, then this reservation's ticket. ARGV: now ('' for Redis's own
# clock, one for every proxy), need, want, then seconds, bucket, limit per window. Drops
# buckets that have left their window, and grants min(want, what every window has left)
# when that is at least `need`: {granted, now, used...}, noting on its ticket the grant,
# the bucket charged in each window, its clock and each window's use; else {0, now, used,
# buckets, ...}. Run again with a ticket noted (a client library that sent it again after
# a connection it dropped), it answers as it did and takes nothing more; a ticket its
# proxy gave up on is an error, and granted nothing.
_TAKE = """
local ticket = KEYS[#KEYS]
local noted = redis.call('GET', ticket)
if noted == 'given up' then
  return redis.error_reply('its proxy gave this reservation up')
elseif noted then
  local values = {}
  for value in string.gmatch(noted, '-?%d+') do
    table.insert(values, tonumber(value))
  end
  local answer = {values[1], values[#KEYS + 1]}
  for i = 1, #KEYS - 1 do
    table.insert(answer, values[#KEYS + 1 + i])
  end
  return answer
end
local now = tonumber(ARGV[1] == '' and redis.call('TIME')[1] or ARGV[1])
local need, want = tonumber(ARGV[2]), tonumber(ARGV[3])
local used, granted = {}, want
for i = 1, #KEYS - 1 do
  local key = KEYS[i]
  local seconds, bucket, limit = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  local flat, sum = redis.call('HGETALL', key), 0
  for j = 1, #flat, 2 do
    if tonumber(flat[j]) + bucket <= now - seconds then
      redis.call('HDEL', key, flat[j])
    else
      sum = sum + tonumber(flat[j + 1])
    end
  end
  used[i] = sum
  granted = math.min(granted, limit - sum)
end
if granted < need then
  local answer = {0, now}
  for i = 1, #KEYS - 1 do
    table.insert(answer, used[i])
    table.insert(answer, redis.call('HGETALL', KEYS[i]))
  end
  return answer
end
local noted = {granted}
for i = 1, #KEYS - 1 do
  local seconds, bucket = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  redis.call('HINCRBY', KEYS[i], now - now % bucket, granted)
  redis.call('EXPIRE', KEYS[i], seconds + bucket)
  table.insert(noted, now - now % bucket)
end
table.insert(noted, now)
for i = 1, #KEYS - 1 do
  table.insert(noted, used[i])
end
for i = 1, #noted do
  noted[i] = string.format('%d', noted[i])  -- whole numbers, never 1e+14
end
redis.call('SET', ticket, table.concat(noted, ' '), 'EX', TICKET_LIVES)
return {granted, now, unpack(used)}
"""

# KEYS: a hash per window, then the ticket. ARGV: the change, then the bucket each window
# charged. Corrects the buckets still in their window; the ticket is done with.
_GIVE = """
for i = 1, #KEYS - 1 do
  if redis.call('HEXISTS', KEYS[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[i], ARGV[i + 1], ARGV[1])
  end
end
redis.call('DEL', KEYS[#KEYS])
"""

# KEYS: a hash per window, then the ticket of a reservation its proxy gave up waiting for.
# Takes back what it was granted, if it ran; else marks it, so that it grants nothing.
_UNDO = """
local ticket = KEYS[#KEYS]
local noted = redis.call('GET', ticket)
redis.call('SET', ticket, 'given up', 'EX', TICKET_LIVES)
if not noted or noted == 'given up' then
  return
end
local granted, i = nil, 0
for value in string.gmatch(noted, '-?%d+') do
  if granted == nil then
    granted = value
  elseif i < #KEYS - 1 then  -- the buckets charged (then its clock and uses, for a repeat)
    i = i + 1
    if redis.call('HEXISTS', KEYS[i], value) == 1 then
      redis.call('HINCRBY', KEYS[i], value, -granted)
    end
  end
end
"""


class RedisTokens:
    """Windows every proxy sharing one Redis keeps together: a hash per key and window.

    Each reservation has a ticket: a proxy that gave up waiting for Redis (a timeout)
    may not know whether its reservation ran, so it takes it back by its ticket, which
    works whichever of the two Redis runs first."""

    def __init__(self, url: str) -> None:
        redis = coredis.Redis.from_url(url, decode_responses=True)
        lives = str(TICKET_LIVES)
        self.take_script = redis.register_script(_TAKE.replace("TICKET_LIVES", lives))
        self.give_script = redis.register_script(_GIVE)
        self.undo_script = redis.register_script(_UNDO.replace("TICKET_LIVES", lives))
        self.undoing: set[asyncio.Future[Any]] = set()

    async def take(self, name: str, windows: Sequence[Window], need: int, want: int, now: int | None = None) -> Taken:
        """As `MemoryTokens.take`, atomically, on Redis's clock unless told."""
        arguments: list[coredis.typing.ValueT] = ["" if now is None else now, need, want]
        for window in windows:
            arguments += [window.seconds, window.bucket, window.limit]
        ticket = f"{PREFIX}:ticket:{secrets.token_hex(12)}"
        keys = [*_keys(name, windows), ticket]
        try:
            answer = cast(list[Any], await self.take_script(keys=keys, args=arguments))
        except BaseException:  # a timeout, or Redis gone: it may run yet, or have run
            undo = asyncio.ensure_future(self.undo_script(keys=keys))
            self.undoing.add(undo)
            undo.add_done_callback(self._undone)
            raise
        granted, now = int(answer[0]), int(answer[1])
        if granted:
            return Taken(granted, now, tuple(int(use) for use in answer[2:]), ticket=ticket)
        pairs = answer[2:]
        return Taken(
            0,
            now,
            tuple(int(use) for use in pairs[::2]),
            tuple(
                {int(stamp): int(tokens) for stamp, tokens in zip(flat[::2], flat[1::2], strict=True)}
                for flat in pairs[1::2]
            ),
        )

    def _undone(self, undo: asyncio.Future[Any]) -> None:
        self.undoing.discard(undo)
        with suppress(asyncio.CancelledError):
            undo.exception()  # Redis is down: then the reservation did not run either

    async def give(self, name: str, windows: Sequence[Window], stamps: Sequence[int], change: int, ticket: str) -> None:
        await self.give_script(keys=[*_keys(name, windows), ticket], args=[change, *stamps])


def _keys(name: str, windows: Sequence[Window]) -> list[coredis.typing.KeyT]:
    return [f"{PREFIX}:{name}:{window.name}" for window in windows]


def retry_after(window: Window, buckets: dict[int, int], room: int, need: int, now: int) -> int:
    """Seconds until `need` tokens (at most its limit) fit in `window`, which has `room`
    left now (its limit less its buckets): its oldest buckets leave first."""
    stamps = sorted(buckets)
    freed = accumulate(buckets[stamp] for stamp in stamps)
    enough = next(index for index, tokens in enumerate(freed) if room + tokens >= need)
    return max(1, stamps[enough] + window.bucket + window.seconds - now)
