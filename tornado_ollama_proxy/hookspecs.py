"""The hooks a plugin may implement.

Built-in behaviour is supplied through these same hooks by the modules in
``default_plugins``, so a plugin can extend or replace anything the proxy does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .settings import Settings

PROJECT = "tornado_ollama_proxy"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_routes() -> Iterable[Mapping[str, Any]]:
    """Return route entries to add to the endpoint→method map.

    Each entry is a mapping with ``path`` and ``methods`` and optionally
    ``upstream_path``, ``body_defaults`` and ``requires_body`` (see
    ``routes.parse_route``). An entry for a path that is already mapped
    replaces it; plugins registered later win over earlier ones.
    """


@hookspec(firstresult=True)
def log_handler(settings: Settings) -> logging.Handler:
    """Return the `logging.Handler` every log record goes through.

    The built-in one writes JSON lines to stdout; a plugin returning its own
    handler (another sink or formatter) replaces it.
    """


@hookspec(firstresult=True)
def rate_limiter(settings: Settings) -> Any:
    """Return the object that admits or refuses requests, or None for no limits.

    It needs one coroutine method, ``admit(client, route)``, that returns a
    `ratelimit.Admission` (response headers and a ``release`` callable called
    once when the request ends) or raises `ratelimit.RateLimited` (an
    `errors.Rejection` with a ``reason``). The built-in one uses ``limits``.
    """


@hookspec(firstresult=True)
def authenticate(settings: Settings) -> Any:
    """Return the object that decides who may use the proxy, or None for an open proxy.

    It needs a coroutine method ``authenticate(headers, path, scope, client)``
    that returns the name the request acts as (a key's name; None on a
    public path) or raises `errors.Rejection` (401, 403, 429), and a
    ``removed_headers`` attribute naming the request headers that carry the
    credential, which never go upstream. ``scope`` is the route's scope
    (``inference``, ``manage``, ``metrics``) and ``client`` the address the
    rate limiter sees. The built-in one checks access keys (`auth`).
    """


@hookspec(firstresult=True)
def choose_upstream(settings: Settings) -> Any:
    """Return the policy that orders the pods a request may go to, best first.

    It is called with a sequence of `balancer.PodView` (the pods that are up, with their
    slots, load, and whether they list and have loaded the request's model) and a
    `balancer.Wanted` (the request's model and conversation), and returns the pods that
    may take the request, best first; the first that may be tried is. The built-in one
    is `balancer.order`: free slots, then the loaded model, then the conversation's
    pod, then the least loaded (see `default_plugins/balancing.py`).
    """
