"""A keep-alive HTTP/1.1 client for the upstream, on asyncio protocols.

Tornado's `SimpleAsyncHTTPClient` opens a new connection for every request and
reads each body chunk through several futures and event-loop turns: profiling
put three quarters of the proxy's CPU per relayed token in that read loop, and
a quarter of its CPU per small request in connecting. This client keeps the
`AsyncHTTPClient` interface the handler uses (`header_callback`, an awaited
`streaming_callback`, `body_producer`, `connect_timeout`, `request_timeout`)
but parses an answer in the callback that received its bytes, and keeps idle
connections for the next request. It has no concurrency ceiling, no body size
cap and no total timeout unless a request sets one; and a fetch can be aborted
(`AbortableRequest.abort`), which Tornado's own client cannot do.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import cached_property
from io import BytesIO
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.iostream import StreamClosedError

from .framing import (
    LAST_CHUNK,
    AnswerReader,
    Data,
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


class ConnectTimeout(Exception):
    """The upstream did not accept the connection within `connect_timeout`."""


class AnswerTimeout(Exception):
    """The whole exchange took longer than `request_timeout`."""


class AbortableRequest(HTTPRequest):
    """An `HTTPRequest` that can be ended at any moment, from connecting to the answer's last byte."""

    exchange: Exchange | None = None  # while the fetch runs

    def abort(self, error: Exception) -> None:
        """End the fetch now with `error` and drop its connection (no-op once it has ended)."""
        if self.exchange is not None:
            self.exchange.fail(error)


class PooledHTTPClient(AsyncHTTPClient):
    """`AsyncHTTPClient` on asyncio protocols, reusing idle keep-alive connections."""

    def initialize(self, defaults: dict | None = None) -> None:
        super().initialize(defaults)
        # Oldest first: a connection is appended when it becomes idle.
        self._idle: dict[tuple[str, str, int], list[UpstreamConnection]] = {}
        self._sweep: asyncio.TimerHandle | None = None

    @cached_property
    def tls(self) -> ssl.SSLContext:
        """For https upstreams: the system's trusted certificates, host names checked."""
        return ssl.create_default_context()

    def fetch_impl(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        exchange = Exchange(self, request, callback)
        request.request.exchange = exchange  # `request` is Tornado's proxy around the caller's
        exchange.start()

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in list(connections):
                connection.close()
        if self._sweep is not None:
            self._sweep.cancel()
        super().close()

    def idle_connection(self, address: tuple[str, str, int]) -> UpstreamConnection | None:
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

    def forget(self, connection: UpstreamConnection) -> None:
        """Take a closing connection out of the idle ones, if it is there."""
        connections = self._idle.get(connection.address, [])
        if connection in connections:
            connections.remove(connection)


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream; hands what it receives to its current exchange."""

    def __init__(self, client: PooledHTTPClient, address: tuple[str, str, int], exchange: Exchange):
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

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # A connection outlives its exchanges, so each exchange's work runs in the
    # context of the request that started it (its request id, in log records).

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            self.close()  # bytes while idle: nothing can be trusted on this connection
        else:
            self.exchange.context.run(self.exchange.on_data, data)

    def eof_received(self) -> None:
        if self.exchange is not None:
            self.exchange.context.run(self.exchange.on_eof)

    def connection_lost(self, error: Exception | None) -> None:
        self.closed = True
        self.client.forget(self)
        if not self._writable.done():
            self._writable.set_result(None)  # a body producer's next write raises
        if self.exchange is not None:
            self.exchange.context.run(self.exchange.on_eof)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._writable.set_result(None)

    # -- for the exchange ---------------------------------------------------

    def write(self, data: bytes) -> asyncio.Future:
        """Send `data`; the future resolves once the send buffer is below its high-water mark."""
        self.transport.write(data)
        return self._writable

    def close(self) -> None:
        """Close politely (an idle or finished connection)."""
        self.closed = True
        self.client.forget(self)
        self.transport.close()

    def abort(self) -> None:
        """Drop at once, unsent bytes included (an exchange that failed or was aborted)."""
        self.closed = True
        self.transport.abort()


class Exchange:
    """One request and its answer, from connecting to the last byte."""

    def __init__(self, client: PooledHTTPClient, request: HTTPRequest, callback: Callable[[HTTPResponse], None]):
        self.client = client
        self.request = request
        self.callback = callback
        self.loop = asyncio.get_running_loop()
        self.context = contextvars.copy_context()
        url = urlsplit(request.url)
        self.address = (url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80))
        self.host = url.netloc
        self.target = (url.path or "/") + ("?" + url.query if url.query else "")
        self.started = self.loop.time()
        self.started_wall = time.time()
        self.connection: UpstreamConnection | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Future | None = None
        self.connect_timer: asyncio.TimerHandle | None = None  # connect_timeout must be > 0
        self.reader = AnswerReader(request.method)
        self.head: Head | None = None
        self.buffered = bytearray() if request.streaming_callback is None else None
        # Body bytes still to send, None while a chunked body is unfinished:
        # the connection is reusable only once this is 0.
        self.body_unsent: int | None = 0
        self.chunked_body = False
        self.ended = False
        self.relaying: Awaitable | None = None  # a streaming_callback's pending result
        self.held: list = []  # events that wait for it
        self.upstream_closed = False

    def start(self) -> None:
        if self.request.request_timeout:
            self.deadline = self.loop.call_later(
                self.request.request_timeout,
                self.fail,
                AnswerTimeout(f"no complete answer within {self.request.request_timeout:g} s"),
            )
        connection = self.client.idle_connection(self.address)
        if connection is None:
            self.connect()
        else:
            self.send(connection)

    def connect(self) -> None:
        self.connecting = asyncio.ensure_future(self._connect())
        self.connect_timer = self.loop.call_later(
            self.request.connect_timeout,
            self.fail,
            ConnectTimeout(f"no connection within {self.request.connect_timeout:g} s"),
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
        except Exception as error:
            self.fail(error)
            return
        self.connect_timer.cancel()
        self.send(connection)

    def _new_connection(self) -> UpstreamConnection:
        self.connection = UpstreamConnection(self.client, self.address, self)
        return self.connection

    # -- request ------------------------------------------------------------

    def send(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        connection.exchange = self
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
        asyncio.ensure_future(producer(self.write_body)).add_done_callback(self._on_body_produced, context=self.context)

    def write_body(self, data: bytes) -> asyncio.Future:
        """The `body_producer`'s write function (raises `StreamClosedError` once the exchange ended)."""
        if self.ended or self.connection.closed:
            raise StreamClosedError()
        if self.chunked_body:
            return self.connection.write(chunk(data))
        self.body_unsent -= len(data)
        return self.connection.write(data)

    def _on_body_produced(self, producing: asyncio.Future) -> None:
        error = None if producing.cancelled() else producing.exception()
        if self.ended:
            return
        if error is not None:
            self.fail(error)
            return
        if self.chunked_body and not self.connection.closed:
            self.connection.write(LAST_CHUNK)
            self.body_unsent = 0

    # -- answer -------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        try:
            events = self.reader.feed(data)
        except MalformedAnswer as error:
            log.warning("upstream %s answered malformed: %s", self.host, error)
            self.fail(error)
            return
        self.deliver(events)

    def on_eof(self) -> None:
        """The upstream closed (or the connection dropped): end the answer, retry, or fail."""
        if self.relaying is not None:
            self.upstream_closed = True  # after the held events
            return
        if not self.reader.started and self.connection.reused and self.request.body_producer is None:
            # The upstream closed an idle connection just as we reused it:
            # it has seen nothing, so the request goes again on a new one.
            self.connection.exchange = None
            self.connection.reused = False
            self.connect()
            return
        try:
            events = self.reader.feed_eof()
        except IncompleteAnswer as error:
            log.warning("upstream %s: %s", self.host, error)
            self.fail(error)
            return
        self.deliver(events)

    def deliver(self, events: list) -> None:
        """Hand events on in order, holding the rest while a relayed piece is pending."""
        request = self.request
        for index, event in enumerate(events):
            if type(event) is Data:
                if self.buffered is not None:
                    self.buffered += event.data
                    if len(self.buffered) > MAX_BUFFERED_ANSWER:
                        self.fail(MalformedAnswer(f"answer larger than {MAX_BUFFERED_ANSWER} bytes"))
                        return
                    continue
                try:
                    pending = request.streaming_callback(event.data)
                except Exception as error:
                    self.fail(error)
                    return
                if self.ended:
                    return
                if pending is not None:
                    pending = asyncio.ensure_future(pending)
                    if not pending.done():
                        self.hold(pending, events[index + 1 :])
                        return
                    if pending.exception() is not None:
                        self.fail(pending.exception())
                        return
            elif type(event) is Head:
                self.head = event
                if request.header_callback is not None:
                    for line in event.lines():
                        request.header_callback(line)
                    if self.ended:
                        return
            else:
                self.finish(event.reusable)
                return

    def hold(self, pending: asyncio.Future, rest: list) -> None:
        """Stop reading until the client has taken the piece just relayed (backpressure)."""
        self.relaying, self.held = pending, rest
        self.connection.transport.pause_reading()
        pending.add_done_callback(self._on_relayed, context=self.context)

    def _on_relayed(self, pending: asyncio.Future) -> None:
        self.relaying = None
        error = None if pending.cancelled() else pending.exception()
        if self.ended:
            return
        if error is not None:
            self.fail(error)
            return
        self.deliver(self.held)
        if self.relaying is not None or self.ended:
            return
        if self.upstream_closed:
            self.on_eof()
        else:
            self.connection.transport.resume_reading()

    # -- endings ------------------------------------------------------------

    def finish(self, reusable: bool) -> None:
        self._end()
        connection, self.connection = self.connection, None
        connection.exchange = None
        if reusable and self.body_unsent == 0 and not connection.closed:
            connection.transport.resume_reading()  # paused if the end waited behind a relay
            self.client.release(connection)
        else:
            connection.close()
        head = self.head
        self.callback(
            HTTPResponse(
                self.request.request,
                head.code,
                reason=head.reason,
                headers=head.http_headers(),
                buffer=BytesIO(self.buffered or b""),
                effective_url=self.request.url,
                request_time=self.loop.time() - self.started,
                start_time=self.started_wall,
            )
        )

    def fail(self, error: BaseException) -> None:
        """End the exchange with `error` (no-op once it has ended)."""
        if self.ended:
            return
        self._end()
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()  # asyncio closes whatever it has opened
        else:
            self.connection.exchange = None
            self.connection.abort()
        self.callback(
            HTTPResponse(
                self.request.request,
                599,
                error=error,
                effective_url=self.request.url,
                request_time=self.loop.time() - self.started,
                start_time=self.started_wall,
            )
        )

    def _end(self) -> None:
        self.ended = True
        # The request, its callbacks and their handler would otherwise stay
        # in a cycle with this exchange until a full garbage collection.
        self.request.request.exchange = None
        for timer in (self.deadline, self.connect_timer):
            if timer is not None:
                timer.cancel()
