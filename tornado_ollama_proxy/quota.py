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
import math
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from contextlib import suppress
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
    from .routes import Route
    from .settings import Settings


PREFIX = "{ollama-proxy}:quota"  # one hash slot, for a Redis cluster too
TICKET_LIVES = 300  # seconds a reservation's ticket is kept in Redis: the longest stall it covers
NEVER = 1 << 62  # tokens no window holds
# A body is parsed and weighed before it goes: at most this many values (commas, arrays,
# objects; counted at C speed first), so that one body cannot hold the event loop long.
VALUES_MAX = 1 << 18
# A key entry's quota settings: the window each one limits, and its bucket, in seconds.
WINDOWS = {"tokens_per_minute": (60, 1), "tokens_per_day": (86400, 60)}
CHARACTERS_PER_TOKEN = 3  # fewer than most tokenizers' 4: a quota's estimate errs high
TOKENS_PER_MESSAGE = 4  # the chat template's own tokens around each message
TEMPLATE_TOKENS = 16  # and around the whole prompt
IMAGE_PARTS = ("image_url", "image", "input_image")  # OpenAI's, Anthropic's and the Responses API's
# What in a body (at its top) is not the model's context: which model, how long to keep it,
# how to answer.
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


def uncounted_read(route: Route) -> bool:
    """Whether a route only reads (what the server has, a model's details): no quota
    needs to count it."""
    return route.path == "/api/show" or set(route.methods) <= {"GET", "HEAD"}


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
    format, whatever Ollama may put in the model's context) at UTF-8 bytes / 3, a token
    per number (a `context` of token ids), a few tokens per message and for the template,
    `image_tokens` per image (not its base64 length); and the output limit it sets in its
    path's own terms (Ollama ignores the other API's)."""
    data = json_object(body) if body else None
    if data is None:
        return Ask(len(body or b"") // CHARACTERS_PER_TOKEN + TEMPLATE_TOKENS, None, None)
    counted: list[Any] = []  # what is weighed as it is
    images = 0
    for name, value in data.items():
        if name in UNCOUNTED:
            continue
        if name == "images" and isinstance(value, list):
            images += len(value)
        elif name in ("messages", "input") and isinstance(value, list):
            for message in value:
                images += _message(message, counted)
        else:
            counted.append(value)
    messages = data.get("messages")
    tokens = TOKENS_PER_MESSAGE * len(messages) if isinstance(messages, list) else 0
    size, numbers = _weigh(counted)
    prompt = size // CHARACTERS_PER_TOKEN + numbers + tokens + TEMPLATE_TOKENS + images * image_tokens
    return Ask(prompt, _asked_output(path, data), data)


def _message(message: Any, counted: list[Any]) -> int:
    """The images of a message (or of an item of the Responses API's input), its other
    parts put in `counted`. Images are a message's `images` (Ollama's) and the parts of
    its content list whose type says image: nothing else is one (Ollama reads a
    message's own `type` as nothing)."""
    if not isinstance(message, dict):
        counted.append(message)
        return 0
    images = 0
    for name, value in message.items():
        if name == "images" and isinstance(value, list):
            images += len(value)
        elif name == "content" and isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                    images += 1
                else:
                    counted.append(part)
        else:
            counted.append(value)
    return images


def _weigh(values: list[Any]) -> tuple[int, int]:
    """The UTF-8 bytes of every text in `values`, and how many numbers. Walked without
    recursion: a body may nest as deep as the parser allowed."""
    size = numbers = 0
    pending = values
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            size += len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif value is not None and not isinstance(value, bool):
            numbers += 1
    return size, numbers


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
    """`data` without the keys that spell one of `names` otherwise: in other letter cases,
    or with letters that fold to theirs as Go folds them (a long s is an s, the Kelvin sign a k)."""
    return {key: value for key, value in data.items() if key in names or key.casefold() not in names}


# -- the ledger --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Taken:
    """A storage's answer to a reservation: the tokens granted (0: refused), its clock's
    second, each window's use before it, and, when refused, each window's buckets (to
    tell when enough frees)."""

    granted: int
    now: int
    used: tuple[int, ...]
    buckets: tuple[dict[int, int], ...] = ()
    ticket: str = ""  # Redis's name for the reservation


class MemoryTokens:
    """A process's own windows: bucket start -> tokens, per key and window."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[int, int]] = {}

    async def take(self, name: str, windows: Sequence[Window], need: int, want: int, now: int | None = None) -> Taken:
        """Grant min(want, what every window has left) when that is at least `need`;
        `now`: this machine's clock unless told."""
        now = int(time.time()) if now is None else now
        held = [self.buckets.setdefault(f"{name}:{window.name}", {}) for window in windows]
        used = []
        for window, buckets in zip(windows, held, strict=True):
            for stamp in [stamp for stamp in buckets if stamp + window.bucket <= now - window.seconds]:
                del buckets[stamp]
            used.append(sum(buckets.values()))
        granted = min(want, *(window.limit - use for window, use in zip(windows, used, strict=True)))
        if granted < need:
            return Taken(0, now, tuple(used), tuple(dict(buckets) for buckets in held))
        for window, buckets in zip(windows, held, strict=True):
            stamp = now - now % window.bucket
            buckets[stamp] = buckets.get(stamp, 0) + granted
        return Taken(granted, now, tuple(used))

    async def give(self, name: str, windows: Sequence[Window], stamps: Sequence[int], change: int, _: str) -> None:
        for window, stamp in zip(windows, stamps, strict=True):
            buckets = self.buckets[f"{name}:{window.name}"]
            if stamp in buckets:  # else it has left the window: nothing to correct
                buckets[stamp] += change


# KEYS: a hash per window, then this reservation's ticket. ARGV: now ('' for Redis's own
# clock, one for every proxy), need, want, then seconds, bucket, limit per window. Drops
# buckets that have left their window, and grants min(want, what every window has left)
# when that is at least `need`: {granted, now, used...}, noting the grant on its ticket;
# else {0, now, used, buckets, ...}. A ticket its proxy gave up on is granted nothing.
_TAKE = """
local ticket = KEYS[#KEYS]
local now = tonumber(ARGV[1] == '' and redis.call('TIME')[1] or ARGV[1])
if redis.call('EXISTS', ticket) == 1 then
  return {0, now}
end
local need, want = tonumber(ARGV[2]), tonumber(ARGV[3])
local used, granted = {}, want
for i = 1, #KEYS - 1 do
  local key = KEYS[i]
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
  local answer = {0, now}
  for i = 1, #KEYS - 1 do
    table.insert(answer, used[i])
    table.insert(answer, redis.call('HGETALL', KEYS[i]))
  end
  return answer
end
local noted = {granted}
for i = 1, #KEYS - 1 do
  local seconds, bucket = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  redis.call('HINCRBY', KEYS[i], now - now % bucket, granted)
  redis.call('EXPIRE', KEYS[i], seconds + bucket)
  table.insert(noted, now - now % bucket)
end
redis.call('SET', ticket, table.concat(noted, ' '), 'EX', TICKET_LIVES)
return {granted, now, unpack(used)}
"""

# KEYS: a hash per window, then the ticket. ARGV: the change, then the bucket each window
# charged. Corrects the buckets still in their window; the ticket is done with.
_GIVE = """
for i = 1, #KEYS - 1 do
  if redis.call('HEXISTS', KEYS[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[i], ARGV[i + 1], ARGV[1])
  end
end
redis.call('DEL', KEYS[#KEYS])
"""

# KEYS: a hash per window, then the ticket of a reservation its proxy gave up waiting for.
# Takes back what it was granted, if it ran; else marks it, so that it grants nothing.
_UNDO = """
local ticket = KEYS[#KEYS]
local noted = redis.call('GET', ticket)
redis.call('SET', ticket, 'given up', 'EX', TICKET_LIVES)
if not noted or noted == 'given up' then
  return
end
local granted, i = nil, 0
for value in string.gmatch(noted, '%d+') do
  if granted == nil then
    granted = value
  else
    i = i + 1
    if redis.call('HEXISTS', KEYS[i], value) == 1 then
      redis.call('HINCRBY', KEYS[i], value, -granted)
    end
  end
end
"""


class RedisTokens:
    """Windows every proxy sharing one Redis keeps together: a hash per key and window.

    Each reservation has a ticket: a proxy that gave up waiting for Redis (a timeout)
    may not know whether its reservation ran, so it takes it back by its ticket, which
    works whichever of the two Redis runs first."""

    def __init__(self, url: str) -> None:
        redis = coredis.Redis.from_url(url, decode_responses=True)
        lives = str(TICKET_LIVES)
        self.take_script = redis.register_script(_TAKE.replace("TICKET_LIVES", lives))
        self.give_script = redis.register_script(_GIVE)
        self.undo_script = redis.register_script(_UNDO.replace("TICKET_LIVES", lives))
        self.undoing: set[asyncio.Future[Any]] = set()

    async def take(self, name: str, windows: Sequence[Window], need: int, want: int, now: int | None = None) -> Taken:
        """As `MemoryTokens.take`, atomically, on Redis's clock unless told."""
        arguments: list[coredis.typing.ValueT] = ["" if now is None else now, need, want]
        for window in windows:
            arguments += [window.seconds, window.bucket, window.limit]
        ticket = f"{PREFIX}:ticket:{secrets.token_hex(12)}"
        keys = [*_keys(name, windows), ticket]
        try:
            answer = cast(list[Any], await self.take_script(keys=keys, args=arguments))
        except BaseException:  # a timeout, or Redis gone: it may run yet, or have run
            undo = asyncio.ensure_future(self.undo_script(keys=keys))
            self.undoing.add(undo)
            undo.add_done_callback(self._undone)
            raise
        granted, now = int(answer[0]), int(answer[1])
        if granted:
            return Taken(granted, now, tuple(int(use) for use in answer[2:]), ticket=ticket)
        pairs = answer[2:]
        return Taken(
            0,
            now,
            tuple(int(use) for use in pairs[::2]),
            tuple(
                {int(stamp): int(tokens) for stamp, tokens in zip(flat[::2], flat[1::2], strict=True)}
                for flat in pairs[1::2]
            ),
        )

    def _undone(self, undo: asyncio.Future[Any]) -> None:
        self.undoing.discard(undo)
        with suppress(asyncio.CancelledError):
            undo.exception()  # Redis is down: then the reservation did not run either

    async def give(self, name: str, windows: Sequence[Window], stamps: Sequence[int], change: int, ticket: str) -> None:
        await self.give_script(keys=[*_keys(name, windows), ticket], args=[change, *stamps])


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
    failing open), its body with the output capped to it (None: as it was), the answer's
    rate-limit headers, and whether the proxy asked for a stream's usage event for itself
    (the client did not: it is taken out of the answer, see `strip_usage_event`)."""

    reservation: Reservation | None
    body: bytes | None
    headers: dict[str, str]
    asked_usage: bool = False


# The event a /v1 stream ends with when asked for its usage: no choices, the counts.
_USAGE_EVENT = re.compile(rb'data: \{[^\n]*"choices":\s*\[\],[^\n]*"usage":[^\n]*\}\n\n')
STREAMED_USAGE = ("/v1/chat/completions", "/v1/completions")  # what asks with stream_options


def ask_for_usage(data: dict[str, Any]) -> dict[str, Any] | None:
    """A streamed /v1 body that does not ask for its usage event, asking for it (None when
    it asks already, or is not streamed): its tokens are then counted, not guessed."""
    options = data.get("stream_options")
    options = options if isinstance(options, dict) else {}
    if data.get("stream") is not True or options.get("include_usage") is True:
        return None
    return {**_only(data, "stream_options"), "stream_options": {**options, "include_usage": True}}


def strip_usage_event(piece: bytes) -> bytes:
    """A piece of a /v1 stream without the usage event its client did not ask for (many
    clients read `choices[0]` of every event). Ollama writes each event on its own, so an
    event is found whole in a piece."""
    return _USAGE_EVENT.sub(b"", piece)


class Reservation:
    """What one request holds of its key's windows, until it is settled (once)."""

    def __init__(self, quotas: Quotas, name: str, windows: tuple[Window, ...], taken: Taken, prompt: int):
        self.quotas = quotas
        self.name = name
        self.windows = windows
        self.stamps = tuple(taken.now - taken.now % window.bucket for window in windows)  # the buckets charged
        self.granted = taken.granted
        self.ticket = taken.ticket
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
        if body and sum(map(body.count, (b",", b"[", b"{"))) > VALUES_MAX:
            raise Rejection(413, f"a request that a token quota counts may hold at most {VALUES_MAX} JSON values")
        ask = read_ask(path, body, self.image_tokens)
        if body and ask.data is None:  # what the proxy cannot read, it cannot cap
            raise Rejection(400, f"a request that a token quota counts must send a JSON object to {path}")
        caps = path in OUTPUT_FIELDS
        need = ask.prompt + 1 if caps else ask.prompt  # a generation produces a token at least
        want = ask.prompt + (ask.output or self.default_output if caps else 0)
        tightest = min(windows, key=lambda window: window.limit)
        if need > tightest.limit:  # it never fits: not a wait, a request to change
            raise Rejection(
                400,
                f"this request's prompt (about {ask.prompt} tokens) is larger than the {_named(tightest)}"
                f" ({tightest.limit}) of key {key.name!r}",
            )
        try:
            taken = await self.calls.call(lambda: self.tokens.take(key.name, windows, need, want))
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
            retry = max(retry_after(window, buckets, room, need, taken.now) for window, buckets, room in full)
            raise QuotaExceeded(
                f"key {key.name!r} has used its {_named(full[0][0])} ({full[0][0].limit}); retry in {retry} s",
                full[0][0].name,
                429,
                {"Retry-After": str(retry), **_headers(windows, rooms, retry)},
            )
        reservation = Reservation(self, key.name, windows, taken, ask.prompt)
        headers = _headers(windows, [room - taken.granted for room in rooms])
        if not caps or ask.data is None:
            return Grant(reservation, None, headers)
        data = capped(path, ask.data, min(taken.granted - ask.prompt, ask.output or taken.granted))
        asking = ask_for_usage(data) if path in STREAMED_USAGE else None
        return Grant(reservation, json.dumps(asking or data).encode(), headers, asking is not None)

    async def usage(self, keys: Iterable[ApiKey]) -> list[dict[str, Any]]:
        """Each quota key's use of its windows now, for the status page (none while the
        storage is down). A look is a reservation of what never fits: it takes nothing."""
        rows = []
        for key in keys:
            windows = windows_of(key)
            if windows:
                try:
                    taken = await self.calls.call(partial(self.tokens.take, key.name, windows, NEVER, 0))
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
            self.calls.call(
                lambda: self.tokens.give(
                    reservation.name, reservation.windows, reservation.stamps, change, reservation.ticket
                )
            )
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
