"""The request handlers: the forwarding proxy's Tornado-facing shell, and the proxy's own endpoints.

A forwarded request is planned and admitted here (`ProxyHandler.prepare`);
from there its `journey.Journey` takes the body upstream (`body.BodyPump`),
makes the attempt (`attempt.Attempt`), relays the answer (`relay.AnswerRelay`)
through this handler, and chooses how it ends: cleanly, with an error, or by
cutting the connection. Every request, forwarded or not, is accounted for
once when it ends (`proxy.Proxy.account`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from http.client import responses
from typing import Any
from urllib.parse import unquote

from tornado import httputil
from tornado.web import RequestHandler, stream_request_body

from . import cors
from .auth import INFERENCE, MANAGE, METRICS
from .body import ALIAS_BODY_LIMIT, SMALL_BODY, BodyPump
from .clients import client_address, in_networks, is_loopback, parse_address
from .codings import decodable
from .errors import Rejection, error_answer
from .fanout import FanOut, kind_of
from .framing import LARGEST_BODY, declared_body
from .headers import upstream_request_headers, value_of
from .idle import Silence
from .journey import Journey, Plan
from .logs import REQUEST_ID_HEADER, accept_request_id, bounded, request_id_var
from .proxy import Proxy
from .quota_ask import counted_path, uncounted_read
from .ratelimit import Admission, RateLimited
from .record import AccessRecord
from .relay import UPSTREAM_HEADER, peer_closed
from .routes import METHODS, Route, check_target, decide_method, is_reserved
from .token_windows import windows_of
from .tornado_private import ask_no_keep_alive, body_failure

JSON_TYPE = "application/json; charset=utf-8"
# A refusal waits for a body up to this size, read and dropped, so that the
# connection stays usable (a keep-alive front shares it); past it, the answer
# goes at once with Connection: close.
DISCARD_LIMIT = 64 * 1024
# An answer with Connection: close while the body still arrives is sent in full at
# once, but the connection is closed only once the body has been read (or has
# stopped coming for LINGER_QUIET, or after LINGER_TOTAL): nginx's lingering close.
# Closing with unread bytes sends a reset, and a front still sending the body
# (nginx with keepalive) drops the answer with it and tells its client 502.
LINGER_QUIET = 5.0
LINGER_TOTAL = 30.0
HEADER_LIMIT = 1024  # characters of a request header's value an access record keeps (log_headers)
PATH_LIMIT = 2048  # characters of a request path an access record keeps


_date_second, _date_text = 0, ""  # the last second formatted, and its HTTP date


def http_date() -> str:
    """The current time as an HTTP Date header says it (RFC 9110 §5.6.7)."""
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_text = now, httputil.format_timestamp(now)
    return _date_text


class BaseHandler(RequestHandler):
    """What every answer shares: a request id, Ollama-shaped errors, and at its end
    one access record and the request metrics."""

    forwarded = False  # meant for Ollama (on the status board), not for the proxy itself
    # The route label of its metrics: fixed per handler, never the path a client chose.
    label: str
    allowed: tuple[str, ...] = ("GET", "HEAD")  # what a 405 names in its Allow header

    def __init__(self, application: Any, request: httputil.HTTPServerRequest, **kwargs: Any) -> None:
        # Set before Tornado starts the handler's task, so the task and every
        # task it starts carry the id into their log records.
        self.request_id = accept_request_id(value_of(request.headers, REQUEST_ID_HEADER))
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

    def clear(self) -> None:
        """Tornado's reset of the answer (its private parts: see `tornado_private`), without
        its Server header (what runs the proxy is nobody's business) and with a Date
        formatted once a second, not once a request."""
        self._headers = httputil.HTTPHeaders({"Content-Type": "text/html; charset=UTF-8", "Date": http_date()})
        self.set_default_headers()
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = "OK"

    def set_default_headers(self) -> None:
        self.set_header(REQUEST_ID_HEADER, self.request_id)  # also after an error's reset

    def compute_etag(self) -> None:
        return None  # relayed answers carry the upstream's headers, none invented

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        headers = {"Allow": ", ".join(self.allowed)} if status_code == 405 else {}
        self.answer_error(Rejection(status_code, responses.get(status_code, "error").lower(), headers))

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
        # Tornado lets go of its template namespace, which holds the handler, only as it
        # finishes: a request that ended otherwise (its client left) would keep the two
        # in a cycle. So would the traceback of the error that closed the connection,
        # through the frames that were writing to it.
        self.ui = None  # type: ignore[assignment]
        closed_by = self.request.connection.stream.error  # type: ignore[union-attr]
        if closed_by is not None:
            closed_by.__traceback__ = None
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
        self.proxy.account(record, logged, self.forwarded, self.generation)


@stream_request_body
class ProxyHandler(BaseHandler):
    """The Tornado-facing shell of a forwarded request: it plans the request (route,
    key, method, admission) and answers refusals itself; the `Journey` does the rest,
    writing the answer through this handler (`relay.Reply`)."""

    SUPPORTED_METHODS = METHODS
    forwarded = True
    label = "unmapped"  # until the route table names the route
    allowed = METHODS

    def initialize(self) -> None:
        self.journey: Journey | None = None
        self.body: BodyPump | None = None
        # An answer decided before the body was read (a refusal, a preflight):
        # given once the body is in, so that the connection stays usable.
        self.early: Callable[[], None] | None = None
        self.early_watch: Silence | None = None
        self.lingering: Silence | None = None  # the answer is out; the body is read and dropped
        self.linger_deadline: asyncio.TimerHandle | None = None
        self.admission: Admission | None = None
        self.added_headers: dict[str, str] = {}  # CORS and rate-limit headers for every answer
        self.answered = False  # an answer is complete, or cut: nothing more to write
        self.client_head = self.request.method == "HEAD"

    # -- request side -------------------------------------------------------

    async def prepare(self) -> None:
        request = self.request
        request.connection.set_max_body_size(LARGEST_BODY)  # type: ignore[union-attr]
        try:
            declared = declared_body(request.headers)
        except Rejection as rejection:
            self.refuse(rejection, closing=True)  # Tornado will refuse to read this body
            return
        settings = self.proxy.settings
        self.body = body = BodyPump(declared, settings.max_body_size, self.record)
        if body.present:
            task = asyncio.current_task()  # Tornado's, which awaits the body once this returns
            assert task is not None
            task.add_done_callback(functools.partial(_forget_body_failure, request))
        if self.proxy.draining:
            self.set_header("Connection", "close")
            self.answer_early(self._answer, Rejection(503, "the proxy is shutting down; retry", {"Retry-After": "1"}))
            return
        origin = cors.allowed_origin(value_of(request.headers, "Origin"), settings.cors_origins)
        preflight = cors.is_preflight(request.headers) and declared == 0
        if origin is not None and preflight:
            self.answer_early(self._answer_preflight, origin)
            return
        if origin is not None:
            self.added_headers.update(cors.response_headers(origin))
        if self.proxy.authenticator is None:
            self.proxy.notice_forwarding(request.headers)
        try:
            route, params = self._match()
            if not preflight:  # one the proxy does not grant goes to Ollama, whose answer it is
                await self.authenticate(route.scope if route is not None else MANAGE)
            targets = await self._targets(route)
            method, target = self._plan(route, params, declared, preflight)
            quota = self._quota_counts(route, target)
            if declared is not None and declared > settings.hold_body_max:
                self._check_held(route, quota)
            await self._admit()
        except Rejection as rejection:
            self.answer_early(self._answer, rejection)
            return
        if peer_closed(self.request.connection.stream):  # type: ignore[union-attr]
            # The client left while the proxy waited (Tornado reads nothing during
            # prepare, so it does not say yet), or closed its side, which Tornado takes
            # for leaving too: nothing goes upstream, nothing is answered, and what the
            # request holds is given back as it ends.
            self.record.outcome = "client_gone"
            self.early = _nothing_more
            self.cut()
            return
        authenticator = self.proxy.authenticator
        headers = upstream_request_headers(
            request.headers,
            client_ip=request.remote_ip,
            scheme=request.protocol,
            trusted_peer=in_networks(parse_address(request.remote_ip), self.proxy.trusted_networks),
            removed=(UPSTREAM_HEADER, *(authenticator.removed_headers if authenticator is not None else ())),
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
        if quota:
            headers["Accept-Encoding"] = "identity"  # its counts are read on the way: nothing compressed
        several = not self.proxy.pool.single or self.proxy.queue is not None
        pooled = several and route is not None and route.scope == INFERENCE
        if route is not None and route.body_defaults and body.present:
            body.hold(ALIAS_BODY_LIMIT)
        elif declared is not None and 0 < declared <= SMALL_BODY:
            body.hold(SMALL_BODY)
        elif (pooled or quota) and body.present and (declared is None or declared <= settings.hold_body_max):
            # Its model chooses the pod, its size its place in the fair queue and its quota's
            # reservation, and a held body may go again: read it first.
            body.hold(settings.hold_body_max)
        elif route is not None and (route.answer or route.tokens):
            body.keep_copy()  # what it asks for decides the answer's format, and is accounted
        kind = None if self.proxy.pool.single else kind_of(method, target.partition("?")[0])
        way = Journey if kind is None else functools.partial(FanOut, kind=kind)
        self.journey = way(
            self.proxy,
            self,
            self.request.connection,  # type: ignore[arg-type]
            self.record,
            route,
            body,
            Plan(method, target, headers, targets, unquote(params["model"]) if "model" in params else None),
            method_in=request.method or "GET",
            started=self.started,
        )
        try:
            self.journey.go()
        except Rejection as rejection:  # no pod can take it
            self.answer_early(self._answer, rejection)

    def _check_held(self, route: Route | None, quota: bool) -> None:
        """`Rejection` 413 for a body over hold_body_max that a key's limit needs held: one
        a token quota counts (its output could not be capped), a generation of a key with
        `max_concurrent` (it could not wait in its line)."""
        bound = f"may be at most hold_body_max ({self.proxy.settings.hold_body_max} bytes)"
        if quota:
            raise Rejection(413, f"a request that a token quota counts {bound}: its output could not be capped")
        key = self.proxy.key_entries.get(self.record.key) if self.record.key is not None else None
        if key is not None and key.max_concurrent is not None and route is not None and route.tokens:
            raise Rejection(413, f"a generation of a key with max_concurrent {bound}: it could not wait its turn")

    def _quota_counts(self, route: Route | None, target: str) -> bool:
        """Whether the request's key has a token quota that counts it (by its upstream
        path); `Rejection` 403 for a call that may generate and that neither its quota nor
        its `max_concurrent` counts (a route it does not know, or any path outside the
        table): a limit that one route walks around is none."""
        key = self.proxy.key_entries.get(self.record.key) if self.record.key is not None else None
        quota = key is not None and bool(windows_of(key))
        if key is None or (not quota and key.max_concurrent is None):
            return False
        if counted_path(target) is not None:
            return quota
        if route is not None and (route.scope != INFERENCE or uncounted_read(route)):
            return False
        limit, holder = ("a token quota", "a key with a quota") if quota else ("max_concurrent", "a key with it")
        path = self.request.path[:200]
        raise Rejection(403, f"key {key.name!r} has {limit}, which does not count {path}: {holder} may not call it")

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

    async def _targets(self, route: Route | None) -> list[str] | None:
        """The pods `X-Ollama-Upstream` names (all of them for "all"), which only a key
        with the manage scope may choose; None without the header."""
        value = value_of(self.request.headers, UPSTREAM_HEADER)
        if value is None:
            return None
        if route is None or route.scope != MANAGE:
            await self.authenticate(MANAGE)
        pool = self.proxy.pool
        names = [name.strip() for name in value.split(",") if name.strip()]
        if names == ["all"]:
            return [pod.name for pod in pool.pods]
        unknown = next((name for name in names if name not in pool.by_name), None)
        if unknown is not None or not names:
            raise Rejection(
                400,
                f"{UPSTREAM_HEADER}: {bounded(unknown or value, 64)!r} names no pod of this proxy; "
                f"they are: all, {', '.join(pool.by_name)}",
            )
        return names

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
        if self.early is not None or self.lingering is not None:  # answered, or to be: read and dropped
            self.record.bytes_in += len(chunk)
            if self.lingering is None and self.record.bytes_in > DISCARD_LIMIT:
                self._answer_early_now()  # too much to read for nothing
            return
        journey = self.journey
        assert journey is not None and self.body is not None
        try:
            await self.body.feed(chunk)
        except Rejection as rejection:
            journey.end_early(rejection)

    async def get(self) -> None:
        """Every method lands here once the client's body has been received."""
        if self.lingering is not None:
            self._stop_lingering()  # the answer is out, and now the body is in
            return
        if self.early is not None:
            self.early()
            return
        journey = self.journey
        assert journey is not None
        try:
            journey.body_in()
        except Rejection as rejection:
            self.refuse(rejection, closing=False)
            return
        await journey.settle()

    head = post = put = patch = delete = options = get

    # -- the client's side of the answer (`relay.Reply`) ------------------------

    def take_head(self, code: int, reason: str | None, headers: Iterable[tuple[str, str]], *, relayed: bool) -> None:
        self.set_status(code, reason)
        self.clear_header("Content-Type")
        if relayed:  # none invented: the upstream said what it had to say
            self.clear_header("Server")
            self.clear_header("Date")
        for name, value in headers:
            self.add_header(name, value)
        if self.request.version == "HTTP/1.0" and not self._delimited(code):
            self.set_header("Connection", "close")  # the close is where the body ends
        self._add_headers()

    def _delimited(self, code: int) -> bool:
        """Whether an answer's end is clear without a close: it has no body, or its length."""
        return self.request.method == "HEAD" or code in (204, 304) or "Content-Length" in self._headers

    def add_answer_headers(self, headers: Mapping[str, str]) -> None:
        self.added_headers.update(headers)

    def _add_headers(self) -> None:
        for name, value in self.added_headers.items():
            self.add_header(name, value)  # so a browser app can read the answer, and see its limits
        self.set_header(REQUEST_ID_HEADER, self.request_id)

    def send_head(self, first: bytes = b"") -> None:
        if first:
            self.write(first)
        self.flush()

    def refuse(self, rejection: Rejection, closing: bool) -> None:
        if closing:
            self.set_header("Connection", "close")
        self._answer(rejection)

    def cut(self) -> None:
        self.answered = True
        self.request.connection.close()  # type: ignore[union-attr]

    # -- endings --------------------------------------------------------------

    def answer_early(self, answer: Callable[[Any], None], argument: Any) -> None:
        """An answer decided before the body was read: given once a small body has
        been read and dropped (the connection stays usable), else at once."""
        body = self.body
        assert body is not None
        self.early = lambda: answer(argument)
        if body.declared is not None and body.declared > DISCARD_LIMIT:
            self._answer_early_now()
        elif body.present:  # a client that stops sending it is answered anyway
            self.early_watch = Silence(self.proxy.idle_timeout, lambda: self.record.bytes_in, self._answer_early_now)

    def _answer_early_now(self) -> None:
        assert self.early is not None
        self.set_header("Connection", "close")
        self.early()

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

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Connection", "close")  # a method it does not know, or worse: start afresh
        self.answered = True
        super().write_error(status_code, **kwargs)

    def flush(self, include_footers: bool = False) -> asyncio.Future[None]:
        if self.request.version == "HTTP/1.0" and value_of(self._headers, "Connection") == "close":
            ask_no_keep_alive(self.request.connection)  # type: ignore[arg-type]  # else Tornado tells it "Keep-Alive"
        return super().flush(include_footers)

    def finish(self, chunk: Any = None) -> asyncio.Future[None]:
        self.answered = True
        if chunk is not None and value_of(self._headers, "Connection") == "close" and self._body_arriving():
            self.set_header("Content-Length", str(len(chunk)))  # whole now: the client need not wait
            self.write(chunk)
            self.flush()
            self._linger()
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        finishing = super().finish(chunk)
        if value_of(self._headers, "Connection") == "close":
            # Said, so done: once the answer is out (Tornado closes by itself only
            # when the body was left unread).
            finishing.add_done_callback(lambda _: self.request.connection.close())  # type: ignore[union-attr]
        return finishing

    def _body_arriving(self) -> bool:
        return self.lingering is None and self.body is not None and self.body.present and not self.body.received.done()

    def _linger(self) -> None:
        self.lingering = Silence(LINGER_QUIET, lambda: self.record.bytes_in, self._stop_lingering)
        self.linger_deadline = asyncio.get_running_loop().call_later(LINGER_TOTAL, self._stop_lingering)

    def _stop_lingering(self) -> None:
        """The body is in, or will not be: end the answer, and close."""
        self._stop_linger_timers()
        self.finish()

    def _stop_linger_timers(self) -> None:
        assert self.lingering is not None and self.linger_deadline is not None
        self.lingering.stop()
        self.linger_deadline.cancel()

    def on_connection_close(self) -> None:
        self.answered = True
        if self.journey is not None:
            self.journey.stop_beating()
        # The rest on the next loop turn: an upstream end that arrived together
        # with the client's leaving is taken in first, so that an answer the
        # client had whole is not recorded as left half-way.
        asyncio.get_running_loop().call_soon(self._client_left)

    def _client_left(self) -> None:
        if self.journey is not None:
            self.journey.client_left()
        elif self.body is not None:
            self.body.arrived()
        super().on_connection_close()

    def end(self) -> None:
        if not self._ended:
            try:
                if self.journey is not None:
                    self.journey.end()
                    # It holds this handler (its reply): kept, the two would stay in a
                    # cycle until the garbage collector finds it.
                    self.journey = None
            finally:  # whatever happens, nothing this request holds is kept
                if self.admission is not None:
                    self.admission.release()
                if self.early_watch is not None:
                    self.early_watch.stop()
                if self.early is not None:  # it holds this handler: a cycle, kept
                    self.early = _nothing_more
                # Tornado's frames reading a chunked body its client left hold the handler.
                self.body = None
                if self.lingering is not None:
                    self._stop_linger_timers()
        super().end()


def _forget_body_failure(request: httputil.HTTPServerRequest, _: object) -> None:
    """When a client leaves mid-body, Tornado fails the wait for the body, and the
    handler's task raises that error where it waited: its traceback holds the task's
    frame, the frame the handler, the handler the request, the request the error, in a
    cycle until the garbage collector finds it. Let go once the task has ended."""
    error = body_failure(request)
    if error is not None:
        error.__traceback__ = None


def _nothing_more() -> None:
    """The early answer of a request that has none to give, or no more (it has ended)."""


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

    head = get


class StatusHandler(OwnEndpointHandler):
    """The status page's figures: what is in flight, per-model usage, totals, the upstream's health."""

    label = "status"

    async def get(self) -> None:
        proxy = self.proxy
        _, upstream = await proxy.health.status()
        # Who uses the pod is for its operators: a key with the metrics scope, or this machine.
        # A key several people share does not make its holder an operator.
        key = proxy.key_entries.get(self.record.key) if self.record.key is not None else None
        private = (key is not None and not key.shared) or is_loopback(self.record.client)
        rows = sorted((h.status_row() for h in proxy.exchanges), key=lambda row: -row["age_s"])
        if not private:
            rows = [{**row, "client": None} for row in rows]
        # Every key's quota is for those who manage the pod (a key with the manage scope,
        # or this machine); a key holder sees its own.
        managing = is_loopback(self.record.client) or (key is not None and not key.shared and MANAGE in key.scopes)
        quota_keys = proxy.key_entries.values() if managing else [key] if key is not None else []
        status = {
            **proxy.board.snapshot(),
            "upstream": upstream,
            "upstreams": proxy.pool.snapshot(),
            "conflicts": proxy.pool.conflicts(),
            "queues": proxy.queue.snapshot(private) if proxy.queue is not None else [],
            "quotas": await proxy.quotas.usage(quota_keys) if proxy.quotas is not None else [],
            "in_flight": rows,
        }
        self.set_header("Content-Type", JSON_TYPE)
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(status))

    head = get


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

    head = get


class ProxyNotFoundHandler(BaseHandler):
    """The reserved /_proxy/ prefix is never forwarded."""

    label = "not_found"

    def prepare(self) -> None:
        self.answer_error(Rejection(404, f"{self.request.path} is not an endpoint of this proxy"))
