"""A forwarded request's way, once it has been planned and admitted: the body, an attempt
at the upstream, the answer relayed to the client, and how it all ends.

The Tornado handler (`handler.ProxyHandler`) plans the request and is the
client's side of it (`relay.Reply`); the journey does the rest, one step
after the other: `go` (or, for a body held whole, `body_in`), then `settle`,
which waits for the attempt's end and ends the answer accordingly: cleanly,
with the error as a status or in-band, or by cutting the connection.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tornado.httputil import HTTPHeaders

from .attempt import Attempt, Failure
from .auth import INFERENCE
from .balancer import Wanted, affinity_key
from .body import BodyPump
from .errors import OPENAI, Rejection, shape_for
from .fair_queue import Abandoned as QueueLeft
from .fair_queue import FairQueue, Share, Ticket, estimate, requester_of
from .framing import Head, MalformedAnswer
from .headers import value_of
from .idle import Silence
from .model_names import canonical
from .peer_json import json_object
from .pool import Hold
from .quota import QuotaExceeded, Quotas, Reservation
from .quota_ask import UsageStrip, counted_path
from .record import AccessRecord
from .relay import AnswerRelay, ClientFlow, Reply
from .retry import Cause, may_go_again
from .routes import Route
from .upstream import Abandoned, IdleTimeout
from .usage import AnswerEnds, answer_format, prompt_at_start

if TYPE_CHECKING:
    from tornado.http1connection import HTTP1Connection

    from .pool import Member
    from .proxy import Proxy

SESSION_HEADER = "X-Ollama-Session"  # a client's own name for its conversation: its pod


@dataclass(slots=True)
class Plan:
    """What goes upstream: the method, the target (path and query as on the wire), the
    headers (the client's, with the proxy's changes; each pod adds its own Host), and
    the pods it may go to (`X-Ollama-Upstream`; None for any)."""

    method: str
    target: str
    headers: HTTPHeaders
    targets: list[str] | None = None
    model: str | None = None  # the model its path names (/v1/models/{model}), decoded


class Journey:
    """One forwarded request after its plan, until its end (`end`, once)."""

    def __init__(
        self,
        proxy: Proxy,
        reply: Reply,
        connection: HTTP1Connection,
        record: AccessRecord,
        route: Route | None,
        body: BodyPump,
        plan: Plan,
        *,
        method_in: str,
        started: float,
    ):
        self.proxy = proxy
        self.pool = proxy.pool
        self.reply = reply
        self.connection = connection
        self.record = record
        self.route = route
        self.body = body
        self.method_in = method_in
        self.started = started
        self.generation = route is not None and route.tokens  # counted per model
        self.plan = plan
        self.attempt: Attempt | None = None
        self.tried: list[str] = []  # pods an attempt went to, in order
        self.stale = 0  # of them, attempts that met a kept connection the pod had closed
        self.relay = self._relay(plan)
        self.failure: Failure | None = None  # what the last attempt's end means, once it has ended
        self.settled = False
        self.ticket: Ticket | None = None  # a generation's place in the fair queue
        self.hold: Hold | None = None  # the pod chosen for it, between its choice and its attempt
        self.reservation: Reservation | None = None  # what it holds of its key's token quota
        self.watch = Silence(proxy.idle_timeout, self._progress, self._on_silence)
        proxy.metrics.in_flight.inc()
        proxy.exchanges.add(self)

    # -- the way there ---------------------------------------------------------------

    def go(self) -> None:
        """Start at once with a streamed body (or none held), to a pod chosen without
        knowing the model; a held body waits for `settle`, which reads it first."""
        plan = self.plan
        self.pool.budget.request(int(time.monotonic()))
        if self.body.held is None and plan.model is None:
            member = self.pool.pick(self.pool.choose(Wanted(), plan.targets))
            if member is None:
                raise self.pool.unavailable()
            self._attempt(member, body_producer=self.body.produce if self.body.present else None)

    def _relay(self, plan: Plan) -> AnswerRelay:
        route = self.route
        usage = None
        if self.generation:  # its counters: at its answer's end, and its start where its API says the prompt's
            usage = AnswerEnds(_format_now(route, self.body), start=prompt_at_start(plan.target))
        return AnswerRelay(
            self.reply,
            ClientFlow(self.connection, self.reply.on_connection_close),
            self.record,
            started=self.started,
            upstream_head=plan.method == "HEAD",
            # Not a method of the journey: the relay would hold it in a cycle.
            answer_format=functools.partial(_answer_format, route, self.body),
            heartbeat=self.proxy.settings.heartbeat_seconds if route is not None and route.answer else None,
            usage=usage,
        )

    def body_in(self) -> None:
        """The client's whole body is in: a held one gets an alias's defaults merged in
        (or `Rejection` 400)."""
        self.body.arrived()
        if self.body.held is None or self.attempt is not None:
            return
        route = self.route
        if route is not None and route.body_defaults:
            self.body.replace(_merge_body(self.body.whole(), route))

    def _attempt(self, member: Member, **body: Any) -> None:
        plan = self.plan
        record = self.record
        record.method_out = plan.method
        if not self.tried and plan.method != self.method_in:
            metrics = self.proxy.metrics
            metrics.child(metrics.corrections, record.route, self.method_in, plan.method).inc()
        self.tried.append(member.pod.name)
        record.upstream, record.attempts = member.pod.name, len(self.tried)
        headers = plan.headers if self.pool.single else plan.headers.copy()  # a pod adds its own
        self.settled, self.failure = False, None
        self.attempt = Attempt(
            self.pool,
            member,
            plan.method,
            plan.target,
            headers,
            generation=self.generation,
            hold=self._hold,
            on_head=self._on_head,
            on_piece=self.relay.on_piece,
            **body,
        )
        self.attempt.fetching.add_done_callback(self._on_fetched)

    def _hold(self, head: Head) -> bool:
        """Whether to keep an answer back, to send the request again if it says so: a 503
        ("server busy") or a 404 ("model not found") while the request may still go again."""
        return head.code in (503, 404) and self._may_go_again()

    def _on_head(self, head: Head) -> None:
        assert self.attempt is not None
        self.relay.on_head(head, self.attempt.member.pod.name)
        self.proxy.metrics.streams.inc()

    def _on_fetched(self, _: asyncio.Future[Any]) -> None:
        """The exchange ended: what is still to come of the body is dropped, and what
        the end means is recorded (once, whoever learns of it first)."""
        attempt = self.attempt
        if self.settled or attempt is None:
            return
        self.settled = True
        self.body.stop()
        self.failure = failure = attempt.ended()
        if failure is None and not self.relay.complete:
            # The exchange ended cleanly, but the answer it decoded did not.
            kind, rejection = attempt.member.pod.failure(MalformedAnswer("the encoded answer ended before its end"))
            failure = self.failure = Failure(kind, rejection)
        if failure is not None and failure.cause is not Cause.BUSY and failure.cause is not Cause.NOT_FOUND:
            self.proxy.metrics.upstream_errors.labels(failure.kind).inc()
            self.record.outcome = "timeout" if failure.kind.endswith("timeout") else "upstream_error"
        elif failure is None and attempt.fetching.exception() is None:
            # Every piece has been handed to the kernel: a client leaving now loses nothing.
            self.record.outcome = self.record.outcome or "ok"

    async def settle(self) -> None:
        """With the client's whole body in: choose the pod (a held body, or the path, names
        its model), and wait for the answer's end; send the request again while it may; then end it."""
        if self.attempt is None and not await self._first():
            return
        while True:
            attempt = self.attempt
            assert attempt is not None
            try:
                await attempt.fetching
            except Exception as error:  # _on_fetched reads it
                error.__traceback__ = None  # which would hold this frame, and it this journey: a cycle
            # An end that came before this wait began may not have been seen yet.
            self._on_fetched(attempt.fetching)
            if self.reply.answered:
                return
            failure = self.failure
            if failure is None or failure.cause is None or not await self._again(failure.cause):
                break
        self._leave_queue()  # its last attempt has ended: the next of its key may go
        if attempt.held is not None and (failure is None or failure.cause in (Cause.BUSY, Cause.NOT_FOUND)):
            attempt.release()  # the pod's own answer, after all
            self.failure = None
        if self.failure is not None:
            self.end_early(self.failure.rejection)
            return
        if self.relay.error_body is not None:
            self.relay.tell_in_band()  # after a heartbeat's head, Ollama's error goes in-band
        else:
            self.relay.end()
        self.reply.finish()

    async def _first(self) -> bool:
        """The first attempt of a held body, at the pod its model and conversation want
        (a generation, when it has a free slot: else after its turn in the fair queue),
        once its key's token quota has room for it; False when it does not go (the client
        has been answered, or has left)."""
        members = await self._choose()
        queue = self.proxy.queue
        if queue is not None and self.generation and members:
            if not await self._queued(queue, members):
                return False
        else:
            member = self.pool.pick(members)
            if member is None:
                self.end_early(self._nowhere())
                return False
            self.hold = Hold(self.pool, member, slot=False)
        if self.proxy.quotas is not None and not await self._reserve(self.proxy.quotas):
            self._release_hold()
            return False
        if self.reply.answered or self.hold is None:  # its client left while it waited (for its turn, or its quota)
            self._settle_quota(0)  # nothing was used
            self._leave_queue()  # its slot (and lease) may have come after its end
            self._release_hold()
            return False
        member = self.hold.take()
        self.hold = None
        self._go_to(member)
        return True

    async def _reserve(self, quotas: Quotas) -> bool:
        """Reserve what the request may use of its key's token quota, and cap its output
        to what was granted; False when refused (the client has been answered)."""
        record = self.record
        key = self.proxy.key_entries.get(record.key) if record.key is not None else None
        path = counted_path(self.plan.target)
        if key is None or path is None:
            return True
        try:
            grant = await quotas.reserve(key, path, self.body.whole() if self.body.present else None)
        except QuotaExceeded as refusal:
            record.outcome = "rate_limited"
            self.proxy.metrics.rate_limited.labels(record.route, refusal.reason).inc()
            self.end_early(refusal)
            return False
        except Rejection as rejection:  # a body it cannot read
            self.end_early(rejection)
            return False
        self.reservation = grant.reservation
        if grant.body is not None:
            self.body.replace(grant.body)
        if grant.asked_usage:
            self.relay.strip = UsageStrip()
        self.reply.add_answer_headers(grant.headers)
        return True

    def _release_hold(self) -> None:
        """A pod chosen for this request that it will not go to: its slot, and its probe, to others."""
        if self.hold is not None:
            self.hold.let_go()
            self.hold = None

    async def _queued(self, queue: FairQueue, members: list[Member]) -> bool:
        """Wait for a slot (`hold`, kept until the attempt takes it); False when none came
        (the client has been answered, or has left)."""
        record, settings = self.record, self.proxy.settings
        key = self.proxy.key_entries.get(record.key) if record.key is not None else None
        present = self.body.present
        size = len(self.body.whole()) if present else 0
        share = Share(
            requester_of(record.key, record.client, key is not None and key.shared),
            key.weight if key is not None else 1.0,
            estimate(
                self.body.info().asks if present else None,
                size,
                settings.queue_default_output_tokens,
                shape_for(record.path) == OPENAI,
            ),
            size,
            *((key.name, key.max_concurrent) if key is not None and key.max_concurrent is not None else ()),
        )
        self.ticket = ticket = Ticket(queue, share)
        try:
            await ticket.admit(members, self._wanted(), self.plan.targets, self._keep)
        except Rejection as rejection:
            self.end_early(rejection)
            return False
        except QueueLeft:
            return False  # its client left: nothing to answer
        return True

    def _keep(self, hold: Hold) -> None:
        self.hold = hold

    def _go_to(self, member: Member) -> None:
        self._attempt(member, body=self.body.whole() if self.body.present else None)

    async def _again(self, cause: Cause) -> bool:
        """Send the request again after `cause`, where the rules, the retries left and the
        pool's budget allow, and a pod can take it: another than those tried, or the same
        one when it only met a kept connection it had closed."""
        attempt = self.attempt
        assert attempt is not None
        # A kept connection the pod had closed is no try at the pod: a dead pod's several
        # kept connections must not use up the tries that would take the request elsewhere.
        self.stale += attempt.stale
        if not self._may_go_again(cause) or not self.pool.budget.allow(int(time.monotonic())):
            return False
        if cause is Cause.NOT_FOUND:
            self.pool.refresh(attempt.member)  # its list is behind
        avoid = () if attempt.stale else self.tried
        members = await self._choose(avoid)
        queue, ticket = self.proxy.queue, self.ticket
        if queue is not None and ticket is not None:
            members = [member for member in members if queue.free(member)]  # its slots hold for it too
        member = self.pool.pick(members)
        if member is None:
            return False
        if ticket is not None and member is not attempt.member:
            ticket.moved()  # the first pod's lease is of no use to it now
        self.proxy.metrics.retries.labels(attempt.member.pod.name, cause.value).inc()
        self._go_to(member)
        return True

    def _may_go_again(self, cause: Cause | None = None) -> bool:
        plan = self.plan
        route = self.route
        return len(self.tried) - self.stale <= self.proxy.settings.pool_retries and may_go_again(
            cause or Cause.BUSY,
            method=plan.method,
            inference=route is not None and route.scope == INFERENCE,
            body_held=self.body.held is not None or not self.body.present,
            answer_seen=self.relay.head is not None,
        )

    async def _choose(self, avoid: Sequence[str] = ()) -> list[Member]:
        """The pods for this request, best first, by its model and conversation; a model no
        pod lists makes the pool read its pods' lists once more first."""
        wanted = self._wanted()
        members = self.pool.choose(wanted, self.plan.targets, avoid)
        if not members and wanted.model is not None and not avoid and self.pool.lists_nowhere(wanted.model):
            await self.pool.refresh_all()
            members = self.pool.choose(wanted, self.plan.targets, avoid)
        return members

    def _wanted(self) -> Wanted:
        """What the pool chooses by: the model (as Ollama names it) and the conversation;
        with one pod, nothing (there is nothing to weigh)."""
        if self.pool.single:
            return Wanted()
        info = self.body.info()
        named = info.model or self.plan.model
        model = canonical(named) if named is not None else None
        session = value_of(self.plan.headers, SESSION_HEADER)
        return Wanted(model, affinity_key(session, self.record.key, model, info.opening))

    def _nowhere(self) -> Rejection:
        """Why no pod takes the request: its model is on none (as Ollama says it), or none is up."""
        named = self.body.info().model or self.plan.model
        model = canonical(named) if named is not None else None
        if model is not None and self.pool.lists_nowhere(model):
            return Rejection(404, f"model '{named}' not found")
        return self.pool.unavailable()

    # -- endings ---------------------------------------------------------------------

    def end_early(self, rejection: Rejection) -> None:
        """Stop the exchange; answer the rejection if nothing has gone out yet, tell it
        in-band after a heartbeat's head while none of the upstream's body has, else cut."""
        self._abort(Abandoned())
        relay = self.relay
        if relay.own_format is not None and not relay.body_started:
            relay.tell_in_band(rejection.status, rejection.message)
            self.reply.finish()
        elif relay.head_sent or relay.head is not None:
            self.reply.cut()
        else:
            self.reply.refuse(rejection, closing=not self.body.received.done())

    def _on_silence(self) -> None:
        """Nothing moved for idle_timeout: the client stopped reading the answer or
        sending its body, or the upstream went quiet."""
        if self.relay.flow.pending is not None:
            self.record.outcome = "timeout"  # as nginx's send_timeout: the client took nothing
            self._abort(Abandoned())
            self.reply.cut()
        elif not self.body.client_turn:
            self._abort(IdleTimeout())
        elif self.failure is not None:
            self.end_early(self.failure.rejection)  # the upstream failed, and the rest of the body is not coming
        else:
            self.record.outcome = "timeout"
            self.end_early(Rejection(408, f"the client sent no body bytes for {self.proxy.idle_timeout:g} s"))

    def client_left(self) -> None:
        """The client has gone: nothing more is relayed, the upstream is let go, and a
        request still in the queue leaves it (no pod ever sees it)."""
        if self.ticket is not None:
            self.ticket.abandon()
        if self.record.outcome is None and self.relay.head is not None:
            self.proxy.metrics.client_disconnects.inc()
        self._abort(Abandoned())
        self.body.arrived()

    def stop_beating(self) -> None:
        self.relay.stop()  # no heartbeat goes to nobody

    def _abort(self, error: Exception) -> None:
        if self.attempt is not None:
            self.attempt.abort(error)
        self.body.stop()

    def end(self) -> None:
        """Once, as the request ends: what it asked for and was told into the record, and
        everything it held given back."""
        self.proxy.exchanges.discard(self)
        self.proxy.metrics.in_flight.dec()
        self.watch.stop()
        self.relay.stop()
        if self.relay.head is not None:
            self.proxy.metrics.streams.dec()
        # Its callbacks are this journey's methods: without this cycle the journey
        # is freed at once instead of at the next full collection.
        self.attempt = None
        self._read_usage()
        self._leave_queue()
        self._settle_quota()
        self._release_hold()
        if self.ticket is not None:
            self.record.queued_ms = self.ticket.waited_ms
            self.ticket.let_go()

    def _leave_queue(self) -> None:
        """A generation that went from the queue has ended (its last attempt, when it was
        sent again: its key counts it, and its lease is kept, until then): the queue learns
        what it used (Ollama's counts, or its estimate when they are missing)."""
        if self.ticket is not None and self.ticket.running:  # its counts are read once
            self.ticket.ended(self._used())

    def _settle_quota(self, used: int | None = None) -> None:
        """The request has ended: its key's quota is charged what it used, not what it
        reserved: `used` when the journey knows it, else Ollama's counts; without them (an
        error, a client that left, a model's load) its prompt's estimate and a token per
        line relayed."""
        reservation = self.reservation
        if reservation is not None:
            used = self._used() if used is None else used
            reservation.settle(reservation.prompt + self.relay.lines if used is None else used)

    def _used(self) -> int | None:
        """The tokens Ollama says the generation used, prompt and output; None if it did not say."""
        relay = self.relay
        counters = relay.usage.counters() if relay.usage is not None else None
        if counters is None or counters.prompt_tokens is None or counters.completion_tokens is None:
            return None
        return counters.prompt_tokens + counters.completion_tokens

    # -- what the idle watch and the heartbeats look at --------------------------------

    def _progress(self) -> int:
        """What has moved so far, in either direction (the idle watch compares it): a
        client slow to read moves too, as long as it takes bytes."""
        moved = self.record.bytes_in + self.body.written
        if self.attempt is not None:
            moved += self.attempt.received
        moved += self.relay.flow.taken
        return moved

    # -- what the record and the status page say -------------------------------------

    def _read_usage(self) -> None:
        """What the request asked for and what Ollama reported, into the record."""
        body, relay, record = self.body, self.relay, self.record
        info = body.info()
        record.model, record.stream = info.model, info.stream
        if relay.usage is None or relay.head is None or not 200 <= relay.head.code < 300:
            return
        assert self.route is not None
        if relay.first_body_at is not None and answer_format(self.route.answer, info.stream) in ("ndjson", "sse"):
            record.ttft_ms = round((relay.first_body_at - self.started) * 1000, 3)
        counters = relay.usage.counters()
        record.prompt_tokens, record.completion_tokens = counters.prompt_tokens, counters.completion_tokens
        record.tokens_per_s, record.load_ms = counters.tokens_per_s, counters.load_ms

    def status_row(self) -> dict[str, Any]:
        """This request as the status page lists it while it is under way."""
        record, body = self.record, self.body
        model = body.info().model if body.received.done() else None
        return {
            "route": record.route,
            "method": record.method_out or record.method_in,
            "model": model,
            "client": record.client,
            "key": record.key,
            "upstream": record.upstream,
            "age_s": round(time.monotonic() - self.started, 1),
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "chunks": record.chunks,
        }


def _merge_body(body: bytes, route: Route) -> bytes:
    """Apply an alias's body defaults; the client's own values win."""
    data = json_object(body)
    if data is None:
        raise Rejection(400, f'{route.path} needs a JSON object body, such as {{"model": "llama3.2"}}')
    assert route.body_defaults is not None
    return json.dumps({**route.body_defaults, **data}).encode()


def _format_now(route: Route | None, body: BodyPump) -> str | None:
    """The answer's format as far as the body tells it now (a body still arriving
    gets the route's default)."""
    assert route is not None
    return answer_format(route.answer, body.info().stream)


def _answer_format(route: Route | None, body: BodyPump) -> str | None:
    """The answer's format, for heartbeats (only on routes whose `answer` is set);
    None while an event-stream route's body cannot tell it yet (still arriving, or
    too large to read): its default, one JSON document, would put a space before
    the first event of a stream, and a field named " data" is no data to a client."""
    assert route is not None
    if route.answer == "sse" and not body.readable:
        return None
    return _format_now(route, body)
