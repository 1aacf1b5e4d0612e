"""A keep-alive HTTP/1.1 client for the upstream, on asyncio protocols.

Tornado's `SimpleAsyncHTTPClient` opens a new connection for every request and
reads each body chunk through several futures and event-loop turns. This
client keeps the `AsyncHTTPClient` interface (`fetch` with `header_callback`,
an awaited `streaming_callback`, `body_producer`, `connect_timeout`,
`request_timeout`) but parses an answer (`framing.AnswerReader`, on llhttp)
in the callback that received its bytes, and keeps idle connections for the
next request. It has no concurrency ceiling, no body size cap and no total
timeout unless a request sets one. An `AbortableRequest` can be ended at any
moment, which Tornado's own client cannot do, and can take the parsed head in
one call (`head_callback`) instead of header lines to parse again.

Every callback asyncio calls here is exception-safe: whatever goes wrong ends
the exchange with that error, so no fetch is left without an ending.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import cached_property, lru_cache
from io import BytesIO
from typing import Any, cast
from urllib.parse import urlsplit

from tornado.concurrent import Future, future_set_exception_unless_cancelled, future_set_result_unless_cancelled
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.iostream import StreamClosedError

from .framing import (
    LAST_CHUNK,
    AnswerReader,
    Data,
    Event,
    Head,
    IncompleteAnswer,
    MalformedAnswer,
    chunk,
    request_head,
)

log = logging.getLogger("tornado_ollama_proxy.upstream")

IDLE_CONNECTIONS = 64  # kept per upstream address for the next request
IDLE_SECONDS = 30.0  # an idle connection is closed after this
MAX_BUFFERED_ANSWER = 1024 * 1024  # an answer held whole (no streaming_callback) may be at most this

Address = tuple[str, str, int]
SAFE_METHODS = frozenset({"GET", "HEAD"})  # sent again when a reused connection turns out closed


class ConnectTimeout(Exception):
    """The upstream did not accept the connection within `connect_timeout`."""


class AnswerTimeout(Exception):
    """The whole exchange took longer than `request_timeout`."""


class AbortableRequest(HTTPRequest):
    """An `HTTPRequest` that can be ended at any moment, from connecting to the answer's
    last byte, and whose `head_callback`, when given, receives the answer's parsed `Head`
    (instead of `header_callback` lines) and leaves the response's headers empty.

    `target` is the request target as it goes on the wire (path and query,
    not re-encoded); by default the URL's.
    """

    exchange: Exchange | None = None  # while the fetch runs
    sent = False  # its head went to the upstream (which may then have acted on it)
    reused = False  # on a connection that had carried an earlier exchange

    def __init__(
        self,
        url: str,
        *,
        target: str | None = None,
        head_callback: Callable[[Head], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        self.target = target
        self.head_callback = head_callback

    def abort(self, error: Exception) -> None:
        """End the fetch now with `error` and drop its connection (no-op once it has ended)."""
        if self.exchange is not None:
            self.exchange.fail(error)


class PooledHTTPClient(AsyncHTTPClient):
    """`AsyncHTTPClient` on asyncio protocols, reusing idle keep-alive connections."""

    def initialize(self, defaults: dict[str, Any] | None = None) -> None:
        super().initialize(defaults)
        # Oldest first: a connection is appended when it becomes idle.
        self._idle: dict[Address, list[UpstreamConnection]] = {}
        self._sweep: asyncio.TimerHandle | None = None

    @cached_property
    def tls(self) -> ssl.SSLContext:
        """For https upstreams: the system's trusted certificates, host names checked."""
        return ssl.create_default_context()

    def start(self, request: AbortableRequest) -> Future[HTTPResponse]:
        """`fetch(request, raise_error=False)` for a request its caller built whole (its own
        headers, every option set): without `fetch`'s copy of the headers and its proxy of
        defaults, which cost a small request more than the rest of its start."""
        answered: Future[HTTPResponse] = Future()

        def done(response: HTTPResponse) -> None:
            if response.code == 599 and response.error is not None:  # Tornado's mark of no answer
                future_set_exception_unless_cancelled(answered, response.error)
            else:
                # Any answer is an answer here, whatever its status: without Tornado's
                # error for a status outside 2xx, which holds the response in a cycle.
                response.error = None
                future_set_result_unless_cancelled(answered, response)

        self.fetch_impl(request, done)
        return answered

    def fetch_impl(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        exchange = Exchange(self, request, callback)
        original = getattr(request, "request", request)  # Tornado's proxy around the caller's request
        if isinstance(original, AbortableRequest):
            original.exchange = exchange
        exchange.start()

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in list(connections):
                connection.close()
        if self._sweep is not None:
            self._sweep.cancel()
        super().close()

    def idle_connection(self, address: Address) -> UpstreamConnection | None:
        """The most recently used idle connection to `address`, if any."""
        connections = self._idle.get(address)
        if not connections:
            return None
        return connections.pop()

    def release(self, connection: UpstreamConnection) -> None:
        """Keep a connection whose exchange ended cleanly, for the next request."""
        connections = self._idle.setdefault(connection.address, [])
        if self._closed or len(connections) >= IDLE_CONNECTIONS:
            connection.close()
            return
        loop = asyncio.get_running_loop()
        connection.reused = True
        connection.idle_since = loop.time()
        connections.append(connection)
        if self._sweep is None:
            self._sweep = loop.call_later(IDLE_SECONDS, self._close_expired)

    def _close_expired(self) -> None:
        """Close connections idle for IDLE_SECONDS; come back for the rest.

        One timer for the pool rather than one per request.
        """
        loop = asyncio.get_running_loop()
        expired = loop.time() - IDLE_SECONDS
        self._sweep = None
        oldest = None
        for connections in self._idle.values():
            while connections and connections[0].idle_since <= expired:
                connections[0].close()  # which takes it out of the list
            if connections:
                oldest = min(connections[0].idle_since, oldest or connections[0].idle_since)
        if oldest is not None:
            self._sweep = loop.call_at(oldest + IDLE_SECONDS, self._close_expired)

    def drop_idle(self, address: Address) -> None:
        """Close every idle connection to `address`: one turned out closed by the
        upstream (it restarted, or died), so the others most likely are too."""
        for connection in list(self._idle.get(address, ())):
            connection.close()

    def forget(self, connection: UpstreamConnection) -> None:
        """Take a closing connection out of the idle ones, if it is there."""
        connections = self._idle.get(connection.address, [])
        if connection in connections:
            connections.remove(connection)


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream; hands what it receives to its current exchange."""

    def __init__(self, client: PooledHTTPClient, address: Address, exchange: Exchange):
        self.client = client
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = exchange  # from the start: whatever happens is its to know
        self.closed = False
        self.reused = False  # has carried an earlier exchange
        self.idle_since = 0.0  # loop time it became idle
        self._writable = asyncio.get_running_loop().create_future()
        self._writable.set_result(None)

    # -- asyncio.Protocol ---------------------------------------------------
    # A connection outlives its exchanges, so each exchange's work runs in the
    # context of the request that started it (its request id, in log records).

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's class
        sock = transport.get_extra_info("socket")
        with suppress(OSError):  # a connection already reset: its exchange learns it from connection_lost
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes while idle: nothing can be trusted on this connection
        else:
            exchange.context.run(exchange.on_data, data)

    def eof_received(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.context.run(exchange.on_eof)

    def connection_lost(self, error: Exception | None) -> None:
        self._closing()
        exchange = self.exchange
        if exchange is not None:
            exchange.context.run(exchange.on_eof, error is not None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        _wake(self._writable)

    # -- for the exchange ---------------------------------------------------

    def write(self, data: bytes) -> asyncio.Future[None]:
        """Send `data`; the future resolves once the send buffer is below its high-water mark."""
        assert self.transport is not None
        self.transport.write(data)
        return self._writable

    def close(self) -> None:
        """Close politely (an idle or finished connection)."""
        self._closing()
        assert self.transport is not None
        self.transport.close()

    def abort(self) -> None:
        """Drop at once, unsent bytes included (an exchange that failed, or ended before its body did)."""
        self._closing()
        assert self.transport is not None
        self.transport.abort()

    def _closing(self) -> None:
        self.closed = True
        self.client.forget(self)
        _wake(self._writable)  # a body writer waiting for room wakes, and its next write raises


@lru_cache(maxsize=64)
def _where(url: str) -> tuple[Address, str, str]:
    """Where a URL leads: its address, its Host and its path and query. Parsed once per
    URL: every request to a pod has its base as its URL (and its own target)."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    address = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    return address, parts.netloc, (parts.path or "/") + ("?" + parts.query if parts.query else "")


class Exchange:
    """One request and its answer, from connecting to the last byte."""

    def __init__(self, client: PooledHTTPClient, request: HTTPRequest, callback: Callable[[HTTPResponse], None]):
        self.client = client
        self.request = request
        self.callback = callback
        self.loop = asyncio.get_running_loop()
        self.context = contextvars.copy_context()
        self.address, self.host, target = _where(request.url)
        self.target: str = getattr(request, "target", None) or target
        self.started = self.loop.time()
        self.started_wall = time.time()
        self.connection: UpstreamConnection | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Future[None] | None = None
        self.connect_timer: asyncio.TimerHandle | None = None
        self.reader = AnswerReader(request.method)
        self.head: Head | None = None
        # Looked up once: `request` is Tornado's proxy, which resolves each attribute in turn.
        self.streaming_callback: Callable[[bytes], Awaitable[None] | None] | None = request.streaming_callback
        self.head_callback: Callable[[Head], None] | None = getattr(request, "head_callback", None)
        self.header_callback: Callable[[str], None] | None = request.header_callback
        self.buffered = bytearray() if self.streaming_callback is None else None
        # Body bytes still to send, None while a chunked body is unfinished:
        # the connection is reusable only once this is 0.
        self.body_unsent: int | None = 0
        self.chunked_body = False
        self.ended = False  # the answer is complete, or the exchange failed
        self.relaying: asyncio.Future[Any] | None = None  # a streaming_callback's pending result
        self.complete: HTTPResponse | None = None  # the answer, held until that result is in
        self.settled = False  # the fetch has its response

    def start(self) -> None:
        request = self.request
        if request.request_timeout:
            self.deadline = self.loop.call_later(
                request.request_timeout,
                self.fail,
                AnswerTimeout(f"no complete answer within {request.request_timeout:g} s"),
            )
        connection = self.client.idle_connection(self.address)
        if connection is None:
            self.connect()
        else:
            self.send(connection)

    def connect(self) -> None:
        self.connecting = asyncio.ensure_future(self._connect())
        timeout = self.request.connect_timeout
        assert timeout  # the upstream always sets one
        self.connect_timer = self.loop.call_later(
            timeout, self.fail, ConnectTimeout(f"no connection within {timeout:g} s")
        )

    async def _connect(self) -> None:
        # `fail` cancels this task while it connects, and asyncio then closes
        # the new socket; once connected, `send` runs in the same step.
        scheme, host, port = self.address
        try:
            _, connection = await self.loop.create_connection(
                self._new_connection,
                host,
                port,
                ssl=self.client.tls if scheme == "https" else None,
            )
            assert self.connect_timer is not None
            self.connect_timer.cancel()
            self.send(connection)
        except Exception as error:
            self.fail(error)

    def _new_connection(self) -> UpstreamConnection:
        self.connection = UpstreamConnection(self.client, self.address, self)
        return self.connection

    # -- request ------------------------------------------------------------

    def send(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        connection.exchange = self
        original = getattr(self.request, "request", self.request)  # Tornado's proxy around the caller's request
        if isinstance(original, AbortableRequest):
            original.sent, original.reused = True, connection.reused
        request = self.request
        headers = request.headers
        if "Host" not in headers:
            headers["Host"] = self.host
        producer = request.body_producer
        if producer is None:
            body = request.body or b""
            connection.write(request_head(request.method, self.target, headers, len(body)) + body)
            return
        if "Content-Length" in headers:
            self.body_unsent = int(headers["Content-Length"])
        else:
            self.body_unsent, self.chunked_body = None, True
        connection.write(request_head(request.method, self.target, headers, self.body_unsent))
        # Tornado types the write function as returning None; ours returns its flow control.
        producing = asyncio.ensure_future(producer(self.write_body))  # type: ignore[arg-type]
        producing.add_done_callback(self._on_body_produced, context=self.context)

    def write_body(self, data: bytes) -> asyncio.Future[None]:
        """The `body_producer`'s write function (raises `StreamClosedError` once the exchange ended)."""
        connection = self.connection
        if self.ended or connection is None or connection.closed:
            raise StreamClosedError()
        if self.chunked_body:
            return connection.write(chunk(data))
        assert self.body_unsent is not None
        self.body_unsent -= len(data)
        return connection.write(data)

    def _on_body_produced(self, producing: asyncio.Future[None]) -> None:
        if self.ended:
            return
        error = None if producing.cancelled() else producing.exception()
        if error is not None:
            self.fail(error)
            return
        connection = self.connection
        assert connection is not None
        if self.chunked_body and not connection.closed:
            connection.write(LAST_CHUNK)
            self.body_unsent = 0

    # -- answer -------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        try:
            events = self.reader.feed(data)
        except MalformedAnswer as error:
            self._malformed(error)
            return
        self._deliver_safely(events)

    def on_eof(self, reset: bool = False) -> None:
        """The upstream closed (`reset`: the connection dropped): end the answer, retry, or fail."""
        connection = self.connection
        if not self.reader.started and connection is not None and connection.reused:
            self.client.drop_idle(self.address)
        try:
            if (
                not self.reader.started
                and connection is not None
                and connection.reused
                and self.request.method in SAFE_METHODS
            ):
                # The upstream closed an idle connection just as we reused it: a
                # request without effects goes again on a new one (as nginx and Go's
                # transport do). Another may have been carried out before the upstream
                # died: a DELETE sent twice would be reported as a failure (404).
                connection.exchange = None
                connection.reused = False
                self.connect()
                return
            events = self.reader.feed_eof(reset)
        except IncompleteAnswer as error:
            self._malformed(error)
            return
        self._deliver_safely(events)

    def _malformed(self, error: Exception) -> None:
        """What the upstream sent cannot be relayed: say so once, in the request's context."""
        log.warning("upstream %s: %s", self.host, error)
        self.fail(error)

    def _deliver_safely(self, events: list[Event]) -> None:
        try:
            self.deliver(events)
        except Exception as error:  # from a callback: it ends this exchange, nothing else
            self.fail(error)

    def deliver(self, events: list[Event]) -> None:
        """Hand events on in order; a pending relay pauses reading (backpressure).

        Pieces already read are handed on at once: the client side queues
        them in order, and stops the next read until it has sent them.
        """
        for event in events:
            if self.ended:
                return
            if type(event) is Data:
                self._relay(event.data)
            elif type(event) is Head:
                self._head(event)
            else:
                self.finish(event.reusable)  # type: ignore[union-attr]

    def _head(self, head: Head) -> None:
        self.head = head
        if self.head_callback is not None:
            self.head_callback(head)
        elif self.header_callback is not None:
            for line in head.lines():
                self.header_callback(line)

    def _relay(self, data: bytes) -> None:
        if self.buffered is not None:
            self.buffered += data
            if len(self.buffered) > MAX_BUFFERED_ANSWER:
                raise MalformedAnswer(f"answer larger than {MAX_BUFFERED_ANSWER} bytes")
            return
        assert self.streaming_callback is not None
        pending = self.streaming_callback(data)
        if pending is None or self.ended:
            return
        relaying = asyncio.ensure_future(pending)
        if relaying.done():
            error = relaying.exception()
            if error is not None:
                raise error
            return
        self.relaying = relaying
        connection = self.connection
        assert connection is not None and connection.transport is not None
        connection.transport.pause_reading()  # until the client has taken it: backpressure
        relaying.add_done_callback(self._on_relayed, context=self.context)

    def _on_relayed(self, relaying: asyncio.Future[Any]) -> None:
        self.relaying = None
        if self.settled:
            return
        error = None if relaying.cancelled() else relaying.exception()
        if error is not None:
            self.fail(error)
        elif self.complete is not None:
            self._settle(self.complete)
        else:  # the exchange goes on (a lost connection would have ended it)
            connection = self.connection
            assert connection is not None and connection.transport is not None
            connection.transport.resume_reading()

    # -- endings ------------------------------------------------------------

    def finish(self, reusable: bool) -> None:
        """The answer is complete: keep or close the connection; the fetch resolves
        once the last piece has been relayed (its failure fails the fetch)."""
        headed = self.head_callback is not None  # the head went to its caller: not built again
        self._end()
        connection, self.connection = self.connection, None
        assert connection is not None and connection.transport is not None
        connection.exchange = None
        if reusable and self.body_unsent == 0 and not connection.closed:
            connection.transport.resume_reading()  # paused if the end came behind a pending relay
            self.client.release(connection)
        elif self.body_unsent != 0:
            connection.abort()  # answered before its body was sent: the rest must not wait to be written
        else:
            connection.close()
        head = self.head
        assert head is not None
        response = HTTPResponse(
            self.request,
            head.code,
            reason=head.reason,
            headers=None if headed else head.http_headers(),
            buffer=BytesIO(self.buffered or b""),
            effective_url=self.request.url,
            request_time=self.loop.time() - self.started,
            start_time=self.started_wall,
        )
        if self.relaying is None:
            self._settle(response)
        else:
            self.complete = response

    def fail(self, error: BaseException) -> None:
        """End the exchange with `error`; an answer already complete whose last piece
        could not be relayed fails with it too."""
        if not self.ended:
            self._end()
            connecting, self.connecting = self.connecting, None  # its cancellation's traceback holds this exchange
            if connecting is not None and not connecting.done():
                connecting.cancel()  # asyncio closes whatever it is still opening
            connection, self.connection = self.connection, None
            if connection is not None:
                connection.exchange = None
                if connection.transport is not None:
                    connection.abort()
        # Raised in this exchange (a connection refused, a callback's bug), its traceback
        # holds the exchange, which holds the fetch's future, which holds the error: a cycle;
        # so does that of the error it was raised in the handling of (the parser's).
        cause: BaseException | None = error
        while cause is not None:
            cause.__traceback__, cause = None, cause.__context__
        self._settle(
            HTTPResponse(
                self.request,
                599,
                error=error,
                effective_url=self.request.url,
                request_time=self.loop.time() - self.started,
                start_time=self.started_wall,
            )
        )

    def _settle(self, response: HTTPResponse) -> None:
        self.settled = True
        self.complete = None
        self.callback(response)

    def _end(self) -> None:
        self.ended = True
        # The request, its callbacks and body producer and their owner would otherwise
        # stay in a cycle (with this exchange, and through the fetch's response) until
        # the garbage collector finds it; so would the parser and its reader.
        self.streaming_callback = self.head_callback = self.header_callback = None
        self.reader.close()
        original = getattr(self.request, "request", self.request)
        if isinstance(original, AbortableRequest):
            original.exchange = None
            original.head_callback = original.streaming_callback = original.body_producer = None
        for timer in (self.deadline, self.connect_timer):
            if timer is not None:
                timer.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    """Resolve a write-room future, once (closing may have done it before asyncio does)."""
    if not waiter.done():
        waiter.set_result(None)
