"""Every proxy process's load at each pod, through Redis, so that each balances on the
pool's real load (several workers, or several machines behind one balancer).

Each process writes its own counts (requests and generations in flight, per
pod) under a key of its own that expires when the process stops renewing it,
and reads everyone's sums, once a second, in one script. Between two such
looks a process adds its own changes at once: the others' are at most about a
second old. Without Redis, each process balances on its own counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING, cast

import coredis

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger(__name__)

EVERY = 1.0  # seconds between two looks
LIVES = 5  # seconds a process's counts outlive its last look
PREFIX = "{ollama-proxy}:load"  # one hash slot, for a Redis cluster too

# KEYS: this process's hash, the set of processes. ARGV: lifetime, then field, value pairs.
# Writes this process's counts, drops processes whose counts expired, returns the sums.
_LOOK = """
redis.call('DEL', KEYS[1])
if #ARGV > 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
redis.call('SADD', KEYS[2], KEYS[1])
local sums = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local counts = redis.call('HGETALL', key)
  if #counts == 0 and key ~= KEYS[1] then
    redis.call('SREM', KEYS[2], key)
  end
  for i = 1, #counts, 2 do
    sums[counts[i]] = (sums[counts[i]] or 0) + tonumber(counts[i + 1])
  end
end
local flat = {}
for field, sum in pairs(sums) do
  table.insert(flat, field)
  table.insert(flat, sum)
end
return flat
"""


class SharedLoad:
    """Keeps `pool`'s members' `others_in_flight` and `others_busy` up to date from Redis."""

    def __init__(self, url: str, pool: Pool):
        self.pool = pool
        self.redis = coredis.Redis.from_url(url, decode_responses=True)
        self.key = f"{PREFIX}:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.processes = f"{PREFIX}:processes"
        self.script = self.redis.register_script(_LOOK)
        self.failing = False

    async def run(self) -> None:
        while True:
            await self.look()
            await asyncio.sleep(EVERY)

    async def look(self) -> None:
        """Tell Redis this process's counts and take everyone else's; an outage leaves each
        process to its own counts (logged when it begins and ends)."""
        mine = {}
        for member in self.pool.members:
            mine[f"{member.pod.name}:in_flight"] = member.in_flight
            mine[f"{member.pod.name}:busy"] = member.busy
        arguments: list[coredis.typing.ValueT] = [LIVES, *(item for pair in mine.items() for item in pair)]
        try:
            answer = await asyncio.wait_for(self.script(keys=[self.key, self.processes], args=arguments), EVERY)
        except Exception as error:
            if not self.failing:
                log.warning(
                    "shared load unavailable: each process balances on its own counts", extra={"reason": repr(error)}
                )
            self.failing = True
            for member in self.pool.members:
                member.others_in_flight = member.others_busy = 0
            return
        if self.failing:
            log.warning("shared load available again")
        self.failing = False
        flat = cast(list[str], answer)  # the script returns field, sum pairs
        sums = dict(zip(flat[::2], (int(value) for value in flat[1::2]), strict=True))
        for member in self.pool.members:
            name = member.pod.name
            member.others_in_flight = sums.get(f"{name}:in_flight", 0) - mine[f"{name}:in_flight"]
            member.others_busy = sums.get(f"{name}:busy", 0) - mine[f"{name}:busy"]
