"""Token quotas per access key: rolling windows of tokens, reserved before a generation
goes to its pod and settled with Ollama's own counts when it ends.

Reserve, then settle: a request's estimate (its prompt, erring high, plus the
output it may produce) is taken from every window of its key at once and
atomically (in memory, or in Redis with one script, so that several proxies
share one quota exactly), and its output is capped to what was granted, so the
generation stops in time. When it ends the reservation is replaced by what it
used. Each window is kept in buckets (a second for a minute, a minute for a
day): a bucket counts while any of it is inside the window, so the windows err
on the side of the quota.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from typing import TYPE_CHECKING, Any, cast

import coredis

from .errors import Rejection
from .peer_json import json_object
from .routes import router_path
from .storage import StorageCalls, StorageDown

if TYPE_CHECKING:
    from .auth import ApiKey
    from .settings import Settings

log = logging.getLogger(__name__)

PREFIX = "{ollama-proxy}:quota"  # one hash slot, for a Redis cluster too
NEVER = 1 << 62  # tokens no window holds
# A key entry's quota settings: the window each one limits, and its bucket, in seconds.
WINDOWS = {"tokens_per_minute": (60, 1), "tokens_per_day": (86400, 60)}
CHARACTERS_PER_TOKEN = 3  # fewer than most tokenizers' 4: a quota's estimate errs high
TOKENS_PER_MESSAGE = 4  # the chat template's own tokens around each message
TEMPLATE_TOKENS = 16  # and around the whole prompt
IMAGE_PARTS = ("image_url", "image", "input_image")  # OpenAI's, Anthropic's and the Responses API's
# What in a body is not the model's context: which model, how long to keep it, how to answer.
UNCOUNTED = frozenset(
    {
        "model",
        "keep_alive",
        "stream",
        "stream_options",
        "options",
        *("max_tokens", "max_completion_tokens", "max_output_tokens"),
    }
)
# Where each generating path (as it goes upstream) takes its output limit; embeddings have none.
OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "/api/generate": ("options", "num_predict"),
    "/api/chat": ("options", "num_predict"),
    "/v1/chat/completions": ("max_tokens",),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}
OUTPUT_NAMES = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # /v1's, of every API
# Every path a quota counts, as it goes upstream (so an alias counts as what it calls).
COUNTED = frozenset({*OUTPUT_FIELDS, "/api/embed", "/api/embeddings", "/v1/embeddings"})


def counted_path(target: str) -> str | None:
    """The path a quota counts a request target (as it goes upstream) by, decoded as
    Ollama's router decodes it (`/api/%67enerate` is `/api/generate`); None if it counts none."""
    path = router_path(target)
    return path if path in COUNTED else None


@dataclass(frozen=True, slots=True)
class Window:
    """One of a key's limits: `limit` tokens in any `seconds`, counted in buckets of `bucket` seconds."""

    name: str
    seconds: int
    bucket: int
    limit: int


def windows_of(key: ApiKey) -> tuple[Window, ...]:
    """The windows a key's entry sets (none: no quota)."""
    return tuple(
        Window(name, seconds, bucket, limit)
        for name, (seconds, bucket) in WINDOWS.items()
        if (limit := getattr(key, name)) is not None
    )


# -- what a request asks for ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ask:
    """A generation as its quota sees it: its prompt's estimated tokens, the output it asks
    for (None: no limit of its own), and its body read (None: not a JSON object)."""

    prompt: int
    output: int | None
    data: dict[str, Any] | None


def read_ask(path: str, body: bytes | None, image_tokens: int) -> Ask:
    """What a body asks of a quota: every text in it (prompt, messages, system, tools,
    format, whatever Ollama puts in the model's context) at characters / 3, a token per
    number (a `context` of token ids), a few tokens per message and for the template,
    `image_tokens` per image (not its base64 length); and the output limit it sets in
    its path's own terms (Ollama ignores the other API's)."""
    data = json_object(body) if body else None
    if data is None:
        return Ask(len(body or b"") // CHARACTERS_PER_TOKEN + TEMPLATE_TOKENS, None, None)
    characters, tokens = _weigh(data, image_tokens)
    messages = data.get("messages")
    tokens += TOKENS_PER_MESSAGE * len(messages) if isinstance(messages, list) else 0
    return Ask(characters // CHARACTERS_PER_TOKEN + tokens + TEMPLATE_TOKENS, _asked_output(path, data), data)


def _weigh(data: dict[str, Any], image_tokens: int) -> tuple[int, int]:
    """The characters of every text in a body, and the tokens of its numbers and images.
    Walked without recursion: a body may nest as deep as the parser allowed."""
    characters = tokens = 0
    pending: list[Any] = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            characters += len(value)
        elif isinstance(value, dict):
            if value.get("type") in IMAGE_PARTS:
                tokens += image_tokens
                continue
            for name, item in value.items():
                if name == "images" and isinstance(item, list):
                    tokens += image_tokens * len(item)
                elif name not in UNCOUNTED:
                    pending.append(item)
        elif isinstance(value, list):
            pending.extend(value)
        elif value is not None and not isinstance(value, bool):
            tokens += 1
    return characters, tokens


def _asked_output(path: str, data: dict[str, Any]) -> int | None:
    fields = OUTPUT_FIELDS.get(path)
    if fields is None:
        return None
    if fields[0] == "options":
        options = data.get("options")
        value = options.get("num_predict") if isinstance(options, dict) else None
    else:
        value = data.get("max_completion_tokens", data.get(fields[0]))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def capped(path: str, data: dict[str, Any], output: int) -> dict[str, Any]:
    """The body with its output limited to `output` tokens, in its path's terms, and no
    other spelling of those fields: Go's JSON decoder, Ollama's, takes `"MAX_TOKENS"` or
    `"Options"` for the field too, and the last one it meets wins."""
    fields = OUTPUT_FIELDS[path]
    if fields[0] == "options":
        options = data.get("options")
        options = _only(options if isinstance(options, dict) else {}, "num_predict")
        return {**_only(data, "options"), "options": {**options, "num_predict": output}}
    limited = {**_only(data, *OUTPUT_NAMES), fields[0]: output}
    if "max_completion_tokens" in data:
        limited["max_completion_tokens"] = output
    return limited


def _only(data: dict[str, Any], *names: str) -> dict[str, Any]:
    """`data` without the keys that spell one of `names` in other letter cases."""
    return {key: value for key, value in data.items() if key in names or key.lower() not in names}


# -- the ledger --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Taken:
    """A storage's answer to a reservation: the tokens granted (0: refused), each window's
    use before it, and, when refused, each window's buckets (to tell when enough frees)."""

    granted: int
    used: tuple[int, ...]
    buckets: tuple[dict[int, int], ...] = ()


class MemoryTokens:
    """A process's own windows: bucket start -> tokens, per key and window."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[int, int]] = {}

    async def take(self, name: str, windows: Sequence[Window], need: int, want: int, now: int) -> Taken:
        held = [self.buckets.setdefault(f"{name}:{window.name}", {}) for window in windows]
        used = []
        for window, buckets in zip(windows, held, strict=True):
            for stamp in [stamp for stamp in buckets if stamp + window.bucket <= now - window.seconds]:
                del buckets[stamp]
            used.append(sum(buckets.values()))
        granted = min(want, *(window.limit - use for window, use in zip(windows, used, strict=True)))
        if granted < need:
            return Taken(0, tuple(used), tuple(dict(buckets) for buckets in held))
        for window, buckets in zip(windows, held, strict=True):
            stamp = now - now % window.bucket
            buckets[stamp] = buckets.get(stamp, 0) + granted
        return Taken(granted, tuple(used))

    async def give(self, name: str, windows: Sequence[Window], stamps: Sequence[int], change: int) -> None:
        for window, stamp in zip(windows, stamps, strict=True):
            buckets = self.buckets[f"{name}:{window.name}"]
            if stamp in buckets:  # else it has left the window: nothing to correct
                buckets[stamp] += change


# KEYS: a hash per window. ARGV: now, need, want, then seconds, bucket, limit per window.
# Drops buckets that have left their window, and grants min(want, what every window has
# left) when that is at least `need`: {granted, used...}; else {0, used, buckets, ...}.
_TAKE = """
local now, need, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local used, granted = {}, want
for i, key in ipairs(KEYS) do
  local seconds, bucket, limit = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  local flat, sum = redis.call('HGETALL', key), 0
  for j = 1, #flat, 2 do
    if tonumber(flat[j]) + bucket <= now - seconds then
      redis.call('HDEL', key, flat[j])
    else
      sum = sum + tonumber(flat[j + 1])
    end
  end
  used[i] = sum
  granted = math.min(granted, limit - sum)
end
if granted < need then
  local answer = {0}
  for i, key in ipairs(KEYS) do
    table.insert(answer, used[i])
    table.insert(answer, redis.call('HGETALL', key))
  end
  return answer
end
for i, key in ipairs(KEYS) do
  local seconds, bucket = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  redis.call('HINCRBY', key, now - now % bucket, granted)
  redis.call('EXPIRE', key, seconds + bucket)
end
return {granted, unpack(used)}
"""

# KEYS: a hash per window. ARGV: the change, then the bucket each window charged.
_GIVE = """
for i, key in ipairs(KEYS) do
  if redis.call('HEXISTS', key, ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', key, ARGV[i + 1], ARGV[1])
  end
end
"""


class RedisTokens:
    """Windows every proxy sharing one Redis keeps together: a hash per key and window."""

    def __init__(self, url: str) -> None:
        redis = coredis.Redis.from_url(url, decode_responses=True)
        self.take_script = redis.register_script(_TAKE)
        self.give_script = redis.register_script(_GIVE)

    async def take(self, name: str, windows: Sequence[Window], need: int, want: int, now: int) -> Taken:
        arguments: list[coredis.typing.ValueT] = [now, need, want]
        for window in windows:
            arguments += [window.seconds, window.bucket, window.limit]
        answer = cast(list[Any], await self.take_script(keys=_keys(name, windows), args=arguments))
        if answer[0]:
            return Taken(int(answer[0]), tuple(int(use) for use in answer[1:]))
        pairs = answer[1:]
        return Taken(
            0,
            tuple(int(use) for use in pairs[::2]),
            tuple(
                {int(stamp): int(tokens) for stamp, tokens in zip(flat[::2], flat[1::2], strict=True)}
                for flat in pairs[1::2]
            ),
        )

    async def give(self, name: str, windows: Sequence[Window], stamps: Sequence[int], change: int) -> None:
        await self.give_script(keys=_keys(name, windows), args=[change, *stamps])


def _keys(name: str, windows: Sequence[Window]) -> list[coredis.typing.KeyT]:
    return [f"{PREFIX}:{name}:{window.name}" for window in windows]


def retry_after(window: Window, buckets: dict[int, int], room: int, need: int, now: int) -> int:
    """Seconds until `need` tokens (at most its limit) fit in `window`, which has `room`
    left now (its limit less its buckets): its oldest buckets leave first."""
    stamps = sorted(buckets)
    freed = accumulate(buckets[stamp] for stamp in stamps)
    enough = next(index for index, tokens in enumerate(freed) if room + tokens >= need)
    return max(1, stamps[enough] + window.bucket + window.seconds - now)


def duration(seconds: float) -> str:
    """OpenAI's form of a wait in its rate-limit headers (Go's): `1m30s`, `6s`, `250ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, minutes, rest = whole // 3600, whole % 3600 // 60, whole % 60
    if hours:
        return f"{hours}h{minutes}m{rest}s"
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


# -- a request's reservation -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """A quota's answer to a request: what it holds (None while the storage is down and
    failing open), its body with the output capped to it (None: as it was), and the
    answer's rate-limit headers."""

    reservation: Reservation | None
    body: bytes | None
    headers: dict[str, str]


class Reservation:
    """What one request holds of its key's windows, until it is settled (once)."""

    def __init__(
        self, quotas: Quotas, name: str, windows: tuple[Window, ...], stamps: tuple[int, ...], granted: int, prompt: int
    ):
        self.quotas = quotas
        self.name = name
        self.windows = windows
        self.stamps = stamps  # the bucket each window charged
        self.granted = granted
        self.prompt = prompt  # its prompt's estimate
        self.settled = False

    def settle(self, used: int) -> None:
        """The request has ended having used `used` tokens: the windows are corrected."""
        if not self.settled:
            self.settled = True
            self.quotas.correct(self, used - self.granted)


class Quotas:
    """The keys' token quotas, in memory or in the rate limits' Redis."""

    def __init__(self, settings: Settings) -> None:
        storage = settings.rate_limit_storage
        self.tokens = MemoryTokens() if storage.startswith("memory") else RedisTokens(storage)
        self.default_output = settings.quota_default_output_tokens
        self.image_tokens = settings.quota_image_tokens
        self.fail_closed = settings.rate_limit_fail == "closed"
        effect = "token quotas refused (503)" if self.fail_closed else "token quotas not enforced"
        self.calls = StorageCalls(settings.rate_limit_storage_timeout, effect)
        self.corrections: set[asyncio.Future[None]] = set()

    async def reserve(self, key: ApiKey, path: str, body: bytes | None) -> Grant:
        """Reserve what a request to `path` (as it goes upstream) may use of `key`'s
        windows, and cap its output to what was granted. `QuotaExceeded` (429) when not
        even its prompt fits."""
        windows = windows_of(key)
        if not windows:
            return Grant(None, None, {})
        ask = read_ask(path, body, self.image_tokens)
        if body and ask.data is None:  # what the proxy cannot read, it cannot cap
            raise Rejection(400, f"a request that a token quota counts must send a JSON object to {path}")
        caps = path in OUTPUT_FIELDS
        need = ask.prompt + 1 if caps else ask.prompt  # a generation produces a token at least
        want = ask.prompt + (ask.output or self.default_output if caps else 0)
        tightest = min(windows, key=lambda window: window.limit)
        if need > tightest.limit:
            raise QuotaExceeded(
                f"this request's prompt (about {ask.prompt} tokens) is larger than the {_named(tightest)}"
                f" ({tightest.limit}) of key {key.name!r}",
                tightest.name,
            )
        now = int(time.time())
        try:
            taken = await self.calls.call(lambda: self.tokens.take(key.name, windows, need, want, now))
        except StorageDown as down:
            if self.fail_closed:
                raise QuotaExceeded(down.reason, "storage", 503, {"Retry-After": "1"}) from None
            return Grant(None, None, {})
        rooms = [window.limit - use for window, use in zip(windows, taken.used, strict=True)]
        if not taken.granted:
            full = [
                (window, buckets, room)
                for window, buckets, room in zip(windows, taken.buckets, rooms, strict=True)
                if room < need
            ]
            retry = max(retry_after(window, buckets, room, need, now) for window, buckets, room in full)
            raise QuotaExceeded(
                f"key {key.name!r} has used its {_named(full[0][0])} ({full[0][0].limit}); retry in {retry} s",
                full[0][0].name,
                429,
                {"Retry-After": str(retry), **_headers(windows, rooms, retry)},
            )
        stamps = tuple(now - now % window.bucket for window in windows)
        reservation = Reservation(self, key.name, windows, stamps, taken.granted, ask.prompt)
        output = min(taken.granted - ask.prompt, ask.output or taken.granted)
        body_out = json.dumps(capped(path, ask.data, output)).encode() if caps and ask.data is not None else None
        return Grant(reservation, body_out, _headers(windows, [room - taken.granted for room in rooms]))

    async def usage(self, keys: Iterable[ApiKey]) -> list[dict[str, Any]]:
        """Each quota key's use of its windows now, for the status page (none while the
        storage is down). A look is a reservation of what never fits: it takes nothing."""
        now = int(time.time())
        rows = []
        for key in keys:
            windows = windows_of(key)
            if windows:
                try:
                    taken = await self.calls.call(partial(self.tokens.take, key.name, windows, NEVER, 0, now))
                except StorageDown:
                    return []
                rows += [
                    {"key": key.name, "window": window.name, "used": use, "limit": window.limit}
                    for window, use in zip(windows, taken.used, strict=True)
                ]
        return rows

    def correct(self, reservation: Reservation, change: int) -> None:
        """Replace a reservation's estimate by what was used, in the background (an end
        waits for nothing); a failure is the outage log's."""
        if not change:
            return
        correction = asyncio.ensure_future(
            self.calls.call(lambda: self.tokens.give(reservation.name, reservation.windows, reservation.stamps, change))
        )
        self.corrections.add(correction)
        correction.add_done_callback(self._corrected)

    def _corrected(self, correction: asyncio.Future[None]) -> None:
        self.corrections.discard(correction)
        correction.exception()  # StorageDown, logged by the call: nothing more to do


class QuotaExceeded(Rejection):
    """A refusal by a key's quota; `reason` (the window, or the storage) labels the metric."""

    def __init__(self, message: str, reason: str, status: int = 429, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers or {})
        self.reason = reason


def _named(window: Window) -> str:
    return window.name.replace("_", " ")


def _headers(windows: Sequence[Window], rooms: Sequence[int], reset: float | None = None) -> dict[str, str]:
    """OpenAI's token rate-limit headers, for the window with least left (its reset: when
    it is whole again, a window's length after its latest use, unless told)."""
    window, room = min(zip(windows, rooms, strict=True), key=lambda pair: pair[1])
    return {
        "x-ratelimit-limit-tokens": str(window.limit),
        "x-ratelimit-remaining-tokens": str(max(0, room)),
        "x-ratelimit-reset-tokens": duration(window.seconds if reset is None else reset),
    }
