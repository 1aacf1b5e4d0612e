"""Access keys: who may use the proxy, and for what.

A key is kept only as its SHA-256 digest, compared in constant time; its
name is what logs, metrics and the rate limiter see. Routes carry a scope
(`inference`, `manage`, `metrics`), and a key allows the scopes it lists.
Wrong keys are counted per client address through the rate limits'
storage; past the limit they are refused with 429. A valid key is always
admitted (compared first), so the limit slows scripts but does not stop the
guessing of a short key: keys must be long (start-up warns of short ones).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from limits import parse_many
from limits.aio.strategies import MovingWindowRateLimiter

from .errors import Rejection
from .headers import value_of
from .storage import SharedStorage, StorageDown

if TYPE_CHECKING:
    from .generated_key import GeneratedKey
    from .settings import Settings

INFERENCE, MANAGE, METRICS = "inference", "manage", "metrics"
SCOPES = (INFERENCE, MANAGE, METRICS)
KEY_HEADERS = ("Authorization", "X-API-Key")  # where a key may come from, in this order
REALM = 'Bearer realm="ollama-proxy"'
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/_=-]+")
STRONG_BITS = 128
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_WHOLE = re.compile(r"[0-9]{1,13}")
_FRACTION = re.compile(r"[0-9]{1,13}(?:\.[0-9]{1,13})?")


class KeyEntryError(ValueError):
    """A key entry or key file line that does not fit; the message says why."""


@dataclass(frozen=True)
class ApiKey:
    """A key by name: its SHA-256 digest (never the key), the scopes it allows, and
    roughly how many bits of secret it holds (None when only its digest was given)."""

    name: str
    digest: bytes
    scopes: frozenset[str]
    bits: float | None = None
    weight: float = 1.0  # its share of a busy pod, against other keys' (the fair queue)
    shared: bool = False  # used by several people: each address gets its own line
    tokens_per_minute: int | None = None  # its token quotas (`quota`): rolling windows
    tokens_per_day: int | None = None
    max_concurrent: int | None = None  # its generations at once: more wait in its line

    @property
    def weak(self) -> bool:
        """Shorter than 128 bits: guessable, and the wrong-key throttle must not be what protects it."""
        return self.bits is not None and self.bits < STRONG_BITS


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_entries(entries: Iterable[Any]) -> tuple[ApiKey, ...]:
    """Key entries from settings: a bare key string, or an object with `name`,
    `key` or `key_sha256`, and optional `scopes`."""
    keys = []
    for index, entry in enumerate(entries, start=1):
        try:
            keys.append(_entry(entry, index))
        except KeyEntryError as error:
            raise KeyEntryError(f"entry {index}: {error}") from None
    return _unique(keys)


def _entry(entry: Any, index: int) -> ApiKey:
    if isinstance(entry, str):
        return ApiKey(f"key-{index}", _plain(entry), frozenset(SCOPES), strength(entry))
    if not isinstance(entry, Mapping):
        raise KeyEntryError("a key string or an object with name and key or key_sha256")
    unknown = sorted(set(entry) - {"name", "key", "key_sha256", "scopes", "shared", *LIMITS})
    if unknown:
        allowed = ", ".join(("name", "key", "key_sha256", "scopes", "shared", *LIMITS))
        raise KeyEntryError(f"unknown field {unknown[0]!r}; allowed: {allowed}")
    if ("key" in entry) == ("key_sha256" in entry):
        raise KeyEntryError("needs exactly one of key and key_sha256")
    plain = "key" in entry
    digest = _plain(entry["key"]) if plain else _hex(entry["key_sha256"])
    scopes = entry.get("scopes", list(SCOPES))
    if not isinstance(scopes, list):
        raise KeyEntryError(f"scopes must be a list of {', '.join(SCOPES)}")
    shared = entry.get("shared", False)
    if not isinstance(shared, bool):
        raise KeyEntryError("shared must be true or false")
    bits = strength(entry["key"]) if plain else None
    limits = _limits({name: entry[name] for name in LIMITS if name in entry})
    return ApiKey(_name(entry.get("name")), digest, _scopes(scopes), bits, shared=shared, **limits)


# A key's share of busy pods, its token quotas and its generations at once: an entry's fields, or a key file
# line's name=value fields. Each: whether it takes a fraction, its lowest and highest.
LIMITS: dict[str, tuple[bool, float, float]] = {
    "weight": (True, 0.01, 1000),
    "tokens_per_minute": (False, 1, 10**12),
    "tokens_per_day": (False, 1, 10**12),
    "max_concurrent": (False, 1, 10**6),
}


def _limits(values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of LIMITS among `values`, checked."""
    limits: dict[str, Any] = {}
    for name, value in values.items():
        fraction, lowest, highest = LIMITS[name]
        kinds = (int, float) if fraction else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds) or not lowest <= value <= highest:
            kind = "a number" if fraction else "a whole number"
            raise KeyEntryError(f"{name} must be {kind} from {lowest:g} to {highest:g}")
        limits[name] = float(value) if fraction else value
    return limits


def parse_key_file(text: str, source: str) -> tuple[ApiKey, ...]:
    """Key file lines: ``name:key`` or ``name:sha256:<hex>``, optionally ``:scope,scope``,
    then optionally ``:name=value,...`` (weight, token quotas, max_concurrent); blank lines and ``#``
    comments are ignored. Errors name the line."""
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parts = line.split(":")
            bits = None
            if len(parts) >= 3 and parts[1] == "sha256":
                name, _, secret, *rest = parts
                digest = _hex(secret)
            elif len(parts) >= 2:
                name, secret, *rest = parts
                digest, bits = _plain(secret), strength(secret)
            else:
                raise KeyEntryError("expected name:key or name:sha256:<hex>, optionally followed by :scope,scope")
            fields = rest.pop() if rest and "=" in rest[-1] else None
            if len(rest) > 1:
                raise KeyEntryError("too many ':' (a key may not contain one)")
            scopes = _scopes(rest[0].split(",")) if rest else frozenset(SCOPES)
            keys.append(ApiKey(_name(name), digest, scopes, bits, **_fields(fields)))
        except KeyEntryError as error:
            raise KeyEntryError(f"{source}, line {number}: {error}") from None
    return tuple(keys)


def _fields(text: str | None) -> dict[str, Any]:
    """A key file line's ``name=value,name=value`` fields: those of LIMITS."""
    values: dict[str, Any] = {}
    for field in text.split(",") if text else ():
        name, _, value = field.partition("=")
        if name not in LIMITS:
            raise KeyEntryError(f"unknown field {name!r}; allowed: {', '.join(LIMITS)}")
        fraction = LIMITS[name][0]
        values[name] = value  # as written, unless it is a number in ASCII digits (`_limits` names the field)
        if (_FRACTION if fraction else _WHOLE).fullmatch(value):  # int() would read "1_000", "١٢"
            values[name] = float(value) if fraction else int(value)
    return _limits(values)


def strength(key: str) -> float:
    """Bits of secret a key could hold, by its length and the smallest alphabet it
    fits (hex, base64, printable): an upper bound, enough to warn about short keys."""
    if _HEX.fullmatch(key):
        per_character = 4.0
    elif _BASE64.fullmatch(key):
        per_character = 6.0
    else:
        per_character = math.log2(95)
    return len(key) * per_character


def _plain(key: Any) -> bytes:
    if not isinstance(key, str) or not key.strip() or key != key.strip():
        raise KeyEntryError("a key must be a non-empty string without surrounding spaces")
    return digest_of(key)


def _hex(value: Any) -> bytes:
    if not isinstance(value, str) or not _HEX_DIGEST.fullmatch(value.lower()):
        raise KeyEntryError("key_sha256 must be 64 hexadecimal digits")
    return bytes.fromhex(value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise KeyEntryError(f"name {value!r} must be 1 to 64 of A-Z a-z 0-9 . _ @ -")
    return value


def _scopes(values: list[Any]) -> frozenset[str]:
    scopes = frozenset(values)
    if not scopes or not scopes <= set(SCOPES):
        raise KeyEntryError(f"scopes {values!r} must be some of {', '.join(SCOPES)}")
    return scopes


def _unique(keys: list[ApiKey]) -> tuple[ApiKey, ...]:
    seen: set[str] = set()
    for key in keys:
        if key.name in seen:
            raise KeyEntryError(f"the name {key.name!r} is given to two keys")
        seen.add(key.name)
    return tuple(keys)


def offered_key(headers: Mapping[str, str]) -> str | None:
    """The key a request offers: ``Authorization: Bearer <key>``, else ``X-API-Key``."""
    authorization = value_of(headers, "Authorization")
    if authorization is not None:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
    return value_of(headers, "X-API-Key") or None


def load_keys(keys: Iterable[ApiKey], key_file: str | None) -> tuple[ApiKey, ...]:
    """The keys from settings and from the key file, if any (`KeyEntryError` naming the line)."""
    from_file: tuple[ApiKey, ...] = ()
    if key_file is not None:
        try:
            with open(key_file, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise KeyEntryError(f"{key_file}: cannot be read: {getattr(error, 'strerror', None) or error}") from None
        from_file = parse_key_file(text, key_file)
    return _unique([*keys, *from_file])


class KeyAuthenticator:
    """The built-in authenticator: access keys with scopes, wrong keys limited per address."""

    removed_headers = KEY_HEADERS  # never sent upstream

    def __init__(self, keys: Iterable[ApiKey], settings: Settings, generated: GeneratedKey | None = None):
        self.keys = tuple(keys)
        self.generated = generated  # the key made for a public address, which start-up tells of
        self.public_paths = frozenset(settings.public_paths)
        self.failures = parse_many(settings.auth_failures)
        self.shared = SharedStorage(
            settings.rate_limit_storage, settings.rate_limit_storage_timeout, "failed key attempts not counted"
        )
        self.limiter = MovingWindowRateLimiter(self.shared.storage)

    @property
    def names(self) -> list[str]:
        return [key.name for key in self.keys]

    async def authenticate(self, headers: Mapping[str, str], path: str, scope: str, client: str) -> str | None:
        """The name of the key the request acts with (None on a public path), or a
        `Rejection`: 401 without a valid key, 403 without the scope, 429 for a wrong
        key once the client's wrong keys are over the limit.

        A valid key is always admitted: it is compared first, so that no number of
        bad requests from a shared address (behind Runpod, every user's) locks its
        holders out. A missing key is not a guess and is not counted.
        """
        if path in self.public_paths:
            return None
        offered = offered_key(headers)
        if offered is None:
            raise Unauthorized("missing")
        key = self._match(digest_of(offered))
        if key is None:
            await self._count_failure(client)
            raise Unauthorized("invalid")
        if scope not in key.scopes:
            raise Forbidden(key.name, f"the key {key.name!r} may not use {path}: it needs the {scope} scope")
        return key.name

    def _match(self, digest: bytes) -> ApiKey | None:
        """Compare with every key, in constant time: how long it takes says nothing of which matched."""
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found

    async def _count_failure(self, client: str) -> None:
        """Count a wrong key against every limit; `Throttled` past one. A storage
        outage counts nothing and refuses nobody."""
        try:
            refusal = await self.shared.call(lambda: self._hit(client))
        except StorageDown:
            return
        if refusal is not None:
            raise refusal

    async def _hit(self, client: str) -> Throttled | None:
        for item in self.failures:
            if not await self.limiter.hit(item, "auth", client):
                stats = await self.limiter.get_window_stats(item, "auth", client)
                return Throttled(max(1, math.ceil(stats.reset_time - time.time())), str(item))
        return None


class Unauthorized(Rejection):
    """No key, or a key that matches none (`reason` says which)."""

    def __init__(self, reason: str):
        super().__init__(
            401, "missing or invalid API key: send Authorization: Bearer <key>", {"WWW-Authenticate": REALM}
        )
        self.reason = reason


class Forbidden(Rejection):
    """A valid key without the route's scope; `name` is the key's."""

    reason = "scope"

    def __init__(self, name: str, message: str):
        super().__init__(403, message)
        self.name = name


class Throttled(Rejection):
    """Too many wrong keys from this address."""

    reason = "throttled"

    def __init__(self, retry: int, limit: str):
        super().__init__(
            429, f"too many wrong keys from this address ({limit}); retry in {retry} s", {"Retry-After": str(retry)}
        )
