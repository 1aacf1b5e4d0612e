"""The request handlers: the forwarding proxy and the proxy's own endpoints.

A forwarded request flows through three parts, each with one job:
`body.BodyPump` takes the client's body upstream, `relay.AnswerRelay` takes
the answer back to the client (with backpressure in `relay.ClientFlow`), and
`ending` watches for silence and accounts for the request once. The handler
below is the Tornado-facing shell that plans the request, admits it, starts
the upstream exchange, and chooses how it ends: cleanly, with an error, or
by cutting the connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import suppress
from http.client import responses
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from tornado import httputil
from tornado.web import RequestHandler, stream_request_body

from . import cors
from .auth import MANAGE, METRICS
from .body import ALIAS_BODY_LIMIT, SMALL_BODY, BodyPump
from .clients import client_address, in_networks, is_loopback, parse_address
from .codings import decodable
from .ending import AccessRecord, Silence, account
from .errors import Rejection, error_answer
from .framing import LARGEST_BODY, Head, declared_body
from .headers import upstream_request_headers
from .logs import REQUEST_ID_HEADER, accept_request_id, bounded, request_id_var
from .proxy import Proxy
from .ratelimit import Admission, RateLimited
from .relay import AnswerRelay, ClientFlow, peer_closed
from .routes import METHODS, Route, check_target, decide_method, is_reserved
from .upstream import Abandoned, IdleTimeout
from .upstream_client import AbortableRequest
from .usage import AnswerTail, answer_format, read_counters

if TYPE_CHECKING:
    from tornado.http1connection import HTTP1Connection

JSON_TYPE = "application/json; charset=utf-8"
# A refusal waits for a body up to this size, read and dropped, so that the
# connection stays usable (a keep-alive front shares it); past it, the answer
# goes at once with Connection: close.
DISCARD_LIMIT = 64 * 1024
HEADER_LIMIT = 1024  # characters of a request header's value an access record keeps (log_headers)
PATH_LIMIT = 2048  # characters of a request path an access record keeps


class BaseHandler(RequestHandler):
    """What every answer shares: a request id, Ollama-shaped errors, and at its end
    one access record and the request metrics."""

    forwarded = False  # meant for Ollama (on the status board), not for the proxy itself
    # The route label of its metrics: fixed per handler, never the path a client chose.
    label: str

    def __init__(self, application: Any, request: httputil.HTTPServerRequest, **kwargs: Any) -> None:
        # Set before Tornado starts the handler's task, so the task and every
        # task it starts carry the id into their log records.
        self.request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        request_id_var.set(self.request_id)
        self.proxy: Proxy = application.settings["proxy"]
        client = client_address(request.remote_ip, request.headers, self.proxy.trusted_networks)
        self.record = AccessRecord(
            self.request_id, client, request.method or "GET", bounded(request.path, PATH_LIMIT), self.label
        )
        self.started = time.monotonic()
        self.generation = False  # a route that reports tokens: counted per model
        self._ended = False
        self.proxy.in_flight.enter()
        super().__init__(application, request, **kwargs)

    def set_default_headers(self) -> None:
        self.set_header(REQUEST_ID_HEADER, self.request_id)  # also after an error's reset

    def compute_etag(self) -> None:
        return None  # relayed answers carry the upstream's headers, none invented

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.answer_error(Rejection(status_code, responses.get(status_code, "error").lower()))

    def answer_error(self, rejection: Rejection) -> None:
        """Answer `{"error": message}` with the rejection's status and headers."""
        self.record.outcome = self.record.outcome or "rejected"
        self.set_status(rejection.status)
        for name, value in rejection.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", JSON_TYPE)
        self.finish(error_answer(self.request.path, rejection.status, rejection.message))

    async def authenticate(self, scope: str) -> None:
        """Ask the authenticator, if any, who the request acts as; a `Rejection` refuses it."""
        authenticator = self.proxy.authenticator
        if authenticator is None:
            return
        record = self.record
        try:
            record.key = await authenticator.authenticate(
                self.request.headers, unquote(record.path), scope, record.client
            )
        except Rejection as refusal:
            record.key = getattr(refusal, "name", None)  # a known key without the scope
            record.outcome = "forbidden" if refusal.status == 403 else "unauthorized"
            self.proxy.metrics.auth_failures.labels(getattr(refusal, "reason", "refused")).inc()
            raise

    def on_finish(self) -> None:
        self.end()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.record.outcome = self.record.outcome or "client_gone"
        self.end()

    def end(self) -> None:
        """Account for the request once, whichever way it ended."""
        if self._ended:
            return
        self._ended = True
        self.proxy.in_flight.leave()
        record = self.record
        if not record.in_band:
            record.status = self.get_status()
        record.duration_ms = round((time.monotonic() - self.started) * 1000, 3)
        record.outcome = record.outcome or "ok"
        allowed = self.proxy.settings.log_headers
        headers = self.request.headers
        secret = self.proxy.secret_headers
        logged = (
            {
                name: "***" if name.lower() in secret else bounded(headers[name], HEADER_LIMIT)
                for name in allowed
                if name in headers
            }
            if allowed
            else None
        )
        account(self.proxy, record, logged, self.forwarded, self.generation)


@stream_request_body
class ProxyHandler(BaseHandler):
    SUPPORTED_METHODS = METHODS
    forwarded = True
    label = "unmapped"  # until the route table names the route

    def initialize(self) -> None:
        self.proxy.metrics.in_flight.inc()
        self.proxy.exchanges.add(self)
        self.watch: Silence | None = None
        self.body: BodyPump | None = None
        self.route: Route | None = None
        self.relay: AnswerRelay | None = None
        # An answer decided before the body was read (a refusal, a preflight):
        # given once the body is in, so that the connection stays usable.
        self.early: Callable[[], None] | None = None
        self.admission: Admission | None = None
        self.added_headers: dict[str, str] = {}  # CORS and rate-limit headers for every answer
        self.upstream_request: AbortableRequest | None = None
        self.fetching: asyncio.Future[Any] | None = None
        self.fetched = False
        self.answered = False  # an answer is complete, or cut: nothing more to write
        self.failure: Rejection | None = None  # what to tell the client about an upstream failure
        self.pending: tuple[str, str, httputil.HTTPHeaders] | None = None  # waits for a held body

    # -- request side -------------------------------------------------------

    async def prepare(self) -> None:
        request = self.request
        request.connection.set_max_body_size(LARGEST_BODY)  # type: ignore[union-attr]
        try:
            declared = declared_body(request.headers)
        except Rejection as rejection:
            self.answer_closing(rejection)  # Tornado will refuse to read this body
            return
        settings = self.proxy.settings
        self.body = body = BodyPump(declared, settings.max_body_size, self.record)
        self.watch = Silence(self.proxy.upstream.idle_timeout, self._progress, self._on_silence)
        if self.proxy.draining:
            self.set_header("Connection", "close")
            self.answer_early(self._answer, Rejection(503, "the proxy is shutting down; retry", {"Retry-After": "1"}))
            return
        origin = cors.allowed_origin(request.headers.get("Origin"), settings.cors_origins)
        preflight = cors.is_preflight(request.headers) and declared == 0
        if origin is not None and preflight:
            self.answer_early(self._answer_preflight, origin)
            return
        if origin is not None:
            self.added_headers.update(cors.response_headers(origin))
        if self.proxy.authenticator is None:
            self.proxy.notice_forwarding(request.headers)
        try:
            self.route, params = route, _ = self._match()
            if not preflight:  # one the proxy does not grant goes to Ollama, whose answer it is
                await self.authenticate(route.scope if route is not None else MANAGE)
            method, target = self._plan(route, params, declared, preflight)
            await self._admit()
        except Rejection as rejection:
            self.answer_early(self._answer, rejection)
            return
        if peer_closed(self.request.connection.stream):  # type: ignore[union-attr]
            # The client left while the proxy waited (Tornado reads nothing during
            # prepare, so it does not say yet): nothing goes upstream, whatever body
            # is there is dropped, and what the request holds is given back as it ends.
            self.answered = True
            self.record.outcome = "client_gone"
            self.early = lambda: None  # nobody to answer
            return
        authenticator = self.proxy.authenticator
        headers = upstream_request_headers(
            request.headers,
            upstream_host=self.proxy.upstream.host,
            client_ip=request.remote_ip,
            scheme=request.protocol,
            trusted_peer=in_networks(parse_address(request.remote_ip), self.proxy.trusted_networks),
            removed=authenticator.removed_headers if authenticator is not None else (),
        )
        if origin is not None:
            del headers["Origin"]  # granted here; Ollama would refuse it
        if route is not None and route.answer and settings.heartbeat_seconds and "Accept-Encoding" in headers:
            # An answer after a heartbeat's head must be decoded: offer only what can be.
            offered = decodable(headers["Accept-Encoding"])
            del headers["Accept-Encoding"]
            if offered is not None:
                headers["Accept-Encoding"] = offered
        headers[REQUEST_ID_HEADER] = self.request_id
        if route is not None and route.body_defaults and body.present:
            body.hold(ALIAS_BODY_LIMIT)
        elif declared is not None and 0 < declared <= SMALL_BODY:
            body.hold(SMALL_BODY)
        elif route is not None and (route.answer or route.tokens):
            body.keep_copy()  # what it asks for decides the answer's format, and is accounted
        if body.held is not None:
            self.pending = (method, target, headers)
            return
        self._start(method, target, headers, body_producer=body.produce if body.present else None)

    def _match(self) -> tuple[Route | None, dict[str, str]]:
        """The route table's entry for the target (None outside it), or a `Rejection` for a bad target."""
        request = self.request
        check_target(request.uri or "/")
        if is_reserved(request.path):
            raise Rejection(404, f"{request.path} is not an endpoint of this proxy")
        matched = self.proxy.routes.match(request.path)
        if matched is None:
            return None, {}
        self.record.route = matched[0].path
        self.generation = matched[0].tokens
        return matched

    def _plan(
        self, route: Route | None, params: dict[str, str], declared: int | None, preflight: bool
    ) -> tuple[str, str]:
        """The method and target to send upstream, or a `Rejection`."""
        request = self.request
        if route is None and self.proxy.settings.unmapped_paths == "reject":
            raise Rejection(404, f"{request.path} is not an Ollama endpoint this proxy knows")
        method = (
            "OPTIONS" if preflight else decide_method(route, request.method or "GET", request.headers, declared != 0)
        )
        limit = self.proxy.settings.max_body_size
        if limit is not None and declared is not None and declared > limit:
            raise Rejection(413, f"request body is larger than max_body_size ({limit} bytes)")
        path = (route.upstream_target(params) if route else None) or request.path
        return method, path + (request.uri or "/")[len(request.path) :]

    async def _admit(self) -> None:
        """Ask the limiter, if any, before anything goes upstream; exempt networks skip it."""
        limiter = self.proxy.limiter
        client = self.record.client
        if limiter is None or in_networks(parse_address(client), self.proxy.exempt_networks):
            return
        key = client
        key_header = self.proxy.settings.client_key_header
        if self.record.key is not None:
            key = "name:" + self.record.key  # an access key's name: checked, so it may name the bucket
        elif key_header and key_header in self.request.headers:
            # Keys are stored hashed: a shared Redis never holds an API key.
            key = "key:" + hashlib.sha256(self.request.headers[key_header].encode()).hexdigest()[:32]
        try:
            admission = await limiter.admit(key, self.record.route)
        except RateLimited as refusal:
            self.record.outcome = "rate_limited"
            self.proxy.metrics.rate_limited.labels(self.record.route, refusal.reason).inc()
            raise
        self.admission = admission
        self.added_headers.update(admission.headers)

    async def data_received(self, chunk: bytes) -> None:
        # Tornado stops delivering the body once a response has been finished.
        body = self.body
        assert body is not None
        if self.early is not None:
            self.record.bytes_in += len(chunk)
            if self.record.bytes_in > DISCARD_LIMIT:
                self._answer_early_now()  # too much to read for nothing
            return
        try:
            await body.feed(chunk)
        except Rejection as rejection:
            self._end_early(rejection)

    async def get(self) -> None:
        """Every method lands here once the client's body has been received."""
        body = self.body
        assert body is not None
        body.arrived()
        if self.early is not None:
            self.early()
            return
        if self.pending is not None:
            method, target, headers = self.pending
            content = body.whole()
            route = self.route
            if route is not None and route.body_defaults:
                try:
                    content = _merge_body(content, route)
                except Rejection as rejection:
                    self._answer(rejection)
                    return
            headers["Content-Length"] = str(len(content))
            self._start(method, target, headers, body=content)
        await self._exchange()

    head = post = put = patch = delete = options = get

    # -- upstream exchange --------------------------------------------------

    def _start(self, method: str, target: str, headers: httputil.HTTPHeaders, **body: Any) -> None:
        assert self.watch is not None and self.body is not None
        self.record.method_out = method
        if method != self.request.method:
            self.proxy.metrics.corrections.labels(self.record.route, self.request.method, method).inc()
        connection: HTTP1Connection = self.request.connection  # type: ignore[assignment]
        route = self.route
        self.relay = relay = AnswerRelay(
            self,
            ClientFlow(connection, self.watch, self.on_connection_close),
            self.record,
            started=self.started,
            upstream_head=method == "HEAD",
            added_headers=self.added_headers,
            answer_format=self._answer_format,
            heartbeat=self.proxy.settings.heartbeat_seconds if route is not None and route.answer else None,
            usage=AnswerTail(self._format_now())
            if self.generation
            else None,  # the counters are in its last record either way
        )
        self.upstream_request = request = self.proxy.upstream.request(
            method, target, headers, head_callback=self._on_head, streaming_callback=relay.on_piece, **body
        )
        self.fetching = fetching = self.proxy.upstream.fetch(request)
        fetching.add_done_callback(self._on_fetched)

    def _format_now(self) -> str | None:
        """The answer's format as far as the body tells it now (a body still arriving
        gets the route's default)."""
        assert self.route is not None and self.body is not None
        return answer_format(self.route.answer, self.body.info().stream)

    def _answer_format(self) -> str | None:
        """The answer's format, for heartbeats (only on routes whose `answer` is set);
        None while an event-stream route's body cannot tell it yet (still arriving, or
        too large to read): its default, one JSON document, would put a space before
        the first event of a stream, and a field named " data" is no data to a client."""
        assert self.route is not None and self.body is not None
        if self.route.answer == "sse" and not self.body.readable:
            return None
        return self._format_now()

    def _on_head(self, head: Head) -> None:
        assert self.relay is not None
        self.relay.on_head(head)
        self.proxy.metrics.streams.inc()

    def _on_fetched(self, fetching: asyncio.Future[Any]) -> None:
        """The exchange ended: what is still to come of the body is dropped, and
        what the end means is recorded (once, whoever learns of it first)."""
        assert self.body is not None
        if self.fetched:
            return
        self.fetched = True
        self.body.stop()
        error = fetching.exception()
        if error is None:
            # Every piece has been handed to the kernel: a client leaving now loses nothing.
            self.record.outcome = self.record.outcome or "ok"
            return
        if isinstance(error, Abandoned):
            return  # the proxy ended it, and the ending says why
        kind, self.failure = self.proxy.upstream.failure(error)
        self.proxy.metrics.upstream_errors.labels(kind).inc()
        self.record.outcome = "timeout" if kind.endswith("timeout") else "upstream_error"

    async def _exchange(self) -> None:
        """Wait for the answer's end (the client's whole body is in), then end the request accordingly."""
        assert self.fetching is not None and self.relay is not None
        with suppress(Exception):  # _on_fetched reads it
            await self.fetching
        # An end that came before this wait began may not have been seen yet.
        self._on_fetched(self.fetching)
        if self.answered:
            return
        if self.failure is not None:
            self._end_early(self.failure)
            return
        self.answered = True
        if self.relay.error_body is not None:
            self.relay.tell_in_band()  # after a heartbeat's head, Ollama's error goes in-band
        self.finish()

    def _progress(self) -> int:
        """What has moved so far, in either direction (the idle watch compares it)."""
        assert self.body is not None
        moved = self.record.bytes_in + self.body.written
        if self.relay is not None:
            moved += self.relay.pieces + self.relay.flow.sent
        return moved

    # -- endings --------------------------------------------------------------

    def answer_early(self, answer: Callable[[Any], None], argument: Any) -> None:
        """An answer decided before the body was read: given once a small body has
        been read and dropped (the connection stays usable), else at once."""
        body = self.body
        assert body is not None
        self.early = lambda: answer(argument)
        if body.declared is not None and body.declared > DISCARD_LIMIT:
            self._answer_early_now()

    def _answer_early_now(self) -> None:
        assert self.early is not None
        self.set_header("Connection", "close")
        self.early()

    def answer_closing(self, rejection: Rejection) -> None:
        """Answer, and close the connection (the answer says so)."""
        self.set_header("Connection", "close")
        self._answer(rejection)

    def _answer(self, rejection: Rejection) -> None:
        self.answered = True
        for name, value in self.added_headers.items():
            self.add_header(name, value)  # so a browser app can read the error, and see its limits
        self.answer_error(rejection)

    def _answer_preflight(self, origin: str) -> None:
        self.answered = True
        self.record.outcome = "ok"
        self.set_status(204)
        self.clear_header("Content-Type")
        for name, value in cors.preflight_headers(origin, self.request.headers).items():
            self.set_header(name, value)
        self.finish()

    def _end_early(self, rejection: Rejection) -> None:
        """Stop the exchange; answer the rejection if nothing has gone out yet, tell it
        in-band after a heartbeat's head while none of the upstream's body has, else cut."""
        self._abort_upstream(Abandoned())
        relay = self.relay
        if relay is not None and relay.own_format is not None and not relay.body_started:
            self.answered = True
            relay.tell_in_band(rejection.status, rejection.message)
            self.finish()
        elif relay is not None and (relay.head_sent or relay.head is not None):
            self._cut()
        elif self.body is not None and self.body.received.done():
            self._answer(rejection)
        else:
            self.answer_closing(rejection)

    def _on_silence(self) -> None:
        """Nothing moved for idle_timeout: the client stopped sending its body, or the upstream went quiet."""
        assert self.body is not None
        if not self.body.client_turn:
            self._abort_upstream(IdleTimeout())
        elif self.early is not None:
            self._answer_early_now()
        elif self.failure is not None:
            self._end_early(self.failure)  # the upstream failed, and the rest of the body is not coming
        else:
            self.record.outcome = "timeout"
            self._end_early(Rejection(408, f"the client sent no body bytes for {self.proxy.upstream.idle_timeout:g} s"))

    def _abort_upstream(self, error: Exception) -> None:
        if self.upstream_request is not None:
            self.upstream_request.abort(error)
        if self.body is not None:
            self.body.stop()

    def _cut(self) -> None:
        """End a response that has started without a clean end, so the client can tell."""
        self.answered = True
        self.request.connection.close()  # type: ignore[union-attr]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Connection", "close")  # a method it does not know, or worse: start afresh
        self.answered = True
        super().write_error(status_code, **kwargs)

    def finish(self, chunk: Any = None) -> asyncio.Future[None]:
        finishing = super().finish(chunk)
        if self._headers.get("Connection") == "close":
            # Said, so done: once the answer is out (Tornado closes by itself only
            # when the body was left unread).
            finishing.add_done_callback(lambda _: self.request.connection.close())  # type: ignore[union-attr]
        return finishing

    def on_connection_close(self) -> None:
        self.answered = True
        if self.relay is not None:
            self.relay.stop()  # no heartbeat goes to nobody
        # The rest on the next loop turn: an upstream end that arrived together
        # with the client's leaving is taken in first (by `_on_fetched`), so that
        # an answer the client had whole is not recorded as left half-way.
        asyncio.get_running_loop().call_soon(self._client_left)

    def _client_left(self) -> None:
        if self.record.outcome is None and self.relay is not None and self.relay.head is not None:
            self.proxy.metrics.client_disconnects.inc()
        self._abort_upstream(Abandoned())
        if self.body is not None:
            self.body.arrived()
        super().on_connection_close()

    def _read_usage(self) -> None:
        """What the request asked for and what Ollama reported, into the record."""
        body, relay, record = self.body, self.relay, self.record
        if body is None:
            return
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
        model = body.info().model if body is not None and body.received.done() else None
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

    def end(self) -> None:
        if not self._ended:
            self.proxy.exchanges.discard(self)
            self._read_usage()
            self.proxy.metrics.in_flight.dec()
            if self.relay is not None:
                self.relay.stop()
                if self.relay.head is not None:
                    self.proxy.metrics.streams.dec()
            if self.admission is not None:
                self.admission.release()
            if self.watch is not None:
                self.watch.stop()
        super().end()
        # Its callbacks are this handler's methods: without this cycle the
        # handler is freed at once instead of at the next full collection.
        self.upstream_request = None


class OwnEndpointHandler(BaseHandler):
    """The proxy's own endpoints need the metrics scope, unless their path is public."""

    async def prepare(self) -> None:
        try:
            await self.authenticate(METRICS)
        except Rejection as rejection:
            self.answer_error(rejection)


class HealthHandler(OwnEndpointHandler):
    """200 when the upstream answers like Ollama, 503 with the reason when it does not (or while draining)."""

    label = "health"

    async def get(self) -> None:
        if self.proxy.draining:
            status, body = 503, {"error": "the proxy is shutting down"}
        else:
            status, body = await self.proxy.health.status()
        self.set_status(status)
        self.set_header("Content-Type", JSON_TYPE)
        if self.request.method == "HEAD":
            self.set_header("Content-Length", str(len(json.dumps(body))))
            self.finish()
        else:
            self.finish(json.dumps(body))

    head = get


class MetricsHandler(OwnEndpointHandler):
    """Prometheus text exposition."""

    label = "metrics"

    def get(self) -> None:
        text, content_type = self.proxy.metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.finish(text)


class StatusHandler(OwnEndpointHandler):
    """The status page's figures: what is in flight, per-model usage, totals, the upstream's health."""

    label = "status"

    async def get(self) -> None:
        proxy = self.proxy
        _, upstream = await proxy.health.status()
        # Who uses the pod is for its operators: a key with the metrics scope, or this machine.
        private = self.record.key is not None or is_loopback(self.record.client)
        rows = sorted((h.status_row() for h in proxy.exchanges), key=lambda row: -row["age_s"])
        if not private:
            rows = [{**row, "client": None} for row in rows]
        status = {**proxy.board.snapshot(), "upstream": upstream, "in_flight": rows}
        self.set_header("Content-Type", JSON_TYPE)
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(status))


class StatusPageHandler(BaseHandler):
    """The status page: one self-contained HTML file (it works on a pod without internet)
    that fetches its figures from the status endpoint. It holds no figures itself, so it
    needs no key; the figures do."""

    label = "status_page"

    def initialize(self, page: bytes, policy: str) -> None:
        self.page = page
        self.policy = policy

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Content-Security-Policy", self.policy)
        self.finish(self.page)


class ProxyNotFoundHandler(BaseHandler):
    """The reserved /_proxy/ prefix is never forwarded."""

    label = "not_found"

    def prepare(self) -> None:
        self.answer_error(Rejection(404, f"{self.request.path} is not an endpoint of this proxy"))


def _merge_body(body: bytes, route: Route) -> bytes:
    """Apply an alias's body defaults; the client's own values win."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise Rejection(400, f'{route.path} needs a JSON object body, such as {{"model": "llama3.2"}}')
    assert route.body_defaults is not None
    return json.dumps({**route.body_defaults, **data}).encode()
