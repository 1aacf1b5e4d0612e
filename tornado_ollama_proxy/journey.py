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
import json
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tornado.httputil import HTTPHeaders

from .attempt import Attempt, Failure
from .body import BodyPump
from .errors import Rejection
from .framing import Head, MalformedAnswer
from .idle import Silence
from .peer_json import json_object
from .record import AccessRecord
from .relay import AnswerRelay, ClientFlow, Reply
from .routes import Route
from .upstream import Abandoned, IdleTimeout
from .usage import AnswerTail, answer_format, read_counters

if TYPE_CHECKING:
    from tornado.http1connection import HTTP1Connection

    from .proxy import Proxy


@dataclass(slots=True)
class Plan:
    """What goes upstream: the method, the target (path and query as on the wire), the headers."""

    method: str
    target: str
    headers: HTTPHeaders


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
        *,
        method_in: str,
        started: float,
    ):
        self.proxy = proxy
        self.reply = reply
        self.connection = connection
        self.record = record
        self.route = route
        self.body = body
        self.method_in = method_in
        self.started = started
        self.generation = route is not None and route.tokens  # counted per model
        self.plan: Plan | None = None
        self.attempt: Attempt | None = None
        self.relay: AnswerRelay | None = None
        self.failure: Failure | None = None  # what the attempt's end means, once it has ended
        self.settled = False
        self.watch = Silence(proxy.upstream.idle_timeout, self._progress, self._on_silence)
        proxy.metrics.in_flight.inc()
        proxy.exchanges.add(self)

    # -- the way there ---------------------------------------------------------------

    def go(self, plan: Plan) -> None:
        """Start at once with a streamed body (or none); a held body waits for `body_in`."""
        self.plan = plan
        if self.body.held is None:
            self._attempt(body_producer=self.body.produce if self.body.present else None)

    def body_in(self) -> None:
        """The client's whole body is in: a held one goes now (an alias's defaults merged in,
        or `Rejection` 400)."""
        self.body.arrived()
        if self.body.held is None or self.attempt is not None:
            return
        assert self.plan is not None
        content = self.body.whole()
        route = self.route
        if route is not None and route.body_defaults:
            content = _merge_body(content, route)
        self.plan.headers["Content-Length"] = str(len(content))
        self._attempt(body=content)

    def _attempt(self, **body: Any) -> None:
        plan = self.plan
        assert plan is not None
        record = self.record
        record.method_out = plan.method
        if plan.method != self.method_in:
            self.proxy.metrics.corrections.labels(record.route, self.method_in, plan.method).inc()
        route = self.route
        self.relay = relay = AnswerRelay(
            self.reply,
            ClientFlow(self.connection, self.reply.on_connection_close),
            record,
            started=self.started,
            upstream_head=plan.method == "HEAD",
            answer_format=self._answer_format,
            heartbeat=self.proxy.settings.heartbeat_seconds if route is not None and route.answer else None,
            usage=AnswerTail(self._format_now()) if self.generation else None,
        )
        self.attempt = Attempt(
            self.proxy.upstream,
            plan.method,
            plan.target,
            plan.headers,
            on_head=self._on_head,
            on_piece=relay.on_piece,
            **body,
        )
        self.attempt.fetching.add_done_callback(self._on_fetched)

    def _on_head(self, head: Head) -> None:
        assert self.relay is not None
        self.relay.on_head(head)
        self.proxy.metrics.streams.inc()

    def _on_fetched(self, _: asyncio.Future[Any]) -> None:
        """The exchange ended: what is still to come of the body is dropped, and what
        the end means is recorded (once, whoever learns of it first)."""
        if self.settled or self.attempt is None:
            return
        self.settled = True
        self.body.stop()
        self.failure = failure = self.attempt.ended()
        if failure is None and self.relay is not None and not self.relay.complete:
            # The exchange ended cleanly, but the answer it decoded did not.
            failure = self.failure = Failure(
                *self.proxy.upstream.failure(MalformedAnswer("the encoded answer ended before its end"))
            )
        if failure is not None:
            self.proxy.metrics.upstream_errors.labels(failure.kind).inc()
            self.record.outcome = "timeout" if failure.kind.endswith("timeout") else "upstream_error"
        elif self.attempt.fetching.exception() is None:
            # Every piece has been handed to the kernel: a client leaving now loses nothing.
            self.record.outcome = self.record.outcome or "ok"

    async def settle(self) -> None:
        """Wait for the answer's end (the client's whole body is in), then end the request accordingly."""
        attempt = self.attempt
        assert attempt is not None and self.relay is not None
        with suppress(Exception):  # _on_fetched reads it
            await attempt.fetching
        # An end that came before this wait began may not have been seen yet.
        self._on_fetched(attempt.fetching)
        if self.reply.answered:
            return
        if self.failure is not None:
            self.end_early(self.failure.rejection)
            return
        if self.relay.error_body is not None:
            self.relay.tell_in_band()  # after a heartbeat's head, Ollama's error goes in-band
        self.reply.finish()

    # -- endings ---------------------------------------------------------------------

    def end_early(self, rejection: Rejection) -> None:
        """Stop the exchange; answer the rejection if nothing has gone out yet, tell it
        in-band after a heartbeat's head while none of the upstream's body has, else cut."""
        self._abort(Abandoned())
        relay = self.relay
        if relay is not None and relay.own_format is not None and not relay.body_started:
            relay.tell_in_band(rejection.status, rejection.message)
            self.reply.finish()
        elif relay is not None and (relay.head_sent or relay.head is not None):
            self.reply.cut()
        else:
            self.reply.refuse(rejection, closing=not self.body.received.done())

    def _on_silence(self) -> None:
        """Nothing moved for idle_timeout: the client stopped reading the answer or
        sending its body, or the upstream went quiet."""
        if self.relay is not None and self.relay.flow.pending is not None:
            self.record.outcome = "timeout"  # as nginx's send_timeout: the client took nothing
            self._abort(Abandoned())
            self.reply.cut()
        elif not self.body.client_turn:
            self._abort(IdleTimeout())
        elif self.failure is not None:
            self.end_early(self.failure.rejection)  # the upstream failed, and the rest of the body is not coming
        else:
            self.record.outcome = "timeout"
            self.end_early(Rejection(408, f"the client sent no body bytes for {self.proxy.upstream.idle_timeout:g} s"))

    def client_left(self) -> None:
        """The client has gone: nothing more is relayed, and the upstream is let go."""
        if self.record.outcome is None and self.relay is not None and self.relay.head is not None:
            self.proxy.metrics.client_disconnects.inc()
        self._abort(Abandoned())
        self.body.arrived()

    def stop_beating(self) -> None:
        if self.relay is not None:
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
        if self.relay is not None:
            self.relay.stop()
            if self.relay.head is not None:
                self.proxy.metrics.streams.dec()
        # Its callbacks are this journey's methods: without this cycle the journey
        # is freed at once instead of at the next full collection.
        self.attempt = None
        self._read_usage()

    # -- what the idle watch and the heartbeats look at --------------------------------

    def _progress(self) -> int:
        """What has moved so far, in either direction (the idle watch compares it): a
        client slow to read moves too, as long as it takes bytes."""
        moved = self.record.bytes_in + self.body.written
        if self.relay is not None:
            moved += self.relay.pieces + self.relay.flow.taken
        return moved

    def _format_now(self) -> str | None:
        """The answer's format as far as the body tells it now (a body still arriving
        gets the route's default)."""
        assert self.route is not None
        return answer_format(self.route.answer, self.body.info().stream)

    def _answer_format(self) -> str | None:
        """The answer's format, for heartbeats (only on routes whose `answer` is set);
        None while an event-stream route's body cannot tell it yet (still arriving, or
        too large to read): its default, one JSON document, would put a space before
        the first event of a stream, and a field named " data" is no data to a client."""
        assert self.route is not None
        if self.route.answer == "sse" and not self.body.readable:
            return None
        return self._format_now()

    # -- what the record and the status page say -------------------------------------

    def _read_usage(self) -> None:
        """What the request asked for and what Ollama reported, into the record."""
        body, relay, record = self.body, self.relay, self.record
        info = body.info()
        record.model, record.stream = info.model, info.stream
        if relay is None or relay.usage is None or relay.head is None or not 200 <= relay.head.code < 300:
            return
        assert self.route is not None
        if relay.first_body_at is not None and answer_format(self.route.answer, info.stream) in ("ndjson", "sse"):
            record.ttft_ms = round((relay.first_body_at - self.started) * 1000, 3)
        counters = read_counters(relay.usage.bytes())
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
