"""A cheap look at the upstream for ``/_proxy/health``.

With one pod: at most one ``GET /api/version`` every ``health_cache_seconds``,
shared by every caller meanwhile, so a platform probing every second costs
Ollama nothing noticeable. With several: the pool probes them anyway, and the
check reads what it found: 200 while one pod is healthy.
"""

import asyncio
from typing import Any

from .pool import Pool


class HealthCheck:
    def __init__(self, pool: Pool, ttl: float):
        self.pool = pool
        self.ttl = ttl
        self._result: tuple[int, dict[str, Any]] | None = None
        self._fresh_until = 0.0
        self._pending: asyncio.Future[tuple[int, dict[str, Any]]] | None = None

    async def status(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body): 200 when Ollama answers, else 503 and why."""
        pool = self.pool
        if not pool.single:
            upstreams = pool.snapshot()
            if pool.healthy:
                return 200, {"status": "ok", "upstreams": upstreams}
            return 503, {"error": pool.unavailable().message, "upstreams": upstreams}
        loop = asyncio.get_running_loop()
        if self._result is not None and loop.time() < self._fresh_until:
            return self._result
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._pending)

    async def _check(self) -> tuple[int, dict[str, Any]]:
        [member] = self.pool.members
        version, failure = await self.pool.probe(member)
        if version is None:
            self._result = 503, {"error": failure}
        else:
            self._result = 200, {"status": "ok", "upstream": member.pod.name, "upstream_version": version}
        self._fresh_until = asyncio.get_running_loop().time() + self.ttl
        return self._result
