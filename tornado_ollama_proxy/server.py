"""Listening, guarding connections (head and keep-alive timeouts, running out of
descriptors), and draining in-flight requests on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from tornado import httputil
from tornado.http1connection import HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream
from tornado.netutil import bind_sockets
from tornado.web import Application

from .idle import Silence
from .proxy import Proxy
from .settings import SettingsError
from .tornado_private import ClientStream, buffered_bytes, keep_nodelay

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Accepting pauses this long when the process is out of descriptors (nginx: 500 ms).
ACCEPT_PAUSE = 0.5
# Running out of descriptors is logged at most once per this many seconds.
ACCEPT_LOG_PERIOD = 60.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The proxy's own endpoints read bodies whole; nobody needs to send them large ones.
OWN_ENDPOINT_BODY = 64 * 1024
# Objects allocated (less those freed) between two collections of the youngest
# generation while serving (Python's default is 700): see `start_up_frozen`.
YOUNG_COLLECTION = 10_000


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on: uvloop (cheaper per chunk and per request) when
    installed and not declined, else asyncio's own (None)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SettingsError(
                "event_loop: 'uvloop' needs the uvloop package: pip install 'tornado-ollama-proxy[speed]'"
            ) from None
        return None
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


def raise_open_files_limit() -> int:
    """Lift the soft file-descriptor limit to the hard one.

    Each stream holds two sockets; a soft limit of 1024, common on pods,
    would cap the proxy near 500 concurrent streams.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with suppress(ValueError, OSError):  # an unlimited hard limit cannot be the soft one
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Acceptor:
    """Accepts connections on a listening socket.

    When the process runs out of descriptors, `accept()` fails while the
    socket stays readable: accepting again at once would spin. Accepting
    pauses for ACCEPT_PAUSE instead (as nginx and asyncio do), and the
    shortage is logged once per ACCEPT_LOG_PERIOD, not per attempt.
    """

    shortage_logged = -ACCEPT_LOG_PERIOD  # loop time, shared by every acceptor of the process
    pauses = 0

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None]):
        self.sock = sock
        self.callback = callback
        self.loop = IOLoop.current()
        self.resuming: object | None = None
        self.loop.add_handler(sock, self._accept, IOLoop.READ)

    def _accept(self, fd: Any, events: int) -> None:
        for _ in range(128):  # then let other work run
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                if error.errno not in _OUT_OF_RESOURCES:
                    raise
                self._pause(error)
                return
            self.callback(connection, address)

    def _pause(self, error: OSError) -> None:
        self.loop.remove_handler(self.sock)
        self.resuming = self.loop.call_later(ACCEPT_PAUSE, self._resume)
        now = self.loop.time()
        Acceptor.pauses += 1
        if now - Acceptor.shortage_logged >= ACCEPT_LOG_PERIOD:
            log.warning(
                "cannot accept connections, pausing",
                extra={"reason": os.strerror(error.errno or 0), "pause_s": ACCEPT_PAUSE, "pauses": Acceptor.pauses},
            )
            Acceptor.shortage_logged, Acceptor.pauses = now, 0

    def _resume(self) -> None:
        self.resuming = None
        self.loop.add_handler(self.sock, self._accept, IOLoop.READ)

    def remove(self) -> None:
        if self.resuming is not None:
            self.loop.remove_timeout(self.resuming)
        else:
            self.loop.remove_handler(self.sock)


class HeadTimer(httputil.HTTPMessageDelegate):
    """Closes a connection whose next request head does not arrive in time.

    A new connection has `header_timeout` to send its first head; a kept one
    `keepalive_timeout` to start its next, and once it has started, the head
    gets `header_timeout` more. Wraps the application's delegate for one request.
    Each time is an idle watch on nothing that moves: the watches of all
    connections share a timer (`idle`), and it is up to a quarter longer.
    """

    def __init__(
        self,
        server: ProxyHTTPServer,
        connection: HTTP1ServerConnection,
        delegate: httputil.HTTPMessageDelegate,
        kept: bool,
    ):
        self.server = server
        self.connection = connection
        self.delegate = delegate
        self.kept = kept
        self.watch: Silence | None = Silence(
            server.keepalive_timeout if kept else server.header_timeout, _unmoving, self._expired
        )

    def _expired(self) -> None:
        assert self.watch is not None
        self.watch.stop()
        if self.kept and buffered_bytes(self.connection.stream):
            # The head has begun: it gets the time any head gets.
            self.kept = False
            self.watch = Silence(self.server.header_timeout, _unmoving, self._expired)
        else:
            self.watch = None
            self.connection.stream.close()

    def cancel(self) -> None:
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        if self.server.waiting.get(self.connection) is self:
            del self.server.waiting[self.connection]

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        self.cancel()
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.cancel()
        self.delegate.on_connection_close()


def _unmoving() -> int:
    """What a head's deadline watches: nothing, so that it comes."""
    return 0


class ProxyHTTPServer(HTTPServer):
    """Tornado's `HTTPServer` with head and keep-alive timeouts, and an accept loop
    that survives running out of descriptors."""

    def initialize(  # type: ignore[override]
        self, request_callback: Application, *, header_timeout: float, keepalive_timeout: float, **options: Any
    ) -> None:
        super().initialize(request_callback, max_body_size=OWN_ENDPOINT_BODY, **options)
        # Tornado's own limit on a head (an hour; a timeout of its own for every request)
        # is left out: HeadTimer below keeps a shorter one.
        self.conn_params.header_timeout = None
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.served: set[HTTP1ServerConnection] = set()  # have carried a request
        self.waiting: dict[HTTP1ServerConnection, HeadTimer] = {}  # waiting for a request's head

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = Acceptor(sock, self._open).remove

    def _open(self, connection: socket.socket, address: Any) -> None:
        """Serve a new connection (the proxy speaks plain HTTP: a front ends TLS)."""
        stream = ClientStream(connection, max_buffer_size=self.max_buffer_size, read_chunk_size=self.read_chunk_size)
        self.handle_stream(stream, address)

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        keep_nodelay(stream)
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        assert isinstance(server_conn, HTTP1ServerConnection)
        kept = server_conn in self.served
        self.served.add(server_conn)
        timer = HeadTimer(self, server_conn, super().start_request(server_conn, request_conn), kept)
        self.waiting[server_conn] = timer
        return timer

    def on_close(self, server_conn: object) -> None:
        assert isinstance(server_conn, HTTP1ServerConnection)
        self.served.discard(server_conn)
        timer = self.waiting.get(server_conn)
        if timer is not None:
            timer.cancel()
        assert isinstance(server_conn.stream, ClientStream)
        server_conn.stream.forget_failures()  # they have reached Tornado's server loop, the last to wait
        super().on_close(server_conn)

    def close_idle(self) -> None:
        """Close kept connections waiting for a request of which no byte has come."""
        for connection in list(self.waiting):
            if not buffered_bytes(connection.stream):
                connection.stream.close()


class ProxyServer:
    def __init__(self, app: Application):
        self.proxy: Proxy = app.settings["proxy"]
        settings = self.proxy.settings
        self.http = ProxyHTTPServer(
            app, header_timeout=settings.header_timeout, keepalive_timeout=settings.keepalive_timeout
        )
        self.port: int | None = None

    def listen(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen on the configured address, or on sockets a parent process bound."""
        settings = self.proxy.settings
        sockets = sockets or bind_sockets(settings.port, settings.host)
        self.port = sockets[0].getsockname()[1]
        self.http.add_sockets(sockets)
        self.proxy.start()
        log.info(
            "listening",
            extra={
                "address": f"http://{settings.host}:{self.port}",
                "upstreams": [pod.name for pod in self.proxy.pool.pods],
                "routes": len(self.proxy.routes),
                "pid": os.getpid(),
            },
        )

    @contextmanager
    def stop_signals(self) -> Iterator[asyncio.Event]:
        """An event that SIGTERM or SIGINT sets, while inside (their handlers are gone after)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop.set)
        try:
            yield stop
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    async def drain(self) -> None:
        """Stop accepting, turn away new requests, give in-flight ones the grace period, then close everything."""
        grace = self.proxy.settings.shutdown_grace
        self.proxy.draining = True
        self.http.stop()
        self.http.close_idle()
        log.info("draining", extra={"in_flight": self.proxy.in_flight.count, "grace_s": grace})
        try:
            await asyncio.wait_for(self.proxy.in_flight.wait_idle(), grace)
        except TimeoutError:
            log.warning("grace period over, closing", extra={"in_flight": self.proxy.in_flight.count})
        await self.http.close_all_connections()
        await self.proxy.close()
        log.info("stopped")


async def serve(
    app: Application,
    sockets: list[socket.socket] | None = None,
    announce: Callable[[int], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain. Once listening, `announce` tells the port
    (while requests are served already)."""
    log.debug("open files limit", extra={"max_open_files": raise_open_files_limit()})
    with start_up_frozen():
        await _serve(app, sockets, announce)


@contextmanager
def start_up_frozen() -> Iterator[None]:
    """While serving, what exists at start-up (modules, settings, routes: some 70,000
    objects) is frozen out of the garbage collector's full collections, each of which
    walked it all: about 30 ms every few seconds under load, 20 µs per small request.
    And the youngest generation is collected every YOUNG_COLLECTION objects, not 700:
    a request leaves no cycle however it ends (tests/test_garbage.py), so its
    collections found nothing and cost a busy proxy some 4 % of its CPU. Both undone
    after. An object from start-up that later becomes garbage in a cycle stays: at
    most start-up's own size."""
    young, *older = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION, *older)
    try:
        yield
    finally:
        gc.set_threshold(young, *older)
        gc.unfreeze()


async def _serve(
    app: Application,
    sockets: list[socket.socket] | None,
    announce: Callable[[int], Coroutine[Any, Any, None]] | None,
) -> None:
    server = ProxyServer(app)
    # Before listening: a worker that says it listens drains when told to stop, however
    # soon the signal comes (between the two, it would have died of it).
    with server.stop_signals() as stop:
        server.listen(sockets)
        telling = None if announce is None else asyncio.ensure_future(announce(server.port or 0))
        await stop.wait()
    if telling is not None:
        telling.cancel()
    await server.drain()
