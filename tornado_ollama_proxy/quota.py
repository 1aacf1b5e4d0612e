"""Token quotas per access key: rolling windows of tokens, reserved before a generation
goes to its pod and settled with Ollama's own counts when it ends.

Reserve, then settle: a request's estimate (`quota_ask`: its prompt, erring high,
plus the output it may produce) is taken from every window of its key at once and
atomically (`token_windows`: in memory, or in Redis with one script, so that several
proxies share one quota exactly), and its output is capped to what was granted, so
the generation stops in time. When it ends the reservation is replaced by what it
used.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from .errors import Rejection
from .limit_headers import openai_headers
from .quota_ask import OUTPUT_FIELDS, STREAMED_USAGE, ask_for_usage, capped, read_ask
from .storage import StorageCalls, StorageDown
from .token_windows import MemoryTokens, RedisTokens, Taken, Window, retry_after, windows_of

if TYPE_CHECKING:
    from .auth import ApiKey
    from .settings import Settings

NEVER = 1 << 62  # tokens no window holds
# A body is parsed and weighed before it goes: at most this many values (commas, arrays,
# objects; counted at C speed first), so that one body cannot hold the event loop long.
VALUES_MAX = 1 << 18


# -- a request's reservation -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """A quota's answer to a request: what it holds (None while the storage is down and
    failing open), its body with the output capped to it (None: as it was), the answer's
    rate-limit headers, and whether the proxy asked for a stream's usage event for itself
    (the client did not: it is taken out of the answer, see `UsageStrip`)."""

    reservation: Reservation | None
    body: bytes | None
    headers: dict[str, str]
    asked_usage: bool = False


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
    return openai_headers("tokens", window.limit, room, window.seconds if reset is None else reset)
