"""The application factory: settings and plugins in, a Tornado application out."""

import asyncio
import re

import pluggy
from tornado.web import Application

from .handler import HealthHandler, MetricsHandler, ProxyHandler, ProxyNotFoundHandler
from .health import HealthCheck
from .metrics import Metrics
from .plugins import build_route_table, make_plugin_manager
from .routes import RouteTable
from .settings import Settings
from .upstream import Upstream

RESERVED_PREFIX = "/_proxy/"


class InFlight:
    """Counts requests being handled, so a shutdown can wait for them to end."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: list[asyncio.Future] = []

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


class Proxy:
    """Everything a handler needs: settings, routes, limiter, upstream, health, metrics, in-flight count."""

    def __init__(self, settings: Settings, routes: RouteTable, limiter=None):
        self.settings = settings
        self.routes = routes
        self.limiter = limiter
        self.trusted_networks = settings.trusted_networks
        self.exempt_networks = settings.exempt_networks
        self.upstream = Upstream(settings)
        self.health = HealthCheck(self.upstream, settings.health_cache_seconds)
        self.metrics = Metrics()
        self.in_flight = InFlight()


def make_app(settings: Settings, pm: pluggy.PluginManager | None = None) -> Application:
    pm = pm if pm is not None else make_plugin_manager(settings)
    proxy = Proxy(settings, build_route_table(pm), pm.hook.rate_limiter(settings=settings))
    own = {"proxy": proxy}
    endpoints = [
        (re.escape(path), handler, own)
        for path, handler in ((settings.health_path, HealthHandler), (settings.metrics_path, MetricsHandler))
        if path is not None
    ]
    app = Application(
        [
            *endpoints,
            (re.escape(RESERVED_PREFIX) + ".*", ProxyNotFoundHandler, own),
            (r".*", ProxyHandler, own),
        ],
        log_function=lambda handler: None,  # handlers write their own access records
    )
    app.proxy = proxy
    return app
