"""The application factory: settings and plugins in, a Tornado application out."""

import base64
import hashlib
import json
import re
from importlib.resources import files
from typing import Any

import pluggy
from tornado.web import Application

from .handler import (
    HealthHandler,
    MetricsHandler,
    ProxyHandler,
    ProxyNotFoundHandler,
    StatusHandler,
    StatusPageHandler,
)
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
        pm.hook.choose_upstream(settings=settings),
    )
    endpoints: list[Any] = [
        (re.escape(path), handler)
        for path, handler in ((settings.health_path, HealthHandler), (settings.metrics_path, MetricsHandler))
        if path is not None
    ]
    if settings.status_path is not None:
        endpoints += status_endpoints(settings.status_path)
    return Application(
        [
            *endpoints,
            (re.escape(RESERVED_PREFIX) + ".*", ProxyNotFoundHandler),
            (r".*", ProxyHandler),
        ],
        proxy=proxy,  # handlers find it in application.settings
        log_function=lambda handler: None,  # handlers write their own access records
    )


def status_endpoints(page_path: str) -> list[Any]:
    """The status page (at its path, with or without the final slash) and its figures (`status` under it)."""
    base = page_path.rstrip("/")
    data_path = base + "/status"
    template = files(__package__).joinpath("status.html").read_text(encoding="utf-8")
    page = template.replace("__STATUS_URL__", json.dumps(data_path))
    return [
        (re.escape(data_path), StatusHandler),
        (re.escape(base) + "/?", StatusPageHandler, {"page": page.encode(), "policy": page_policy(page)}),
    ]


def page_policy(page: str) -> str:
    """A Content-Security-Policy that allows the page's own script and style (by their
    hashes: nothing injected runs), fetching from its own origin, and nothing else:
    no frame may hold it, no base or form may redirect it."""

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'" for text in found
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
