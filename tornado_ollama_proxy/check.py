"""``tornado-ollama-proxy check``: for deploy scripts and a container's health check.

Validates the settings, reaches every upstream, and prints what would be served.
Exits 0 when at least one upstream answers (as `/_proxy/health` says), 1 when
none does, 2 on a settings error or a Tornado the proxy cannot run on. It creates
nothing: not even a generated key.
"""

from __future__ import annotations

import asyncio
import os
import sys

from . import __version__
from .default_plugins.access_keys import configured_keys
from .generated_key import key_path
from .logs import escaped
from .plugins import PluginError, build_route_table, make_plugin_manager
from .proxy import Proxy
from .routes import RouteTable
from .settings import Settings, SettingsError, load_settings
from .startup import Look, addresses, local_addresses, look_at
from .tornado_private import IncompatibleTornado, require

PROG = "tornado-ollama-proxy"
LIMITS = ("rate_limit", "concurrency_per_client", "concurrency_total", "max_body_size")


def check(settings_file: str | None, flags: dict[str, str]) -> int:
    try:
        require()
        settings = load_settings(settings_file, flags=flags)
        pm = make_plugin_manager(settings)
        routes = build_route_table(pm)
        keys = access_keys(settings)
    except (SettingsError, PluginError, IncompatibleTornado) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    return _report(settings, routes, keys, asyncio.run(_look(Proxy(settings, routes))))


def _report(settings: Settings, routes: RouteTable, keys: str, looks: list[Look]) -> int:
    """Print what would be served; 0 when an upstream answers, else 1."""
    answering = sum(1 for look in looks if look.reachable)
    if settings.port:
        address = addresses(settings.host, settings.port, os.environ, local_addresses())[0]
    else:
        address = f"{settings.host}, on a free port picked at start"
    lines = [
        f"{PROG} {__version__}: the settings are valid",
        f"Address:      {address}",
        f"Routes:       {len(routes)}: " + ", ".join(route.path for route in routes),
        *(_upstream(look) for look in looks),
        f"Access keys:  {keys}",
        "Limits:       " + ("; ".join(_limits(settings)) or "none"),
        f"Upstreams:    {answering} of {len(looks)} answer",
    ]
    print("\n".join(lines))
    return 0 if answering else 1


async def _look(proxy: Proxy) -> list[Look]:
    try:
        return await look_at(proxy.pool, proxy.settings.connect_timeout)
    finally:
        proxy.pool.close()


def access_keys(settings: Settings) -> str:
    """The keys by name, or what start-up would do without any (`SettingsError` for a bad key file)."""
    keys = configured_keys(settings)
    if keys:
        return f"on, {len(keys)} key{'s' if len(keys) != 1 else ''}: " + ", ".join(key.name for key in keys)
    if not settings.public:
        return "off: anyone who can reach the port can use it"
    path = key_path(settings.generated_key_file)
    kept = "kept" if path.exists() else "to be made at the first start"
    return f"on, one generated key ({kept} in {path})"


def _upstream(look: Look) -> str:
    """One upstream's line: what it said of itself is escaped (a pod must not drive the terminal)."""
    line = f"Upstream:     {look.name} at {look.address}: {look.said()}"
    if look.models:
        line += ": " + ", ".join(look.models)
    return escaped(line)


def _limits(settings: Settings) -> list[str]:
    found = [f"{name} {getattr(settings, name)}" for name in LIMITS if getattr(settings, name) is not None]
    found += [f"rate_limit_routes {path} {limit}" for path, limit in settings.rate_limit_routes.items()]
    return found
