"""A cheap, cached look at the upstream for ``/_proxy/health``.

At most one ``GET /api/version`` every ``health_cache_seconds``, shared by
every caller meanwhile, so a platform probing every second costs Ollama
nothing noticeable.
"""

import asyncio
from typing import Any

from tornado.httputil import HTTPHeaders

from .peer_json import json_object
from .upstream import Upstream
from .upstream_client import AnswerTimeout


class HealthCheck:
    def __init__(self, upstream: Upstream, ttl: float):
        self.upstream = upstream
        self.ttl = ttl
        self._result: tuple[int, dict[str, Any]] | None = None
        self._fresh_until = 0.0
        self._pending: asyncio.Future[tuple[int, dict[str, Any]]] | None = None

    async def status(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body): 200 when the upstream answers like Ollama, else 503 and why."""
        loop = asyncio.get_running_loop()
        if self._result is not None and loop.time() < self._fresh_until:
            return self._result
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._pending)

    async def _check(self) -> tuple[int, dict[str, Any]]:
        self._result = await self._ask_upstream()
        self._fresh_until = asyncio.get_running_loop().time() + self.ttl
        return self._result

    async def _ask_upstream(self) -> tuple[int, dict[str, Any]]:
        upstream = self.upstream
        request = upstream.request("GET", "/api/version", HTTPHeaders({"Host": upstream.host}))
        request.request_timeout = upstream.connect_timeout
        try:
            response = await upstream.fetch(request)
        except AnswerTimeout:
            return 503, {"error": f"upstream {upstream.base} did not answer within {upstream.connect_timeout:g} s"}
        except Exception as error:
            return 503, {"error": upstream.failure(error)[1].message}
        if response.code != 200:
            return 503, {"error": f"upstream {upstream.base} answered {response.code}"}
        version = (json_object(response.body) or {}).get("version")
        if not isinstance(version, str):
            return 503, {"error": f"upstream {upstream.base} does not answer like Ollama"}
        return 200, {"status": "ok", "upstream": upstream.base, "upstream_version": version}
