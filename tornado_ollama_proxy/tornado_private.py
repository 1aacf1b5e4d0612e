"""The few private parts of Tornado the proxy relies on, checked once at import.

The relay frames each body piece as the connection would (chunked when its
`_chunking_output` says so; else with its own `_format_chunk`, so that Tornado's
Content-Length accounting stays right) and writes it straight to the stream's socket;
the keep-alive watch asks the stream how many bytes of a request it holds
(`_read_buffer_size`), and the idle watch how many queued bytes a client has taken
(`_total_write_done_index`); a handler whose client left mid-body finds the error
Tornado failed the body's wait with (`_body_future`), to let go of its traceback; the
handlers reset an answer as `RequestHandler.clear` does, with a Date formatted once a
second; an answer to an HTTP/1.0 client that only its close can end drops the client's
ask to keep the connection from the request's headers as Tornado's connection holds
them (`_request_headers`); a client's connection keeps Nagle's algorithm off
(`keep_nodelay`), and reads its next request ahead without ceasing to listen
(`ClientStream`). A Tornado without them fails at start-up with one clear line
(`require`), not on every stream.
"""

from typing import Any

from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPServerRequest
from tornado.ioloop import IOLoop
from tornado.iostream import BaseIOStream, IOStream
from tornado.web import RequestHandler

MISSING = [
    name
    for name, present in (
        ("HTTP1Connection._format_chunk", hasattr(HTTP1Connection, "_format_chunk")),
        (
            "HTTP1Connection's output framing state",
            hasattr(HTTP1Connection, "_format_chunk")
            and {"_chunking_output", "_expected_content_remaining"}
            <= set(HTTP1Connection._format_chunk.__code__.co_names),
        ),
        ("BaseIOStream._read_buffer_size", "_read_buffer_size" in BaseIOStream.__init__.__code__.co_names),
        ("IOStream.socket", "socket" in IOStream.__init__.__code__.co_names),
        ("BaseIOStream._read_future", "_read_future" in BaseIOStream.__init__.__code__.co_names),
        ("BaseIOStream._handle_read", hasattr(BaseIOStream, "_handle_read")),
        ("BaseIOStream._signal_closed", hasattr(BaseIOStream, "_signal_closed")),
        ("BaseIOStream._total_write_done_index", "_total_write_done_index" in BaseIOStream.__init__.__code__.co_names),
        ("IOStream.set_nodelay", "set_nodelay" in HTTP1Connection.finish.__code__.co_names),
        (
            "HTTP1Connection._request_headers",
            "_request_headers" in HTTP1Connection.write_headers.__code__.co_names,
        ),
        ("HTTPServerRequest._body_future", "_body_future" in RequestHandler.on_connection_close.__code__.co_names),
        (
            "RequestHandler.clear's attributes",
            {"_headers", "_write_buffer", "_status_code", "_reason"} <= set(RequestHandler.clear.__code__.co_names),
        ),
    )
    if not present
]


class IncompatibleTornado(RuntimeError):
    """This Tornado lacks what the proxy relies on; the message names it."""


def require() -> None:
    if MISSING:
        import tornado

        raise IncompatibleTornado(
            f"Tornado {tornado.version} lacks {', '.join(MISSING)}, which this proxy relies on: "
            "install the version pyproject.toml names"
        )


def format_chunk(connection: HTTP1Connection, piece: bytes) -> bytes:
    """`piece` framed as the connection frames body bytes (chunked, or counted against Content-Length).

    A chunk of a chunked answer is framed here in one copy, as Tornado frames it in three.
    """
    if connection._chunking_output and connection._expected_content_remaining is None and piece:
        return b"%x\r\n%b\r\n" % (len(piece), piece)
    return connection._format_chunk(piece)


def ask_no_keep_alive(connection: HTTP1Connection) -> None:
    """Let the answer's own `Connection: close` stand. Tornado's connection tells an HTTP/1.0
    client that asked to keep the connection alive `Connection: Keep-Alive`, whatever the
    answer says, even when the answer has no length and only the close can end it: it
    reads the ask from the request's headers as it holds them (`_request_headers`), which
    now lack it. The request's own headers keep it, for the access record."""
    assert connection._request_headers is not None  # it has read the request
    headers = connection._request_headers.copy()
    headers.pop("Connection", None)
    connection._request_headers = headers


def buffered_bytes(stream: BaseIOStream) -> int:
    """How many received bytes the stream holds unread."""
    return stream._read_buffer_size


def written_bytes(stream: BaseIOStream) -> int:
    """How many bytes queued on the stream the kernel has taken so far (a running count)."""
    return stream._total_write_done_index


def body_failure(request: HTTPServerRequest) -> BaseException | None:
    """The error a streamed body's wait failed with (its client left before the end), if any."""
    waited = request._body_future
    return waited.exception() if waited.done() and not waited.cancelled() else None


def keep_nodelay(stream: IOStream) -> None:
    """Nagle's algorithm off for the connection's whole life, as nginx's `tcp_nodelay`:
    a relayed piece goes out at once, and Tornado's switching it on and off around
    every request (two system calls each) is left out."""
    stream.set_nodelay(True)
    stream.set_nodelay = _as_it_is  # type: ignore[method-assign]


def _as_it_is(value: bool) -> None:
    """A stream's `set_nodelay` once `keep_nodelay` has set it for good."""


class ClientStream(IOStream):
    """A client's connection that goes on listening while its next request waits.

    A kept-alive client sends its next request as soon as it has read an
    answer, usually before Tornado's server loop asks for it a few loop turns
    later. Tornado reads the bytes into the stream's buffer, then stops
    listening (with bytes held, a close could not be told yet), and listens
    again while the request is served: two changes to the event loop's
    registration, each a system call, per request. This stream reads them
    the same way and goes on listening; only if more comes on top of bytes
    nobody has asked for yet does it stop, without reading them, as Tornado
    would have: a client sending more than it is answered for is held back by
    TCP, and a close behind a pipelined request is not seen before the answer
    in progress has gone out.
    """

    read_failure: BaseException | None = None  # what a read waiting as the stream closed failed with

    def _handle_events(self, fd: Any, events: int) -> None:
        if events != IOLoop.READ or self._read_future is not None or self.closed():
            super()._handle_events(fd, events)
        elif self._read_buffer_size:
            super()._handle_events(fd, 0)  # no event: Tornado's reckoning alone, which stops listening
        else:
            self._handle_read()  # into the buffer, as Tornado reads with no read waiting

    def _signal_closed(self) -> None:
        waiting = self._read_future
        super()._signal_closed()  # fails it with a StreamClosedError
        if waiting is not None and not waiting.cancelled():
            self.read_failure = waiting.exception()

    def forget_failures(self) -> None:
        """Let go of the tracebacks of what failed the stream, once they have reached
        whatever waited for them: their frames hold the stream or its failed read,
        which hold them. Tornado's reading of a chunked body whose client leaves
        mid-way, and a client resetting its connection, leave such a cycle (and the
        request's handler in the first) otherwise."""
        for failure in (self.read_failure, self.error):
            if failure is not None:
                failure.__traceback__ = None
        self.read_failure = None
