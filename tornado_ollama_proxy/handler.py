"""The request handlers: the forwarding proxy and the proxy's own endpoints.

A forwarded request goes through these steps, each in its own method:
`prepare` decides the method and target and starts the upstream fetch;
`data_received` streams the request body into it; the HTTP-method handler
marks the body complete and waits for `_exchange`, which relays the
response as it arrives (`_on_upstream_header`, `_on_upstream_chunk`) and
ends it cleanly, with an error, or by cutting the connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from contextlib import suppress
from typing import TYPE_CHECKING

from tornado import httputil
from tornado.iostream import IOStream, StreamClosedError
from tornado.web import RequestHandler, stream_request_body

from . import cors
from .clients import client_address, in_networks, parse_address
from .errors import Rejection, error_body
from .headers import end_to_end, upstream_request_headers
from .logs import (
    ACCESS_LOGGER,
    REQUEST_ID_HEADER,
    accept_request_id,
    request_id_var,
    sampled,
)
from .ratelimit import Admission, RateLimited
from .routes import METHODS, Route, check_target, decide_method
from .upstream import ClientGone, IdleTimeout
from .upstream_client import AbortableRequest

if TYPE_CHECKING:
    from .app import Proxy

access_log = logging.getLogger(ACCESS_LOGGER)

JSON_TYPE = "application/json; charset=utf-8"
# Alias bodies are held whole to merge their defaults in, up to this size.
SMALL_BODY_LIMIT = 1024 * 1024
# Tornado's server caps bodies at 100 MB by default; max_body_size is the proxy's own limit.
UNLIMITED = 2**62


class BaseHandler(RequestHandler):
    """What every answer shares: a request id, Ollama-shaped errors, and at its end
    one access record and the request metrics."""

    def __init__(self, application, request, **kwargs) -> None:
        # Set before Tornado starts the handler's task, so the task and every
        # task it starts carry the id into their log records.
        self.request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        request_id_var.set(self.request_id)
        self.proxy: Proxy = kwargs["proxy"]
        self.client = client_address(request.remote_ip, request.headers, self.proxy.trusted_networks)
        self.started = time.monotonic()
        self.outcome: str | None = None
        self._ended = False
        self.proxy.in_flight.enter()
        self.proxy.metrics.in_flight.inc()
        super().__init__(application, request, **kwargs)

    def initialize(self, proxy: Proxy) -> None:
        pass  # taken in __init__

    def set_default_headers(self) -> None:
        self.set_header(REQUEST_ID_HEADER, self.request_id)  # also after an error's reset

    def compute_etag(self) -> None:
        return None  # relayed answers carry the upstream's headers, none invented

    def write_error(self, status_code: int, **kwargs) -> None:
        self.outcome = "rejected"
        self.set_header("Content-Type", JSON_TYPE)
        self.finish(error_body(httputil.responses.get(status_code, "error").lower()))

    def reject(self, rejection: Rejection) -> None:
        self.outcome = self.outcome or "rejected"
        self.set_status(rejection.status)
        for name, value in rejection.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", JSON_TYPE)
        self.finish(error_body(rejection.message))

    def on_finish(self) -> None:
        self.end()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.outcome = self.outcome or "client_gone"
        self.end()

    def access_record(self) -> dict:
        """The fields of this request's access record (bodies never, headers only by allow-list)."""
        request = self.request
        record = {
            "request_id": self.request_id,
            "client": self.client,
            "method_in": request.method,
            "method_out": None,
            "path": request.path,
            "route": request.path,
            "upstream_status": None,
            "status": self.get_status(),
            "bytes_in": 0,
            "bytes_out": 0,
            "ttfb_ms": None,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "chunks": 0,
            "outcome": self.outcome or "ok",
        }
        allowed = self.proxy.settings.log_headers
        if allowed:
            record["headers"] = {name: request.headers[name] for name in allowed if name in request.headers}
        return record

    def end(self) -> None:
        """Account for the request once, whichever way it ended."""
        if self._ended:
            return
        self._ended = True
        self.proxy.in_flight.leave()
        record = self.access_record()
        metrics = self.proxy.metrics
        metrics.in_flight.dec()
        metrics.requests.labels(record["route"], record["method_out"] or record["method_in"], record["status"]).inc()
        metrics.duration.labels(record["route"]).observe(record["duration_ms"] / 1000)
        if record["ttfb_ms"] is not None:
            metrics.ttfb.labels(record["route"]).observe(record["ttfb_ms"] / 1000)
        metrics.bytes.labels("in").inc(record["bytes_in"])
        metrics.bytes.labels("out").inc(record["bytes_out"])
        if sampled(self.request.path, self.proxy.settings.access_log_sampling):
            access_log.info("request", extra=record)


@stream_request_body
class ProxyHandler(BaseHandler):
    SUPPORTED_METHODS = METHODS

    def initialize(self, proxy: Proxy) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._upstream_request: AbortableRequest | None = None
        self._exchange_task: asyncio.Future | None = None
        # Resolved with the upstream connection's write function once it wants
        # the body, or None when the upstream is gone.
        self._body_writer: asyncio.Future = loop.create_future()
        # Resolved when the whole request body has been passed on.
        self._body_complete: asyncio.Future = loop.create_future()
        # Resolved when the client has sent its whole body (or left): an answer
        # that ends earlier would reach a client still sending, which could
        # miss it when the connection closes under unread bytes.
        self._body_received: asyncio.Future = loop.create_future()
        self._small_body: list[bytes] | None = None
        self._pending: tuple[str, str, httputil.HTTPHeaders, Route] | None = None
        self._received = 0
        self._upstream_status: httputil.ResponseStartLine | None = None
        self._upstream_headers = httputil.HTTPHeaders()
        self._response_started = False
        self._head_sent = False
        self._closed = False  # answered, or the client left: nothing more to write
        self._relaying = False
        self._last_activity = loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._added_headers: dict[str, str] = {}  # CORS and rate-limit headers for every answer
        self._admission: Admission | None = None
        # For the access record and the metrics.
        self._route_label = "unmapped"
        self._method_out: str | None = None
        self._upstream_code: int | None = None
        self._ttfb: float | None = None
        self._bytes_out = 0
        self._chunks = 0

    # -- request side -------------------------------------------------------

    async def prepare(self) -> None:
        request = self.request
        request.connection.set_max_body_size(UNLIMITED)
        origin = cors.allowed_origin(request.headers.get("Origin"), self.proxy.settings.cors_origins)
        if origin is not None and cors.is_preflight(request.headers):
            self._answer_preflight(origin)
            return
        if origin is not None:
            self._added_headers.update(cors.response_headers(origin))
        try:
            method, target, route, has_body = self._plan()
            await self._admit()
        except Rejection as rejection:
            self._reject(rejection)
            return
        headers = upstream_request_headers(
            request.headers,
            upstream_host=self.proxy.upstream.host,
            client_ip=request.remote_ip,
            scheme=request.protocol,
        )
        if origin is not None:
            del headers["Origin"]  # granted here; Ollama would refuse it
        headers[REQUEST_ID_HEADER] = self.request_id
        if has_body and route is not None and route.body_defaults:
            self._small_body = []
            self._pending = (method, target, headers, route)
            return
        self._start(method, target, headers, body_producer=self._produce_body if has_body else None)

    def _plan(self) -> tuple[str, str, Route | None, bool]:
        """Method, upstream target, route and body presence, or a `Rejection`."""
        request = self.request
        check_target(request.uri)
        matched = self.proxy.routes.match(request.path)
        route, params = matched if matched else (None, {})
        if route is not None:
            self._route_label = route.path
        if route is None and self.proxy.settings.unmapped_paths == "reject":
            raise Rejection(404, f"{request.path} is not an Ollama endpoint this proxy knows")
        length = _declared_length(request.headers)
        has_body = length is None or length > 0
        method = decide_method(route, request.method, request.headers, has_body)
        self._method_out = method
        if method != request.method:
            self.proxy.metrics.corrections.labels(self._route_label, request.method, method).inc()
        limit = self.proxy.settings.max_body_size
        if limit is not None and length is not None and length > limit:
            raise Rejection(413, _too_large(limit))
        path = (route.upstream_target(params) if route else None) or request.path
        target = path + ("?" + request.query if request.query else "")
        return method, target, route, has_body

    async def _admit(self) -> None:
        """Ask the limiter, if any, before anything goes upstream; exempt networks skip it."""
        limiter = self.proxy.limiter
        if limiter is None or in_networks(parse_address(self.client), self.proxy.exempt_networks):
            return
        key = self.client
        key_header = self.proxy.settings.client_key_header
        if key_header and key_header in self.request.headers:
            # Keys are stored hashed: a shared Redis never holds an API key.
            key = "key:" + hashlib.sha256(self.request.headers[key_header].encode()).hexdigest()[:32]
        try:
            self._admission = await limiter.admit(key, self._route_label)
        except RateLimited as refusal:
            self.outcome = "rate_limited"
            self.proxy.metrics.rate_limited.labels(self._route_label, refusal.reason).inc()
            raise
        self._added_headers.update(self._admission.headers)

    async def data_received(self, chunk: bytes) -> None:
        # Tornado stops delivering the body once a response has been sent.
        self._received += len(chunk)
        limit = self.proxy.settings.max_body_size
        if limit is not None and self._received > limit:
            self._refuse_body(_too_large(limit))
            return
        if self._small_body is not None:
            if self._received > SMALL_BODY_LIMIT:
                self._refuse_body(
                    f"a body for this route is held whole and may be at most {SMALL_BODY_LIMIT} bytes"
                )
                return
            self._small_body.append(chunk)
            return
        write = await self._body_writer
        if write is not None:
            with suppress(StreamClosedError):  # the fetch reports what happened upstream
                await write(chunk)

    async def _produce_body(self, write) -> None:
        self._body_writer.set_result(write)
        await self._body_complete

    def _answer_preflight(self, origin: str) -> None:
        self._closed = True
        self.outcome = "ok"
        self.set_status(204)
        self.clear_header("Content-Type")
        for name, value in cors.preflight_headers(origin, self.request.headers).items():
            self.set_header(name, value)
        self.finish()

    def _refuse_body(self, message: str) -> None:
        self._abort_upstream(ClientGone())
        if self._response_started:
            self._cut()  # the upstream answered before the body was complete
        else:
            self._reject(Rejection(413, message))

    async def get(self) -> None:
        """Every method lands here once the request body has been received."""
        _resolve(self._body_received, None)
        if self._pending is not None:
            method, target, headers, route = self._pending
            try:
                body = _merge_body(b"".join(self._small_body), route)
            except Rejection as rejection:
                self._reject(rejection)
                return
            headers["Content-Length"] = str(len(body))
            self._start(method, target, headers, body=body)
        _resolve(self._body_complete, None)
        self._arm_idle_timer(self.proxy.upstream.idle_timeout)
        await self._exchange_task

    head = post = put = patch = delete = options = get

    # -- upstream exchange --------------------------------------------------

    def _start(self, method: str, target: str, headers, **body) -> None:
        self._upstream_request = self.proxy.upstream.request(
            method,
            target,
            headers,
            header_callback=self._on_upstream_header,
            streaming_callback=self._on_upstream_chunk,
            **body,
        )
        self._exchange_task = asyncio.ensure_future(
            self._exchange(self.proxy.upstream.fetch(self._upstream_request))
        )

    async def _exchange(self, response: asyncio.Future) -> None:
        try:
            await response
            error = None
        except Exception as failure:
            error = failure
        _resolve(self._body_writer, None)  # the rest of the body, if any, is dropped
        _resolve(self._body_complete, None)
        await self._body_received
        # After the wait: get() arms the timer once the body is in, which may
        # be after an early answer ended.
        self._disarm_idle_timer()
        if self._closed:
            return
        if error is None:
            self._closed = True
            self.outcome = "ok"
            self.finish()
            return
        kind, rejection = self.proxy.upstream.failure(error)
        self.proxy.metrics.upstream_errors.labels(kind).inc()
        self.outcome = "timeout" if kind.endswith("timeout") else "upstream_error"
        if self._response_started:
            self._cut()
        else:
            self._reject(rejection)

    def _on_upstream_header(self, line: str) -> None:
        self._last_activity = self._loop.time()
        if self._upstream_status is None:
            self._upstream_status = httputil.parse_response_start_line(line.rstrip())
            self._upstream_headers = httputil.HTTPHeaders()
        elif line != "\r\n":
            self._upstream_headers.parse_line(line)
        else:
            status, self._upstream_status = self._upstream_status, None
            self._start_response(status, self._upstream_headers)  # a final answer: the client skips 1xx

    def _start_response(self, status: httputil.ResponseStartLine, headers) -> None:
        self._upstream_code = status.code
        self._ttfb = time.monotonic() - self.started
        self.proxy.metrics.streams.inc()
        self.set_status(status.code, status.reason)
        for name in ("Content-Type", "Server", "Date"):
            self.clear_header(name)
        bodiless = self._upstream_request.method == "HEAD" and self.request.method != "HEAD"
        for name, value in end_to_end(headers):
            # A HEAD answer's Content-Length describes a body this client will not get.
            if not (bodiless and name.lower() == "content-length"):
                self.add_header(name, value)
        self._add_headers()
        self.set_header(REQUEST_ID_HEADER, self.request_id)
        self._response_started = True
        # The head goes out with the first piece of the body when that came in
        # the same read (one write instead of two), else on the next loop turn,
        # before a body that may be slow to come.
        self._loop.call_soon(self._send_head)

    def _send_head(self) -> None:
        if not self._head_sent and not self._closed:
            self._head_sent = True
            self.flush()

    def _on_upstream_chunk(self, chunk: bytes) -> asyncio.Future | None:
        """Relay a piece of the answer; a pending result makes the upstream client wait (backpressure).

        Once the head is out, a piece is framed by Tornado's connection
        (`_format_chunk`, private API: tornado's minor version is pinned) and
        sent with `send_now_or_queue`. A HEAD answer has no body.
        """
        self._chunks += 1
        self._bytes_out += len(chunk)
        self._last_activity = self._loop.time()
        if self.request.method == "HEAD" or self._closed:
            return None
        if not self._head_sent:
            self._head_sent = True
            self.write(chunk)
            self.flush()
            return None
        connection = self.request.connection
        queued = send_now_or_queue(connection.stream, connection._format_chunk(chunk))
        if queued is not None:
            self._relaying = True
            queued.add_done_callback(self._on_relayed)
        return queued

    def _on_relayed(self, sent: asyncio.Future) -> None:
        self._relaying = False
        self._last_activity = self._loop.time()
        if sent.exception() is not None:
            self.on_connection_close()  # the client left before taking it all

    # -- timeouts, aborts and endings ---------------------------------------

    def _arm_idle_timer(self, delay: float) -> None:
        self._idle_timer = self._loop.call_later(delay, self._on_idle_timer)

    def _disarm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()

    def _on_idle_timer(self) -> None:
        timeout = self.proxy.upstream.idle_timeout
        quiet = self._loop.time() - self._last_activity
        if self._relaying or quiet < timeout:
            # A slow client, not a silent upstream, or activity since arming.
            self._arm_idle_timer(timeout - quiet if not self._relaying else timeout)
        else:
            self._abort_upstream(IdleTimeout())

    def _abort_upstream(self, error: Exception) -> None:
        if self._upstream_request is not None:
            self._upstream_request.abort(error)
        _resolve(self._body_writer, None)
        _resolve(self._body_complete, None)

    def _reject(self, rejection: Rejection) -> None:
        self._closed = True
        self._add_headers()  # so a browser app can read the error, and see its limits
        self.reject(rejection)

    def _add_headers(self) -> None:
        for name, value in self._added_headers.items():
            self.add_header(name, value)

    def _cut(self) -> None:
        """End a response that has started without a clean end, so the client can tell."""
        self._closed = True
        self.request.connection.close()

    def on_connection_close(self) -> None:
        if self._response_started and not self._closed:
            self.proxy.metrics.client_disconnects.inc()
        self._closed = True
        self._abort_upstream(ClientGone())
        _resolve(self._body_received, None)
        super().on_connection_close()

    def end(self) -> None:
        if not self._ended:
            if self._response_started:
                self.proxy.metrics.streams.dec()
            if self._admission is not None:
                self._admission.release()
        super().end()
        # Its callbacks are this handler's methods: without this cycle the
        # handler is freed at once instead of at the next full collection.
        self._upstream_request = None

    def access_record(self) -> dict:
        record = super().access_record()
        record.update(
            route=self._route_label,
            method_out=self._method_out,
            upstream_status=self._upstream_code,
            bytes_in=self._received,
            bytes_out=self._bytes_out,
            ttfb_ms=None if self._ttfb is None else round(self._ttfb * 1000, 3),
            chunks=self._chunks,
        )
        return record


class HealthHandler(BaseHandler):
    """200 when the upstream answers like Ollama, 503 with the reason when it does not."""

    async def get(self) -> None:
        status, body = await self.proxy.health.status()
        self.set_status(status)
        self.set_header("Content-Type", JSON_TYPE)
        self.finish(json.dumps(body))


class MetricsHandler(BaseHandler):
    """Prometheus text exposition."""

    def get(self) -> None:
        text, content_type = self.proxy.metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.finish(text)


class ProxyNotFoundHandler(BaseHandler):
    """The reserved /_proxy/ prefix is never forwarded."""

    def prepare(self) -> None:
        self.reject(Rejection(404, f"{self.request.path} is not an endpoint of this proxy"))


def send_now_or_queue(stream: IOStream, data: bytes) -> asyncio.Future | None:
    """Send `data` to the client; return the stream's future for what the
    kernel did not take at once (the backpressure), or None when there is
    nothing to wait for: all sent, or the client has gone (the connection's
    close callback deals with that).

    Straight to the socket when the stream has nothing queued before it: a
    client that keeps up costs no future and no event-loop turn.
    """
    if stream.closed():
        return None
    if not stream.writing():
        try:
            sent = stream.socket.send(data)
        except OSError:  # full, or the client has gone: the stream's own write finds out which
            sent = 0
        if sent == len(data):
            return None
        data = memoryview(data)[sent:]
    queued = stream.write(data)
    return None if queued.done() else queued


def _declared_length(headers: httputil.HTTPHeaders) -> int | None:
    """The request body's length, None when it comes chunked."""
    if "Transfer-Encoding" in headers:
        return None
    value = headers.get("Content-Length", "0")
    if not value.isascii() or not value.isdigit():
        raise Rejection(400, f"Content-Length {value[:40]!r} is not a byte count")
    return int(value)


def _too_large(limit: int) -> str:
    return f"request body is larger than max_body_size ({limit} bytes)"


def _merge_body(body: bytes, route: Route) -> bytes:
    """Apply an alias's body defaults; the client's own values win."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise Rejection(400, f"{route.path} needs a JSON object body, such as {{\"model\": \"llama3.2\"}}")
    return json.dumps({**route.body_defaults, **data}).encode()


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
