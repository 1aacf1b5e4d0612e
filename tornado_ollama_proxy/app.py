"""The application factory: settings and plugins in, a Tornado application out."""

import re

import pluggy
from tornado.web import Application

from .handler import HealthHandler, MetricsHandler, ProxyHandler, ProxyNotFoundHandler
from .plugins import build_route_table, make_plugin_manager
from .proxy import Proxy
from .routes import RESERVED_PREFIX
from .settings import Settings


def make_app(settings: Settings, pm: pluggy.PluginManager | None = None) -> Application:
    pm = pm if pm is not None else make_plugin_manager(settings)
    proxy = Proxy(
        settings,
        build_route_table(pm),
        pm.hook.rate_limiter(settings=settings),
        pm.hook.authenticate(settings=settings),
    )
    endpoints = [
        (re.escape(path), handler)
        for path, handler in ((settings.health_path, HealthHandler), (settings.metrics_path, MetricsHandler))
        if path is not None
    ]
    return Application(
        [
            *endpoints,
            (re.escape(RESERVED_PREFIX) + ".*", ProxyNotFoundHandler),
            (r".*", ProxyHandler),
        ],
        proxy=proxy,  # handlers find it in application.settings
        log_function=lambda handler: None,  # handlers write their own access records
    )
