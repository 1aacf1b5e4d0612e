"""Generations wait here for a free slot, and are served fairly by tokens.

A pod whose `slots` is set gets at most that many generations at once from this
proxy; the rest wait here, not in Ollama, whose first-in-first-out queue would let
one script's 200 requests hold up everyone else. Each requester (a key's name; a
client address without keys; a shared key's name and the address together) has
its own line, and the next request to go is the one whose requester has had the
least service so far, in estimated tokens divided by its weight (start-time fair
queuing: token-weighted shares, as deficit round robin gives, decided one freed
slot at a time). Corrected with Ollama's real counts when a request ends. A
request waits only for pods that can serve its model: a request for model A
never holds back one for model B while a B slot is free.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import Rejection

if TYPE_CHECKING:
    from .metrics import Metrics
    from .pool import Member, Pool
    from .settings import Settings

CHARACTERS_PER_TOKEN = 4  # how long a prompt is in tokens, roughly, for its place in line


class Abandoned(Exception):
    """The client left while its request waited."""


@dataclass(frozen=True, slots=True)
class Share:
    """Who a generation is queued for, its weight, and its estimated tokens."""

    requester: str
    weight: float
    cost: float


@dataclass(eq=False)
class Waiter:
    """A queued request: who for, the pods it may go to (asked again as slots free), how it
    starts at the pod it gets, and the future that says it has started."""

    share: Share
    candidates: Callable[[], Sequence[Member]]
    start: Callable[[Member], None]
    since: float
    started: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Ticket:
    """One generation's place in the queue, from joining it to its end at a pod."""

    def __init__(self, queue: FairQueue, share: Share):
        self.queue = queue
        self.share = share
        self.since = time.monotonic()
        self.went_at: float | None = None  # when it left the queue for a pod
        self.running = False  # at a pod: the queue counts it until it ends
        self.waiter: Waiter | None = None

    async def admit(self, candidates: Callable[[], Sequence[Member]], start: Callable[[Member], None]) -> bool:
        """See `FairQueue.admit`."""

        def went(member: Member) -> None:
            self.went_at, self.running = time.monotonic(), True
            start(member)

        return await self.queue.admit(self.share, candidates, went, self._waiting)

    def _waiting(self, waiter: Waiter) -> None:
        self.waiter = waiter

    def abandon(self) -> None:
        """Its client left: out of line, if it is still in it."""
        if self.waiter is not None:
            self.queue.abandon(self.waiter)

    def ended(self, used: int | None) -> None:
        """Its generation ended at the pod, having `used` tokens (None: not reported)."""
        if self.running:
            self.running = False
            self.queue.ended(self.share, used)

    @property
    def waited_ms(self) -> float:
        return round(((self.went_at or time.monotonic()) - self.since) * 1000, 3)


def requester_of(key: str | None, client: str, shared: bool) -> str:
    """Whose line a request waits in: its key's name, its address without a key, and
    both for a key several people share (so that fairness is per person there too)."""
    if key is None:
        return "address:" + client
    return f"key:{key}@{client}" if shared else "key:" + key


def estimate(data: dict[str, Any] | None, default_output: int) -> int:
    """A generation's tokens before it runs: its prompt's characters / 4, plus the output
    it asks for (`num_predict`, `max_tokens`, …) or `default_output`."""
    if data is None:
        return default_output
    characters = 0
    for name in ("prompt", "system", "input", "instructions"):
        characters += _text_length(data.get(name))
    messages = data.get("messages")
    if isinstance(messages, list):
        characters += sum(_text_length(message.get("content")) for message in messages if isinstance(message, dict))
    options = data.get("options")
    asked = options.get("num_predict") if isinstance(options, dict) else None
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        asked = data.get(name, asked) if asked is None else asked
    output = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else default_output
    return characters // CHARACTERS_PER_TOKEN + output


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):  # content parts, or a list of inputs
        return sum(_text_length(part.get("text") if isinstance(part, dict) else part) for part in value)
    return 0


class FairQueue:
    """The lines of waiting generations, and the service each requester has had."""

    def __init__(self, pool: Pool, settings: Settings, metrics: Metrics):
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.lines: dict[str, deque[Waiter]] = {}
        self.size = 0
        self.clock = 0.0  # virtual time: where the last request that went started
        self.finish: dict[str, float] = {}  # each requester's service so far, in tokens / weight
        self.running: dict[str, int] = {}  # its generations sent and not yet ended
        pool.slot_freed = self.dispatch

    # -- joining and leaving -----------------------------------------------------------

    async def admit(
        self,
        share: Share,
        candidates: Callable[[], Sequence[Member]],
        start: Callable[[Member], None],
        waiting: Callable[[Waiter], None],
    ) -> bool:
        """Start this generation at a pod with a free slot: at once when one of its pods
        has one, else in its turn (`waiting` is told of its place in line). False when no
        pod can take it (none is up); `Rejection` when the queue is full or the wait too
        long; `Abandoned` when the client left while it waited."""
        members = candidates()
        member = self.pool.pick([member for member in members if self.free(member)])
        if member is not None:
            self._went(share, time.monotonic())
            start(member)
            return True
        if not members:
            return False
        waiter = Waiter(share, candidates, start, time.monotonic())
        self._join(waiter)
        waiting(waiter)
        try:
            await asyncio.wait([waiter.started], timeout=self.settings.queue_timeout)
        finally:
            self._leave(waiter)
        if not waiter.started.done():
            self.metrics.queue_refused.labels("timeout").inc()
            raise Rejection(
                503,
                f"no slot came free within {self.settings.queue_timeout:g} s (queue_timeout): the pods are busy",
                {"Retry-After": "10"},
            )
        waiter.started.result()  # its start's error, or Abandoned
        return True

    def abandon(self, waiter: Waiter) -> None:
        """Its client left: out of line at once, and no pod ever sees the request."""
        self._leave(waiter)
        if not waiter.started.done():
            waiter.started.set_exception(Abandoned())

    def _join(self, waiter: Waiter) -> None:
        settings = self.settings
        line = self.lines.get(waiter.share.requester)
        if self.size >= settings.queue_max:
            self.metrics.queue_refused.labels("full").inc()
            raise Rejection(
                503, f"{self.size} requests wait for a free slot already (queue_max)", {"Retry-After": "10"}
            )
        if line is not None and len(line) >= settings.queue_max_per_key:
            self.metrics.queue_refused.labels("full_per_key").inc()
            raise Rejection(
                429,
                f"{len(line)} of your requests wait for a free slot already (queue_max_per_key)",
                {"Retry-After": "5"},
            )
        self.lines.setdefault(waiter.share.requester, deque()).append(waiter)
        self.size += 1
        self.metrics.queue_depth.inc()

    def _leave(self, waiter: Waiter) -> None:
        """Out of line, whatever the reason (its turn came, it timed out, its client left)."""
        line = self.lines.get(waiter.share.requester)
        if line is None or waiter not in line:
            return
        line.remove(waiter)
        self.size -= 1
        self.metrics.queue_depth.dec()
        if not line:
            del self.lines[waiter.share.requester]
            self._forget(waiter.share.requester)

    # -- going -------------------------------------------------------------------------

    def free(self, member: Member) -> bool:
        """Whether `member` has a slot for one more generation (one without `slots` always has)."""
        slots = member.pod.slots
        return slots is None or member.busy + member.others_busy < slots

    def dispatch(self) -> None:
        """Give every free slot to the waiting request whose requester has had least so
        far: of each requester, its first request that a free slot can serve."""
        while self.lines and any(self.free(member) for member in self.pool.members):
            best: tuple[float, Waiter, Member] | None = None
            for requester, line in self.lines.items():
                start = max(self.clock, self.finish.get(requester, 0.0))
                if best is not None and start >= best[0]:
                    continue
                for waiter in line:
                    member = self.pool.pick([member for member in waiter.candidates() if self.free(member)])
                    if member is not None:
                        best = (start, waiter, member)
                        break
            if best is None:
                return
            _, waiter, member = best
            self._leave(waiter)
            self._went(waiter.share, waiter.since)
            try:
                waiter.start(member)  # its attempt counts the slot as taken from now
            except Exception as error:  # its own to answer: the line goes on
                waiter.started.set_exception(error)
            else:
                waiter.started.set_result(None)

    def _went(self, share: Share, since: float) -> None:
        start = max(self.clock, self.finish.get(share.requester, 0.0))
        self.clock = start
        self.finish[share.requester] = start + share.cost / share.weight
        self.running[share.requester] = self.running.get(share.requester, 0) + 1
        self.metrics.queue_wait.observe(time.monotonic() - since)

    def ended(self, share: Share, used: int | None) -> None:
        """A generation that went has ended: its estimate is replaced by what it used."""
        requester = share.requester
        if used is not None:
            self.finish[requester] += (used - share.cost) / share.weight
        self.running[requester] -= 1
        self._forget(requester)

    def _forget(self, requester: str) -> None:
        """A requester with nothing waiting and nothing running is forgotten: what it had
        matters no more (a newcomer starts at the clock), and the maps stay bounded."""
        if not self.running.get(requester) and requester not in self.lines:
            self.running.pop(requester, None)
            self.finish.pop(requester, None)

    # -- what the status page shows --------------------------------------------------------

    def snapshot(self, private: bool) -> list[dict[str, Any]]:
        """Each line: whose, how many wait, and for how long the first has; addresses only
        for the pod's operators (`private`)."""
        now = time.monotonic()
        return [
            {
                "requester": requester if private else requester.partition("@")[0].partition(":")[0],
                "waiting": len(line),
                "longest_wait_s": round(now - line[0].since, 1),
            }
            for requester, line in self.lines.items()
        ]
