"""One configuration schema, validated once at start-up.

Precedence: built-in defaults < settings file < environment < command-line
flags. Every key has an environment override ``OLLAMA_PROXY_<KEY>``; ``PORT``
(the PaaS convention) sets the port too, below ``OLLAMA_PROXY_PORT``.
"""

import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from limits import parse_many

from .auth import ApiKey, KeyEntryError, parse_entries
from .clients import is_loopback
from .routes import Route, RouteError, parse_routes

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_FILE = "settings.json"
DEFAULT_POD = "default"  # the name of the pool of one that `upstream` makes
ENV_PREFIX = "OLLAMA_PROXY_"


class SettingsError(ValueError):
    """Invalid configuration; the message names the source, the key and what is allowed."""


@dataclass(frozen=True)
class PodConfig:
    """One Ollama server of the pool, as configured. `name` is what users and logs see,
    never `url` (which may hold a secret); `slots` is how many generations it runs at
    once (its OLLAMA_NUM_PARALLEL; None for unknown); `headers` go with every request
    to it (such as the key of a remote pod that runs this proxy itself)."""

    name: str
    url: str
    weight: float = 1.0
    slots: int | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def base(self) -> str:
        """The URL without a trailing slash, to which request paths are appended."""
        return self.url.rstrip("/")

    @property
    def host(self) -> str:
        """host:port for the Host header: Ollama answers 403 to a non-local one."""
        return urlsplit(self.url).netloc


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8000
    upstream: str = "http://127.0.0.1:11434"
    upstreams: tuple[PodConfig, ...] = ()
    hold_body_max: int = 8 * 1024 * 1024
    pool_health_seconds: float = 5.0
    pool_max_fails: int = 3
    pool_eject_seconds: float = 10.0
    pool_retries: int = 2
    queue_max: int = 1000
    queue_max_per_key: int = 100
    queue_timeout: float = 300.0
    queue_default_output_tokens: int = 256
    quota_default_output_tokens: int = 4096
    quota_image_tokens: int = 1000
    connect_timeout: float = 10.0
    idle_timeout: float = 600.0
    header_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    heartbeat_seconds: float | None = 30.0
    max_body_size: int | None = None
    unmapped_paths: str = "forward"
    routes: tuple[Route, ...] = ()
    plugins_dir: str = "plugins"
    shutdown_grace: float = 30.0
    log_level: str = "info"
    log_format: str = "auto"
    log_headers: tuple[str, ...] = ()
    access_log_sampling: Mapping[str, float] = field(
        default_factory=lambda: {"/_proxy/health": 0.0, "/_proxy/metrics": 0.0, "/_proxy/status": 0.0}
    )
    health_path: str | None = "/_proxy/health"
    health_cache_seconds: float = 2.0
    metrics_path: str | None = "/_proxy/metrics"
    metrics_max_models: int = 50
    status_path: str | None = "/_proxy/"
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    client_key_header: str | None = None
    rate_limit: str | None = None
    rate_limit_routes: Mapping[str, str] = field(default_factory=dict)
    rate_limit_strategy: str = "moving-window"
    rate_limit_storage: str = "memory://"
    rate_limit_storage_timeout: float = 0.5
    rate_limit_fail: str = "open"
    rate_limit_exempt: tuple[str, ...] = ()
    concurrency_per_client: int | None = None
    concurrency_total: int | None = None
    event_loop: str = "auto"
    workers: int = 1
    api_keys: tuple[ApiKey, ...] = ()
    api_keys_file: str | None = None
    public_paths: tuple[str, ...] = ("/_proxy/health",)
    auth_failures: str = "10/minute"
    open: bool = False
    generated_key_file: str | None = None

    def __post_init__(self) -> None:
        if self.open and (self.api_keys or self.api_keys_file):
            raise SettingsError("open: true opens the proxy to anyone, and cannot go with api_keys or api_keys_file")

    @property
    def public(self) -> bool:
        """Listening where others can reach it, and not opened on purpose: without keys,
        it uses a generated one."""
        return not (self.open or is_loopback(self.host))

    @property
    def worker_count(self) -> int:
        """The processes that serve the port: `workers`, or one per core for 0."""
        return self.workers or os.cpu_count() or 1

    @property
    def trusted_networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(text, strict=False) for text in self.trusted_proxies)

    @property
    def exempt_networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(text, strict=False) for text in self.rate_limit_exempt)

    @property
    def pods(self) -> tuple[PodConfig, ...]:
        """The pool: `upstreams`, or `upstream` as a pool of one named "default"."""
        return self.upstreams or (PodConfig(DEFAULT_POD, self.upstream),)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a non-empty string")
    return value


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError("a whole number from 0 to 65535 (0 picks a free port)")
    return value


def _url(value: Any) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError("an http:// or https:// URL with a host, such as http://127.0.0.1:11434")
    try:
        _ = parts.port  # parsed on access
    except ValueError:
        raise ValueError("an http:// or https:// URL with a valid port") from None
    return str(value)


def _seconds(allow_zero: bool) -> Callable[[Any], float]:
    wanted = f"a number of seconds {'>=' if allow_zero else '>'} 0"

    def check(value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not allow_zero)
        ):
            raise ValueError(wanted)
        return float(value)

    return check


def _seconds_or_off(value: Any) -> float | None:
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    try:
        return _seconds(False)(value)
    except ValueError:
        raise ValueError("a number of seconds > 0, or null or 0 for none") from None


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a whole number of bytes >= 0")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a whole number >= 1")
    return value


def _retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a whole number >= 0 (0: never move a request to another pod)")
    return value


def _size_or_null(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a whole number of bytes >= 1, or null for no limit")
    return value


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(" or ".join(repr(a) for a in allowed))
        return str(value)

    return check


def _origins(value: Any) -> tuple[str, ...]:
    wanted = 'a list of origins such as "https://chat.example.com", or ["*"] for any'
    if not isinstance(value, list):
        raise ValueError(wanted)
    for origin in value:
        parts = urlsplit(origin) if isinstance(origin, str) else None
        if origin != "*" and (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path
            or parts.query
            or parts.fragment
        ):
            raise ValueError(wanted)
    return tuple(origin.lower() for origin in value)


def _header_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9-]+", name) for name in value
    ):
        raise ValueError('a list of header names such as ["User-Agent"]')
    return tuple(value)


def _sampling(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
        isinstance(path, str)
        and path.startswith("/")
        and not isinstance(rate, bool)
        and isinstance(rate, int | float)
        and 0 <= rate <= 1
        for path, rate in value.items()
    ):
        raise ValueError('an object of path -> rate from 0 (silent) to 1 (all), such as {"/_proxy/health": 0}')
    return {path: float(rate) for path, rate in value.items()}


def _endpoint_path(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value)):
        raise ValueError("a path such as /_proxy/health, or null to turn the endpoint off")
    return value


def _page_path(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+/?", value)):
        raise ValueError("a path such as /_proxy/, or null to turn the status page off")
    return value


def _parses_as_limits(value: Any) -> bool:
    try:
        parse_many(value)
    except (ValueError, TypeError):
        return False
    return True


def _limit(value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and _parses_as_limits(value)):
        raise ValueError('limits such as "120/minute" or "10/second; 1000/day", or null for none')
    return value


def _route_limits(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(route, str) and route.startswith("/") and isinstance(text, str) and _parses_as_limits(text)
        for route, text in value.items()
    ):
        raise ValueError('an object of route path -> limits, such as {"/api/pull": "5/hour"}')
    return dict(value)


def _networks(value: Any) -> tuple[str, ...]:
    try:
        if not isinstance(value, list):
            raise TypeError
        for text in value:
            ipaddress.ip_network(text, strict=False)
    except (TypeError, ValueError):
        raise ValueError('a list of addresses or networks such as ["10.0.0.0/8", "::1"]') from None
    return tuple(value)


def _storage(value: Any) -> str:
    schemes = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")
    if not isinstance(value, str) or urlsplit(value).scheme not in schemes:
        raise ValueError("a storage URL starting " + ", ".join(f"{s}://" for s in schemes))
    return value


def _count_or_null(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError("a whole number >= 1, or null for no cap")
    return value


def _header_name_or_null(value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9-]+", value)):
        raise ValueError('a header name such as "X-API-Key", or null to key clients by address')
    return value


def _model_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a whole number of models >= 1")
    return value


def _worker_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a whole number of processes >= 1, or 0 for one per core")
    return value


def _api_keys(value: Any) -> tuple[ApiKey, ...]:
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list):
        raise ValueError("a key, or a list of keys and objects with name, key or key_sha256, and scopes")
    try:
        return parse_entries(entries)
    except KeyEntryError as error:
        raise ValueError(str(error)) from None


def _path_or_null(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError("a file path, or null")
    return value


def _paths(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(path, str) and path.startswith("/") for path in value):
        raise ValueError('a list of paths such as ["/_proxy/health"]')
    return tuple(value)


def _limit_text(value: Any) -> str:
    if not (isinstance(value, str) and _parses_as_limits(value)):
        raise ValueError('a limit such as "10/minute"')
    return value


def _flag(value: Any) -> bool:
    if value not in (True, False):  # 1 and 0 too, as OLLAMA_PROXY_OPEN=1 gives
        raise ValueError("true or false (1 or 0)")
    return bool(value)


def _upstreams(value: Any) -> tuple[PodConfig, ...]:
    if isinstance(value, str):  # the short form, name=url,name=url
        value = [dict(zip(("name", "url"), item.strip().split("=", 1), strict=False)) for item in value.split(",")]
    if not isinstance(value, list) or not value:
        raise ValueError(
            'a list of pods such as [{"name": "a", "url": "http://10.0.0.2:11434", "slots": 4}], or name=url,name=url'
        )
    pods = []
    for index, entry in enumerate(value, start=1):
        try:
            pods.append(_pod(entry))
        except ValueError as error:
            raise ValueError(f"entry {index}: {error}") from None
    names = [pod.name for pod in pods]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"entry names must differ: {twice[0]!r} is given twice")
    return tuple(pods)


_POD_KEYS = ("name", "url", "weight", "slots", "headers")
_FORBIDDEN_POD_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "te", "upgrade"})


def _pod(entry: Any) -> PodConfig:
    if not isinstance(entry, dict):
        raise ValueError("an object with name and url (and weight, slots, headers)")
    unknown = sorted(set(entry) - set(_POD_KEYS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; allowed: {', '.join(_POD_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ValueError("name: 1 to 64 of A-Z a-z 0-9 . _ -")
    try:
        url = _url(entry.get("url"))
    except ValueError as error:
        raise ValueError(f"url: {error}") from None
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise ValueError("weight: a number > 0")
    slots = entry.get("slots")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise ValueError("slots: a whole number >= 1 (the pod's OLLAMA_NUM_PARALLEL), or null for unknown")
    headers = entry.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(key, str)
        and re.fullmatch(r"[A-Za-z0-9-]+", key)
        and key.lower() not in _FORBIDDEN_POD_HEADERS
        and isinstance(value, str)
        and not re.search(r"[\x00-\x1f\x7f]", value)
        for key, value in headers.items()
    ):
        raise ValueError('headers: an object of header name -> value, such as {"Authorization": "Bearer …"}')
    return PodConfig(name, url, float(weight), slots, tuple(headers.items()))


def _routes(value: Any) -> tuple[Route, ...]:
    if not isinstance(value, list):
        raise ValueError("a list of route objects")
    try:
        return parse_routes(value)
    except RouteError as error:
        raise ValueError(str(error)) from None


# key -> (validator, whether a text value from the environment or a flag is JSON)
SCHEMA: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "host": (_text, False),
    "port": (_port, True),
    "upstream": (_url, False),
    "upstreams": (_upstreams, True),
    "hold_body_max": (_size, True),
    "pool_health_seconds": (_seconds(False), True),
    "pool_max_fails": (_count, True),
    "pool_eject_seconds": (_seconds(False), True),
    "pool_retries": (_retries, True),
    "queue_max": (_count, True),
    "queue_max_per_key": (_count, True),
    "queue_timeout": (_seconds(False), True),
    "queue_default_output_tokens": (_count, True),
    "quota_default_output_tokens": (_count, True),
    "quota_image_tokens": (_count, True),
    "connect_timeout": (_seconds(False), True),
    "idle_timeout": (_seconds(False), True),
    "header_timeout": (_seconds(False), True),
    "keepalive_timeout": (_seconds(False), True),
    "heartbeat_seconds": (_seconds_or_off, True),
    "max_body_size": (_size_or_null, True),
    "unmapped_paths": (_choice("forward", "reject"), False),
    "routes": (_routes, True),
    "plugins_dir": (_text, False),
    "shutdown_grace": (_seconds(True), True),
    "log_level": (_choice("debug", "info", "warning", "error"), False),
    "log_format": (_choice("auto", "json", "text"), False),
    "log_headers": (_header_names, True),
    "access_log_sampling": (_sampling, True),
    "health_path": (_endpoint_path, True),
    "health_cache_seconds": (_seconds(True), True),
    "metrics_path": (_endpoint_path, True),
    "metrics_max_models": (_model_count, True),
    "status_path": (_page_path, True),
    "cors_origins": (_origins, True),
    "trusted_proxies": (_networks, True),
    "client_key_header": (_header_name_or_null, True),
    "rate_limit": (_limit, True),
    "rate_limit_routes": (_route_limits, True),
    "rate_limit_strategy": (_choice("moving-window", "fixed-window", "sliding-window-counter"), False),
    "rate_limit_storage": (_storage, False),
    "rate_limit_storage_timeout": (_seconds(False), True),
    "rate_limit_fail": (_choice("open", "closed"), False),
    "rate_limit_exempt": (_networks, True),
    "concurrency_per_client": (_count_or_null, True),
    "concurrency_total": (_count_or_null, True),
    "event_loop": (_choice("auto", "uvloop", "asyncio"), False),
    "workers": (_worker_count, True),
    "api_keys": (_api_keys, True),
    "api_keys_file": (_path_or_null, False),
    "public_paths": (_paths, True),
    "auth_failures": (_limit_text, False),
    "open": (_flag, True),
    "generated_key_file": (_path_or_null, False),
}
SECRET = frozenset({"api_keys", "upstreams"})  # never echoed in an error message (keys, pods' headers)
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@\s]*):[^@/\s]*@")


def without_password(text: str) -> str:
    """`text` with the password of any URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


# Two ways to name the pool: a source that names one replaces what an earlier source named
# with the other, and may not name both.
POOL_KEYS = ("upstream", "upstreams")


def _validate(source: str, key: str, value: Any) -> Any:
    if key not in SCHEMA:
        raise SettingsError(f"{source}: unknown key {key!r}; allowed keys: {', '.join(SCHEMA)}")
    check, _ = SCHEMA[key]
    try:
        return check(value)
    except ValueError as error:
        if key in SECRET:
            raise SettingsError(f"{source}: {key}: {error}") from None
        shown = without_password(value) if isinstance(value, str) else value  # a pod's URL may hold one
        raise SettingsError(f"{source}: {key}: expected {error}, got {shown!r}") from None


def _from_text(source: str, key: str, text: str) -> Any:
    _, is_json = SCHEMA[key]
    if not is_json:
        return _validate(source, key, text)
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return _validate(source, key, value)


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as error:
        raise SettingsError(f"{path}: cannot be read: {error.strerror}") from None
    except ValueError as error:
        raise SettingsError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: must hold a JSON object of settings")
    values = {key: _validate(path, key, value) for key, value in data.items()}
    if "plugins_dir" in values:
        # A relative folder belongs with the file that names it.
        values["plugins_dir"] = os.path.join(os.path.dirname(path), values["plugins_dir"])
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    if "PORT" in environ:
        values["port"] = _from_text("PORT", "port", environ["PORT"])
    for key in SCHEMA:
        name = ENV_PREFIX + key.upper()
        if name in environ:
            values[key] = _from_text(name, key, environ[name])
    return values


def load_settings(
    path: str | None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Settings:
    """Merge and validate every source; `path` None means ./settings.json if present."""
    if path is None and os.path.exists(DEFAULT_FILE):
        path = DEFAULT_FILE
    values: dict[str, Any] = {}
    sources = [
        (path or "", read_file(path) if path is not None else {}),
        ("the environment", read_environment(os.environ if environ is None else environ)),
        (
            "the command line",
            {key: _from_text(f"--{key.replace('_', '-')}", key, text) for key, text in (flags or {}).items()},
        ),
    ]
    for source, given in sources:
        named = [key for key in POOL_KEYS if key in given]
        if len(named) == 2:
            raise SettingsError(f"{source}: upstream and upstreams: give one (upstream is a pool of one)")
        if named:
            values.pop(POOL_KEYS[1 - POOL_KEYS.index(named[0])], None)
        values.update(given)
    return Settings(**values)
