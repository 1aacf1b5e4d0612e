"""The endpoint→method map and the pure decision of which method goes upstream.

A route entry names a path (``{name}`` matches one segment), the methods the
upstream accepts there, and optionally an upstream path and JSON body defaults
(for aliases such as ``/api/stop``) and whether a body is required.
"""

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from .auth import SCOPES
from .errors import Rejection
from .headers import OVERRIDE_HEADER, value_of

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Methods that carry a request body by convention (Ollama's DELETE does).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
RESERVED_PREFIX = "/_proxy/"  # the proxy's own endpoints, never forwarded
ROUTE_KEYS = ("path", "methods", "upstream_path", "body_defaults", "requires_body", "scope", "answer", "tokens")
# How the upstream answers (what a heartbeat may look like): "ndjson" streams lines
# unless the body says "stream": false (Ollama's /api convention), "sse" streams
# events only when it says "stream": true (OpenAI's /v1 convention), "json" is one
# document; None is anything else.
ANSWERS = ("ndjson", "sse", "json")

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LITERAL_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RouteError(ValueError):
    """A route entry that does not fit the schema; the message names the field."""


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]
    upstream_path: str | None = None
    body_defaults: Mapping[str, Any] | None = field(default=None, hash=False)
    requires_body: bool = False
    scope: str = "manage"  # the access-key scope it needs: what changes the server unless said otherwise
    answer: str | None = None  # one of ANSWERS
    tokens: bool = False  # the answer reports token counts (generations, embeddings)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(_PARAM.findall(self.path))

    def upstream_target(self, params: Mapping[str, str]) -> str | None:
        """The upstream path for an alias, with the matched segments filled in."""
        if self.upstream_path is None:
            return None
        return _PARAM.sub(lambda m: params[m.group(1)], self.upstream_path)


def _check_path(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise RouteError(f"{key}: must be a string starting with '/', got {value!r}")
    for segment in value.split("/")[1:]:
        if not (_PARAM.fullmatch(segment) or _LITERAL_SEGMENT.fullmatch(segment)):
            raise RouteError(
                f"{key}: segment {segment!r} of {value!r} must be literal URL text or a whole '{{name}}' placeholder"
            )
    return value


def parse_route(entry: Any) -> Route:
    """Validate one route entry (a JSON object) and build the `Route`."""
    if isinstance(entry, Route):
        return entry
    if not isinstance(entry, Mapping):
        raise RouteError(f"must be an object with keys {', '.join(ROUTE_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(ROUTE_KEYS))
    if unknown:
        raise RouteError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(ROUTE_KEYS)}")
    if "path" not in entry or "methods" not in entry:
        raise RouteError("needs both 'path' and 'methods'")
    path = _check_path(entry["path"], "path")
    methods = entry["methods"]
    if (
        not isinstance(methods, list | tuple)
        or not methods
        or not all(isinstance(m, str) and m.upper() in METHODS for m in methods)
    ):
        raise RouteError(f"methods: must be a non-empty list of {', '.join(METHODS)}, got {methods!r}")
    methods = tuple(dict.fromkeys(m.upper() for m in methods))
    upstream_path = entry.get("upstream_path")
    if upstream_path is not None:
        _check_path(upstream_path, "upstream_path")
        missing = sorted(set(_PARAM.findall(upstream_path)) - set(_PARAM.findall(path)))
        if missing:
            raise RouteError(f"upstream_path: placeholder {{{missing[0]}}} is not in path {path!r}")
    body_defaults = entry.get("body_defaults")
    if body_defaults is not None:
        if not isinstance(body_defaults, Mapping):
            raise RouteError(f"body_defaults: must be a JSON object, got {body_defaults!r}")
        if not BODY_METHODS.intersection(methods):
            raise RouteError("body_defaults: the route needs a method that carries a body")
    requires_body = entry.get("requires_body", False)
    if not isinstance(requires_body, bool):
        raise RouteError(f"requires_body: must be true or false, got {requires_body!r}")
    scope = entry.get("scope", "manage")
    if scope not in SCOPES:
        raise RouteError(f"scope: must be one of {', '.join(SCOPES)}, got {scope!r}")
    answer = entry.get("answer")
    if answer is not None and answer not in ANSWERS:
        raise RouteError(f"answer: must be one of {', '.join(ANSWERS)} or null, got {answer!r}")
    tokens = entry.get("tokens", False)
    if not isinstance(tokens, bool):
        raise RouteError(f"tokens: must be true or false, got {tokens!r}")
    return Route(path, methods, upstream_path, body_defaults, requires_body, scope, answer, tokens)


def parse_routes(entries: Iterable[Any]) -> tuple[Route, ...]:
    """Validate a list of route entries; the message names the bad entry's index."""
    parsed = []
    for index, entry in enumerate(entries):
        try:
            parsed.append(parse_route(entry))
        except RouteError as error:
            raise RouteError(f"entry {index}: {error}") from None
    return tuple(parsed)


class RouteTable:
    """Routes by path; an entry for a path already present replaces it."""

    def __init__(self, routes: Iterable[Route]):
        by_path: dict[str, Route] = {}
        for route in routes:
            by_path[route.path] = route
        self._exact = {path: r for path, r in by_path.items() if not r.params}
        # Per pattern route, its segments: (literal, None) or (None, placeholder name).
        self._patterns = [(r, [_segment(part) for part in r.path.split("/")]) for r in by_path.values() if r.params]

    def __iter__(self) -> Iterator[Route]:
        yield from self._exact.values()
        yield from (route for route, _ in self._patterns)

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        """Find the route for a raw request path, its segments compared decoded as
        Ollama sees them. Placeholders take their segments as they arrived (still
        percent-encoded), so that an upstream path built from them says the same."""
        route = self._exact.get(unquote(path))
        if route is not None:
            return route, {}
        segments = path.split("/")
        for route, pattern in self._patterns:
            if len(pattern) != len(segments):
                continue
            params = {}
            for (literal, name), segment in zip(pattern, segments, strict=True):
                if name is None:
                    if unquote(segment) != literal:
                        break
                elif not segment:
                    break
                else:
                    params[name] = segment
            else:
                return route, params
        return None


def _segment(part: str) -> tuple[str | None, str | None]:
    found = _PARAM.fullmatch(part)
    return (None, found.group(1)) if found else (part, None)


def router_path(target: str) -> str:
    """A request target's path as Ollama's router matches it: decoded, without its query
    (`/api/%63hat?x` is `/api/chat`)."""
    return unquote(target.partition("?")[0])


def is_reserved(path: str) -> bool:
    """Whether a raw request path, decoded, names the proxy's own prefix."""
    return unquote(path).startswith(RESERVED_PREFIX)


def check_target(uri: str) -> None:
    """Refuse request targets that are not a plain path on the upstream.

    Dot segments and backslashes are refused in raw and percent-encoded form, so
    no spelling of ``..`` reaches a server that might resolve it.
    """
    if not uri.startswith("/"):
        raise Rejection(
            400,
            f"request target {uri[:200]!r} is not a path: this proxy serves one upstream "
            "and accepts only origin-form targets such as /api/chat",
        )
    if "#" in uri:
        raise Rejection(400, "request target contains '#': a fragment is never sent to a server")
    if _CONTROL.search(uri):
        raise Rejection(400, "request target contains control characters")
    path = unquote(uri.partition("?")[0])
    if _CONTROL.search(path):
        raise Rejection(400, "request path contains control characters")
    if "\\" in path:
        raise Rejection(400, "request path contains a backslash")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise Rejection(400, "request path contains a '.' or '..' segment")


def decide_method(route: Route | None, method: str, headers: Mapping[str, str], has_body: bool) -> str:
    """The method to send upstream, or a `Rejection`.

    1. ``X-HTTP-Method-Override`` naming a method the route allows wins;
    2. an incoming method the route allows is kept;
    3. a single-method route gets its method;
    4. a multi-method route gets its body-carrying method when a body is
       present, else its body-less one;
    5. outside the map the method is kept, but a GET with a body becomes POST.
    A body-requiring route reached by a changed method without a body is
    refused: the body was lost on the way and cannot be recovered.
    """
    override = value_of(headers, OVERRIDE_HEADER)
    if override is not None:
        wanted = override.strip().upper()
        if wanted not in METHODS:
            raise Rejection(400, f"{OVERRIDE_HEADER}: {override!r} is not one of {', '.join(METHODS)}")
        if route is None or wanted in route.methods:
            return wanted
        allowed = ", ".join(route.methods)
        raise Rejection(
            405,
            f"{OVERRIDE_HEADER} asks for {wanted}, but {route.path} allows only {allowed}",
            {"Allow": allowed},
        )
    if route is None:
        return "POST" if method == "GET" and has_body else method
    if method in route.methods:
        return method
    fitting = [m for m in route.methods if (m in BODY_METHODS) == has_body]
    chosen = (fitting or list(route.methods))[0]
    if route.requires_body and not has_body and chosen in BODY_METHODS:
        raise Rejection(
            400,
            f"{route.path} needs a {chosen} with a JSON body, but this request arrived as "
            f"{method} without one: the body was lost before it reached the proxy (clients "
            "re-send a POST as a body-less GET after an http:// to https:// redirect; "
            "call the https:// URL directly)",
        )
    return chosen
