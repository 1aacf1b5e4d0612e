"""The upstream's answer on its way to the client: its head, then each piece as
it arrives, with backpressure in one place (`ClientFlow`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from tornado.iostream import IOStream

from .ending import AccessRecord, Watchdog
from .framing import Head
from .headers import end_to_end
from .logs import REQUEST_ID_HEADER
from .tornado_private import format_chunk

if TYPE_CHECKING:
    from tornado.http1connection import HTTP1Connection

    from .handler import ProxyHandler

# The answer's own framing is the relay's to decide.
_FRAMING = frozenset({"content-length", "transfer-encoding"})


class ClientFlow:
    """The client's socket as the answer's pieces see it (after uvicorn's `FlowControl`).

    A piece goes straight to the socket when nothing is queued before it, so
    a client that keeps up costs no future and no event-loop turn. What the
    kernel does not take is queued on Tornado's stream; `send` then returns
    the future the upstream reader waits for before reading more, and the
    watchdog's clock stops meanwhile (a slow reader is not a silent upstream).
    """

    def __init__(self, connection: HTTP1Connection, watchdog: Watchdog, on_lost: Callable[[], None]):
        self.connection = connection
        self.stream: IOStream = connection.stream
        self.watchdog = watchdog
        self.on_lost = on_lost
        self.pending: asyncio.Future[None] | None = None

    def send(self, piece: bytes) -> asyncio.Future[None] | None:
        """Send a piece of the body, framed by Tornado's connection (chunked or sized)."""
        queued = send_now_or_queue(self.stream, format_chunk(self.connection, piece))
        if queued is not None:
            self.pending = queued
            self.watchdog.paused = True
            queued.add_done_callback(self._on_sent)
        return queued

    def _on_sent(self, sent: asyncio.Future[None]) -> None:
        self.pending = None  # the upstream read waits for it: no later piece is queued behind
        self.watchdog.paused = False
        self.watchdog.touch()
        if sent.exception() is not None:
            self.on_lost()  # the client left before taking it all


class AnswerRelay:
    """Relays the upstream's head and pieces through `handler`'s connection.

    The head goes out with the first piece when that came in the same read
    (one write instead of two), else on the next loop turn, before a body
    that may be slow to come. The answer to a client's HEAD has no body.
    """

    def __init__(
        self,
        handler: ProxyHandler,
        flow: ClientFlow,
        record: AccessRecord,
        *,
        started: float,
        upstream_head: bool,
        added_headers: Mapping[str, str],
    ):
        self.handler = handler
        self.flow = flow
        self.record = record
        self.watchdog = flow.watchdog
        self.started = started
        self.client_head = handler.request.method == "HEAD"  # no body bytes go out
        self.upstream_head = upstream_head  # no body bytes come
        self.added_headers = added_headers
        self.head: Head | None = None  # once the final answer's head has arrived
        self.head_sent = False

    def on_head(self, head: Head) -> None:
        """Take on the upstream's status and headers."""
        handler = self.handler
        # Tornado sends its own phrase for an empty one (which it would not send).
        handler.set_status(head.code, head.reason or None)
        handler.clear_header("Content-Type")
        handler.clear_header("Server")
        handler.clear_header("Date")
        for name, value in end_to_end(head.headers):
            if name.lower() not in _FRAMING:
                # Tornado refuses control characters in a header; llhttp lets through
                # only the tab, which is whitespace like a space (RFC 9110 §5.5).
                handler.add_header(name, value.replace("\t", " "))
        sized = head.length is not None and head.code != 204
        if sized and (self.client_head or not self.upstream_head):
            # As the upstream sized it (a GET turned HEAD gets no body: no length);
            # otherwise Tornado chunks it, or closes for an HTTP/1.0 client.
            handler.set_header("Content-Length", str(head.length))
        for name, value in self.added_headers.items():
            handler.add_header(name, value)
        handler.set_header(REQUEST_ID_HEADER, handler.request_id)
        self.head = head
        record = self.record
        record.upstream_status = head.code
        record.ttfb_ms = round((time.monotonic() - self.started) * 1000, 3)
        self.watchdog.touch()
        asyncio.get_running_loop().call_soon(self.send_head)

    def send_head(self) -> None:
        if not self.head_sent and not self.handler.answered:
            self.head_sent = True
            self.handler.flush()

    def on_piece(self, data: bytes) -> asyncio.Future[None] | None:
        """Relay a piece of the answer; a pending result makes the upstream wait (backpressure)."""
        self.watchdog.touch()
        if self.client_head or self.handler.answered:
            return None
        record = self.record
        record.chunks += 1
        record.bytes_out += len(data)
        if not self.head_sent:
            self.head_sent = True
            self.handler.write(data)
            self.handler.flush()
            return None
        return self.flow.send(data)


def send_now_or_queue(stream: IOStream, data: bytes) -> asyncio.Future[None] | None:
    """Send `data` to the client; return the stream's future for what the
    kernel did not take at once (the backpressure), or None when there is
    nothing to wait for: all sent, or the client has gone (the connection's
    close callback deals with that).

    Straight to the socket when the stream has nothing queued before it.
    """
    if stream.closed():
        return None
    view: bytes | memoryview = data
    if not stream.writing():
        try:
            sent = stream.socket.send(data)
        except OSError:  # full, or the client has gone: the stream's own write finds out which
            sent = 0
        if sent == len(data):
            return None
        view = memoryview(data)[sent:]
    queued = stream.write(view)
    return None if queued.done() else queued
