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
never holds back one for model B while a B slot is free. A key with
`max_concurrent` has at most that many generations at once: its next waits in
its line, whatever the pods' slots, until one of them ends. With Redis as the
storage, a slot is also leased there (`slot_leases`): `slots` is one limit for
every process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

from .balancer import Wanted
from .errors import Rejection
from .pool import Hold
from .slot_leases import Leases

if TYPE_CHECKING:
    from .metrics import Metrics
    from .pool import Member, Pool
    from .settings import Settings
    from .usage import Asks

log = logging.getLogger(__name__)

CHARACTERS_PER_TOKEN = 4  # how long a prompt is in tokens, roughly, for its place in line
MAX_OUTPUT = 1 << 20  # no generation is reckoned to ask for more tokens than this
# Queued requests hold their bodies: at most this much in all, and per requester.
QUEUE_BYTES = 256 * 1024 * 1024
QUEUE_BYTES_PER_REQUESTER = 64 * 1024 * 1024
TICK = 1.0  # seconds between looks for a slot that came free without a generation ending here


class Abandoned(Exception):
    """The client left while its request waited."""


class Share(NamedTuple):
    """Who a generation is queued for, its weight, and its estimated tokens (a tuple: made
    for every generation, where a frozen dataclass costs four times as much)."""

    requester: str
    weight: float
    cost: float
    size: int = 0  # the body it holds while it waits
    key: str | None = None  # the key it comes with, when that key has a `max_concurrent`
    max_concurrent: int = 0


# What the queue gives a request whose turn came: the pod's slot, kept until its attempt
# takes it, and its lease in Redis ("" for none), given back as it ends.
Start = Callable[[Hold, str], None]


@dataclass(eq=False)
class Waiter:
    """A queued request: who for, what the pool chooses its pod by (asked again as slots
    free), how it keeps the slot it gets, and the future that says it has one."""

    share: Share
    wanted: Wanted
    targets: Sequence[str] | None
    start: Start
    since: float
    # None once it has its slot, or what makes the error it gets instead: made as it is
    # raised, for an error kept here and raised where it waited would hold that frame, and
    # the frame this waiter and its future, in a cycle.
    started: asyncio.Future[Callable[[], Exception] | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    leasing: bool = False  # its pod is being asked of Redis: it stays in line, and is passed over

    @property
    def group(self) -> tuple[str | None, tuple[str, ...] | None]:
        """What decides which pods can serve it: its model, and the pods it names."""
        return self.wanted.model, None if self.targets is None else tuple(self.targets)


class Ticket:
    """One generation's place in the queue, from joining it to its end at a pod."""

    def __init__(self, queue: FairQueue, share: Share):
        self.queue = queue
        self.share = share
        self.since = time.monotonic()
        self.went_at: float | None = None  # when it left the queue for a pod
        self.running = False  # at a pod: the queue counts it until it ends
        self.lease = ""  # its slot's lease in Redis, if any
        self.waiter: Waiter | None = None
        self.left = False  # its client left before it had a place in line

    def admit(
        self, members: Sequence[Member], wanted: Wanted, targets: Sequence[str] | None, start: Callable[[Hold], None]
    ) -> Coroutine[Any, Any, None]:
        """See `FairQueue.admit`: its coroutine, for the caller to await (no second one around it)."""

        def went(hold: Hold, lease: str) -> None:
            self.went_at, self.running, self.lease = time.monotonic(), True, lease
            start(hold)

        return self.queue.admit(self.share, members, wanted, targets, went, self._waiting)

    def _waiting(self, waiter: Waiter) -> None:
        self.waiter = waiter
        if self.left:  # while a slot that looked free was asked of Redis, and refused
            self.queue.abandon(waiter)

    def moved(self) -> None:
        """It is sent again, to another pod: its lease at the first goes back (its turn,
        and its key's count, stay until it ends)."""
        self.queue.give_back(self.lease)
        self.lease = ""

    def abandon(self) -> None:
        """Its client left: out of line, if it is in it (or as soon as it is)."""
        if self.waiter is not None:
            self.queue.abandon(self.waiter)
        else:
            self.left = True

    def let_go(self) -> None:
        """Its request has ended: its place in line, whose `start` holds the request, is
        let go (the two would otherwise stay in a cycle)."""
        self.waiter = None

    def ended(self, used: int | None) -> None:
        """Its generation, `running`, has ended, having `used` tokens (None: not reported)."""
        self.running = False
        self.queue.ended(self.share, used, self.lease)

    @property
    def waited_ms(self) -> float:
        return round(((self.went_at or time.monotonic()) - self.since) * 1000, 3)


def requester_of(key: str | None, client: str, shared: bool) -> str:
    """Whose line a request waits in: its key's name, its address without a key, and
    both for a key several people share (so that fairness is per person there too). An
    IPv6 address counts by its /64: one machine can have a whole /64 to itself."""
    if key is not None and not shared:
        return "key:" + key
    if ":" in client:  # IPv6 (an IPv4 address or a socket's name has none)
        with suppress(ValueError):
            client = str(ipaddress.ip_network(client + "/64", strict=False))
    return "address:" + client if key is None else f"key:{key}@{client}"


def estimate(asks: Asks | None, size: int, default_output: int, openai: bool) -> int:
    """A generation's tokens before it runs: its prompt's characters / 4, plus the output
    it asks for in its own API's terms, else `default_output`; at most MAX_OUTPUT. A
    body of `size` bytes that was not read (too large, not a JSON object: `asks` None)
    counts by its size."""
    if asks is None:
        return size // CHARACTERS_PER_TOKEN + default_output
    asked = asks.max_tokens if openai else asks.num_predict
    output = default_output if asked is None else asked
    return asks.characters // CHARACTERS_PER_TOKEN + min(output, MAX_OUTPUT)


class FairQueue:
    """The lines of waiting generations, and the service each requester has had."""

    def __init__(self, pool: Pool, settings: Settings, metrics: Metrics):
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.lines: dict[str, deque[Waiter]] = {}
        self.size = 0
        self.held: dict[str, int] = {}  # body bytes each requester's waiting requests hold
        self.clock = 0.0  # virtual time: where the last request that went started
        self.finish: dict[str, float] = {}  # each requester's service so far, in tokens / weight
        self.running: dict[str, int] = {}  # its generations sent and not yet ended
        self.keys_running: dict[str, int] = {}  # the same, per key with a max_concurrent
        self.leases: Leases | None = None  # with Redis as the storage, once started
        self._ticking: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # leases being asked for
        pool.slot_freed = self._slot_freed

    def start(self) -> None:
        """With Redis as the storage, lease the pods' slots there: one limit for every process."""
        storage = self.settings.rate_limit_storage
        scheme = urlsplit(storage).scheme
        slotted = [pod.name for pod in self.pool.pods if pod.slots is not None]
        if self.leases is not None or not slotted:
            return
        if scheme in ("redis", "rediss"):
            self.leases = Leases(storage, slotted, self.dispatch)
            self.leases.start()
        elif scheme != "memory" or self.settings.worker_count > 1:
            log.warning(
                "slots are each process's own count: every process may send a pod that many generations",
                extra={"fix": "set rate_limit_storage to a redis:// or rediss:// URL (see README, Sharing a pod)"},
            )

    async def close(self) -> None:
        tasks = [*self._tasks, *((self._ticking,) if self._ticking is not None else ())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.leases is not None:
            await self.leases.close()

    # -- joining and leaving -----------------------------------------------------------

    async def admit(
        self,
        share: Share,
        members: Sequence[Member],
        wanted: Wanted,
        targets: Sequence[str] | None,
        start: Start,
        waiting: Callable[[Waiter], None],
    ) -> None:
        """Give this generation a free slot at one of `members` (the pods that can serve it,
        chosen by `wanted` among `targets`; at least one): at once when one has it, else in
        its turn (`waiting` is told of its place in line). `start` is given the slot, kept
        (whatever else dispatch gives out must not take it). `Rejection` when the queue is
        full or the wait too long; `Abandoned` when the client left meanwhile."""
        member = self.pool.pick(member for member in members if self.free(member)) if self.room(share) else None
        if member is not None:
            hold = Hold(self.pool, member, slot=True)
            self._take_turn(share)
            # Its lease in Redis, where there is Redis and the pod has slots ("" for none to
            # take: no Redis, a pod without `slots`, Redis down), or None when every
            # process's leases fill them (no coroutine to await without Redis).
            slots = member.pod.slots
            lease = "" if self.leases is None or slots is None else await self.leases.acquire(member.pod.name, slots)
            if lease is not None:
                self.metrics.queue_wait.observe(0.0)
                start(hold, lease)
                return
            self._give_turn_back(share)  # another process took the slot meanwhile: wait in line
            hold.let_go()
        waiter = Waiter(share, wanted, targets, start, time.monotonic())
        self._join(waiter)
        waiting(waiter)
        try:
            await asyncio.wait([waiter.started], timeout=self.settings.queue_timeout)
        finally:
            self._leave(waiter)
        if not waiter.started.done():
            waiter.started.cancel()  # a lease being asked for meanwhile is given back
            waited = f"within {self.settings.queue_timeout:g} s (queue_timeout)"
            if not self.room(share):
                self.metrics.queue_refused.labels("max_concurrent").inc()
                raise Rejection(
                    429,
                    f"none of your key's {share.max_concurrent} generations at once (max_concurrent) ended {waited}",
                    {"Retry-After": "5"},
                )
            self.metrics.queue_refused.labels("timeout").inc()
            raise Rejection(503, f"no slot came free {waited}: the pods are busy", {"Retry-After": "10"})
        refusal = waiter.started.result()
        if refusal is not None:  # its client left, or no pod that can serve it is available
            raise refusal()

    def abandon(self, waiter: Waiter) -> None:
        """Its client left: out of line at once, and no pod ever sees the request."""
        if self._leave(waiter):  # still in line: its turn has not come
            waiter.started.set_result(Abandoned)

    def _join(self, waiter: Waiter) -> None:
        settings, share = self.settings, waiter.share
        line = self.lines.get(share.requester)
        held = self.held.get(share.requester, 0)
        if self.size >= settings.queue_max:
            self._refuse("full", 503, f"{self.size} requests wait for a free slot already (queue_max)")
        if sum(self.held.values()) + share.size > QUEUE_BYTES:
            self._refuse("full", 503, f"the requests waiting for a free slot hold {QUEUE_BYTES >> 20} MiB already")
        if line is not None and len(line) >= settings.queue_max_per_key:
            self._refuse(
                "full_per_key", 429, f"{len(line)} of your requests wait for a free slot already (queue_max_per_key)"
            )
        if line is not None and held + share.size > QUEUE_BYTES_PER_REQUESTER:
            self._refuse(
                "full_per_key", 429, f"your requests waiting for a free slot hold {QUEUE_BYTES_PER_REQUESTER >> 20} MiB"
            )
        self.lines.setdefault(share.requester, deque()).append(waiter)
        self.held[share.requester] = held + share.size
        self.size += 1
        self.metrics.queue_depth.inc()
        if self._ticking is None or self._ticking.done():
            self._ticking = asyncio.ensure_future(self._tick())

    def _refuse(self, reason: str, status: int, message: str) -> NoReturn:
        self.metrics.queue_refused.labels(reason).inc()
        raise Rejection(status, message, {"Retry-After": "10" if status == 503 else "5"})

    def _leave(self, waiter: Waiter) -> bool:
        """Out of line, whatever the reason (its turn came, it timed out, its client left);
        False if it was out already."""
        requester = waiter.share.requester
        line = self.lines.get(requester)
        if line is None or waiter not in line:
            return False
        line.remove(waiter)
        self.size -= 1
        self.held[requester] -= waiter.share.size
        self.metrics.queue_depth.dec()
        if not line:
            del self.lines[requester], self.held[requester]
            self._forget(requester)
        return True

    async def _tick(self) -> None:
        """While anyone waits, look for free slots now and then too: one can come free
        without a generation of this process ending (another process's, as the shared
        load tells; a pod back from an ejection)."""
        while self.lines:
            await asyncio.sleep(TICK)
            self._refuse_unservable()
            self.dispatch()

    def _refuse_unservable(self) -> None:
        """A request waits only while a pod that can serve it is available: one whose pods
        have all been ejected meanwhile gets the pool's 502, as a request that comes then
        does, not the rest of `queue_timeout`."""
        for line in list(self.lines.values()):
            for waiter in list(line):
                if not waiter.leasing and not self.pool.choose(waiter.wanted, waiter.targets):
                    self._leave(waiter)
                    waiter.started.set_result(self.pool.unavailable)

    # -- going -------------------------------------------------------------------------

    def room(self, share: Share) -> bool:
        """Whether its key may have one more generation at once (`max_concurrent`)."""
        return share.key is None or self.keys_running.get(share.key, 0) < share.max_concurrent

    def free(self, member: Member) -> bool:
        """Whether `member` has a slot for one more generation (one without `slots` always
        has), counting the other processes' as the leases or the shared load last said."""
        slots = member.pod.slots
        if slots is None:
            return True
        others = member.others_busy if self.leases is None else self.leases.others[member.pod.name]
        return member.busy + others < slots

    def _slot_freed(self) -> None:
        """A slot came free (a generation ended, or a kept slot was let go): whoever waits
        gets it, after the callbacks already due (its journey tells the queue what it used
        before the queue chooses who goes next). With nobody waiting there is nothing to
        choose: a request that comes meanwhile finds the slot free by itself."""
        if self.lines:
            asyncio.get_running_loop().call_soon(self.dispatch)

    def dispatch(self) -> None:
        """Give every free slot to the waiting request whose requester has had least so
        far: of each requester, its first request that a free slot can serve. Looking
        claims nothing: only the chosen request's pod is claimed (a pod being probed)."""
        while self.lines and any(self.free(member) for member in self.pool.members):
            servable: dict[tuple[str | None, tuple[str, ...] | None], bool] = {}
            best: tuple[float, Waiter] | None = None
            for requester, line in self.lines.items():
                start = max(self.clock, self.finish.get(requester, 0.0))
                if (best is not None and start >= best[0]) or not self.room(line[0].share):
                    continue
                for waiter in line:
                    if waiter.leasing:
                        continue
                    group = waiter.group
                    if group not in servable:
                        pods = self.pool.choose(Wanted(group[0]), group[1])
                        servable[group] = any(self.free(member) for member in pods)
                    if servable[group]:
                        best = (start, waiter)
                        break
            if best is None:
                return
            self._send(best[1])

    def _send(self, waiter: Waiter) -> None:
        members = self.pool.choose(waiter.wanted, waiter.targets)
        member = self.pool.pick([member for member in members if self.free(member)])
        assert member is not None  # `dispatch` found it a free pod a moment ago
        hold = Hold(self.pool, member, slot=True)  # kept for it: nothing else takes it meanwhile
        self._take_turn(waiter.share)
        if self.leases is None or member.pod.slots is None:
            self._start(waiter, hold, "")
        else:
            waiter.leasing = True
            self._keep(self._send_leased(waiter, hold))

    async def _send_leased(self, waiter: Waiter, hold: Hold) -> None:
        """Lease the slot `hold` keeps, then start `waiter` there; refused (another process
        took it meanwhile), it waits on in its place; gone meanwhile, the lease goes back."""
        pod = hold.member.pod
        assert self.leases is not None and pod.slots is not None  # `_send` leases only those
        lease = await self.leases.acquire(pod.name, pod.slots)
        waiter.leasing = False
        if lease is None or waiter.started.done():
            if lease is not None:
                self.leases.release(lease)
            self._give_turn_back(waiter.share)
            hold.let_go()
            return
        self._start(waiter, hold, lease)

    def _start(self, waiter: Waiter, hold: Hold, lease: str) -> None:
        self._leave(waiter)
        self.metrics.queue_wait.observe(time.monotonic() - waiter.since)
        waiter.start(hold, lease)
        waiter.started.set_result(None)

    def _keep(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, held until it ends."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take_turn(self, share: Share) -> None:
        """Its turn counts from the moment its slot is taken, its lease still to come: the
        service its requester has had (the next free slot goes to another), and its key's
        generations at once."""
        start = max(self.clock, self.finish.get(share.requester, 0.0))
        self.clock = start
        self.finish[share.requester] = start + share.cost / share.weight
        self.running[share.requester] = self.running.get(share.requester, 0) + 1
        if share.key is not None:
            self.keys_running[share.key] = self.keys_running.get(share.key, 0) + 1

    def _give_turn_back(self, share: Share) -> None:
        """A turn that did not go: its lease was refused (it waits on), or its client left."""
        self.finish[share.requester] -= share.cost / share.weight
        self._count_down(share)

    def ended(self, share: Share, used: int | None, lease: str) -> None:
        """A generation that went has ended: its estimate is replaced by what it used, and
        its lease is given back."""
        self.give_back(lease)
        if used is not None:
            self.finish[share.requester] += (used - share.cost) / share.weight
        self._count_down(share)

    def give_back(self, lease: str) -> None:
        if self.leases is not None:
            self.leases.release(lease)

    def _count_down(self, share: Share) -> None:
        self.running[share.requester] -= 1
        if share.key is not None:
            self.keys_running[share.key] -= 1
            if not self.keys_running[share.key]:
                del self.keys_running[share.key]
            asyncio.get_running_loop().call_soon(self.dispatch)  # its key's next may go now
        self._forget(share.requester)

    def _forget(self, requester: str) -> None:
        """A requester with nothing waiting and nothing running is forgotten: what it had
        matters no more (a newcomer starts at the clock), and the maps stay bounded; with
        nobody left at all, the clock starts again."""
        if not self.running.get(requester) and requester not in self.lines:
            self.running.pop(requester, None)
            self.finish.pop(requester, None)
            if not self.running and not self.lines:
                self.clock = 0.0

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
