"""One try of a forwarded request at one pod, and what its end means."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tornado.httputil import HTTPHeaders

from .errors import Rejection, error_message
from .framing import Head
from .heartbeat import ERROR_BODY_LIMIT, HEARTBEAT_HEADER, strip_beats, told_error
from .retry import Cause
from .upstream import Abandoned

if TYPE_CHECKING:
    from .pool import Member, Pool

# What a pod's answer with these statuses says of the pod: not well (outlier detection).
SICK_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt that ended without an answer for the client: its `kind` (a metric label),
    what to tell the client, and why (for moving the request to another pod)."""

    kind: str
    rejection: Rejection
    cause: Cause | None = None


class Attempt:
    """Starts the exchange with `member`'s pod at once. `on_head` and `on_piece` receive
    the answer, unless it is `held`: an answer that may yet be retried (a 503, a 404) is
    kept back, its body up to ERROR_BODY_LIMIT, until its end says whether it goes to the
    client (`release`) or the request goes again."""

    def __init__(
        self,
        pool: Pool,
        member: Member,
        method: str,
        target: str,
        headers: HTTPHeaders,
        *,
        generation: bool,
        hold: Callable[[Head], bool],
        on_head: Callable[[Head], None],
        on_piece: Callable[[bytes], Awaitable[None] | None],
        body: bytes | None = None,
        body_producer: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]] | None = None,
    ):
        self.pool = pool
        self.member = member
        self.generation = generation
        self.hold = hold
        self.relay_head = on_head
        self.relay_piece = on_piece
        self.head: Head | None = None
        self.held: list[bytes] | None = None  # the body of a held answer
        self.held_size = 0
        self.received = 0  # its head and pieces, held or not: the pod's activity
        # A pod that is this proxy too says a head is its own heartbeat's: its first bytes
        # may be heartbeats (not content), and an error it then tells counts as its status.
        self.beating = False
        self.beats = b""  # an unfinished heartbeat line
        self.told: tuple[int, str] | None = None  # such an error: its status and message
        self.request = member.pod.request(
            method,
            target,
            headers,
            body=body,
            body_producer=body_producer,
            head_callback=self._on_head,
            streaming_callback=self._on_piece,
        )
        pool.enter(member, generation)
        self.fetching: asyncio.Future[Any] = pool.fetch(self.request)
        # First of its ends' callbacks, and whether or not anyone still waits for it (a
        # request whose client left has ended before its exchange does).
        self.fetching.add_done_callback(self._ended)

    def _on_head(self, head: Head) -> None:
        self.head = head
        self.received += 1
        self.beating = any(name.lower() == HEARTBEAT_HEADER.lower() for name, _ in head.headers)
        if self.beating or self.hold(head):
            self.held = []
        else:
            self.relay_head(head)

    def _on_piece(self, data: bytes) -> Awaitable[None] | None:
        self.received += 1
        if self.beating:
            data, self.beats = strip_beats(self.beats + data)
            if not data:
                return None
            self.beating = False
            self.told = told_error(data)
            if self.told is None:  # content: the answer is the client's
                assert self.head is not None
                self.held = None
                self.relay_head(self.head)
        if self.held is None:
            return self.relay_piece(data)
        if self.held_size + len(data) > ERROR_BODY_LIMIT:
            # Longer than any "server busy" or "not found": the pod's own answer, whole.
            self.release()
            return self.relay_piece(data)
        self.held.append(data)
        self.held_size += len(data)
        return None

    @property
    def status(self) -> int | None:
        """The answer's status: its head's, or the one an error told in-band stands for."""
        if self.told is not None:
            return self.told[0]
        return None if self.head is None else self.head.code

    def release(self) -> None:
        """Send a held answer on to the client after all."""
        assert self.head is not None and self.held is not None
        held, self.held = self.held, None
        self.relay_head(self.head)
        for piece in held:
            self.relay_piece(piece)

    def let_go(self) -> None:
        """Its request has ended: its callbacks, which hold their owner (which holds
        this attempt: a cycle), are dropped; nothing more goes to the client."""
        self.relay_head = self.relay_piece = _dropped

    def abort(self, error: Exception) -> None:
        """End the exchange now (a no-op once it has ended)."""
        self.request.abort(error)

    def ended(self) -> Failure | None:
        """What the finished exchange means: None for an answer for the client, or one the
        proxy let go itself (`Abandoned`: the client left, or was answered already)."""
        error = self.fetching.exception()
        if error is None:
            return self._answered()
        if isinstance(error, Abandoned):
            return None
        kind, rejection = self.member.pod.failure(error)
        if not self.request.sent:
            cause: Cause | None = Cause.NOT_RECEIVED
        elif kind == "closed" and self.head is None:
            cause = Cause.CLOSED
        else:
            cause = None
        return Failure(kind, rejection, cause)

    @property
    def stale(self) -> bool:
        """Sent on a kept connection the pod had closed already: the same pod may take it again."""
        return self.request.reused and self.head is None

    def _answered(self) -> Failure | None:
        """A held answer that is worth another pod: "server busy", or "model not found"."""
        status = self.status
        if self.held is None or status is None:
            return None
        message = self.told[1] if self.told is not None else error_message(b"".join(self.held), status)
        if status == 503:
            return Failure("busy", Rejection(503, message), Cause.BUSY)
        if status == 404 and "not found" in message:
            return Failure("not_found", Rejection(404, message), Cause.NOT_FOUND)
        return None

    def _ended(self, _: asyncio.Future[Any]) -> None:
        """Tell the pool the exchange is over, and what it says of its pod: a failure to
        reach it or to get an answer, or an answer of 502, 503 or 504, counts against it;
        any other answer for it; a client that left first, nothing."""
        self.pool.leave(self.member, self.generation)
        error = self.fetching.exception()
        failure = None
        if error is not None and not isinstance(error, Abandoned):
            failure = self.member.pod.failure(error)[1].message
        elif self.status in SICK_STATUSES:
            failure = f"answered {self.status}"
        self.pool.report(self.member, failure, learned=not isinstance(error, Abandoned))


def _dropped(_: object) -> None:
    """A let-go attempt's relay: nothing goes on."""
