"""The upstream's answer on its way to the client: its head, then each piece as
it arrives, with backpressure in one place (`ClientFlow`)."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from tornado.iostream import IOStream

from .codings import Decoder, coding_of
from .errors import Rejection, error_message, in_band_error
from .framing import Head
from .headers import end_to_end
from .heartbeat import BEATS, CONTENT_TYPES, ERROR_BODY_LIMIT, HEARTBEAT_HEADER, may_beat
from .idle import Silence
from .record import AccessRecord
from .tornado_private import format_chunk, written_bytes
from .usage import AnswerEnds

if TYPE_CHECKING:
    from tornado.http1connection import HTTP1Connection

    from .quota_ask import UsageStrip

UPSTREAM_HEADER = "X-Ollama-Upstream"  # which pod answered (and, in a request, which may)
# The answer's own framing is the relay's to decide, and which pod answered its to say.
_OURS = frozenset({"content-length", "transfer-encoding", UPSTREAM_HEADER.lower()})


class Reply(Protocol):
    """The client's side of an answer, as the relay and the journey write it (the
    Tornado handler is one): a head to take, bytes to send, and an ending."""

    client_head: bool  # the client asked with HEAD: no body bytes go out
    answered: bool  # the answer is complete, or cut: nothing more goes out

    def take_head(self, code: int, reason: str | None, headers: Iterable[tuple[str, str]], *, relayed: bool) -> None:
        """The answer's status and headers (with the proxy's own added); `relayed`: the
        upstream's, which replace every default."""

    def add_answer_headers(self, headers: Mapping[str, str]) -> None:
        """Headers of the proxy's own for the answer, whichever it is (a quota's)."""

    def send_head(self, first: bytes = b"") -> None:
        """Send the head, with the body's first piece when given (one write)."""

    def finish(self) -> Any:
        """End the answer cleanly."""

    def refuse(self, rejection: Rejection, closing: bool) -> None:
        """Answer an error with its status (nothing has gone out); `closing`: and close."""

    def cut(self) -> None:
        """End an answer that has started without a clean end, so the client can tell."""

    def on_connection_close(self) -> None:
        """The client has gone."""


class ClientFlow:
    """The client's socket as the answer's pieces see it (after uvicorn's `FlowControl`).

    A piece goes straight to the socket when nothing is queued before it, so
    a client that keeps up costs no future and no event-loop turn. What the
    kernel does not take is queued on Tornado's stream; `send` then returns
    the future the upstream reader waits for before reading more (`pending`).
    """

    def __init__(self, connection: HTTP1Connection, on_lost: Callable[[], None]):
        self.connection = connection
        self.stream: IOStream = connection.stream
        self.on_lost = on_lost
        self.pending: asyncio.Future[None] | None = None

    def send(self, piece: bytes) -> asyncio.Future[None] | None:
        """Send a piece of the body, framed by Tornado's connection (chunked or sized)."""
        queued = send_now_or_queue(self.stream, format_chunk(self.connection, piece))
        if queued is not None:
            self.pending = queued
            queued.add_done_callback(self._on_sent)
        return queued

    @property
    def taken(self) -> int:
        """Bytes the client has taken so far (give or take a constant): the idle watch's
        measure of a slow reader. What Tornado handed the kernel, less what the kernel
        still holds unacknowledged: a client reading a little at a time frees the
        kernel's queue long before Tornado may write to it again."""
        stream = self.stream
        return written_bytes(stream) - (0 if stream.closed() else unacknowledged(stream.socket))

    def _on_sent(self, sent: asyncio.Future[None]) -> None:
        self.pending = None  # the upstream read waits for it: no later piece is queued behind
        if sent.exception() is not None:
            self.on_lost()  # the client left before taking it all


class AnswerRelay:
    """Relays the upstream's head and pieces to the client, through `reply`.

    The head goes out with the first piece when that came in the same read
    (one write instead of two), else on the next loop turn, before a body
    that may be slow to come. The answer to a client's HEAD has no body.

    With heartbeats (`heartbeat` seconds), silence from the upstream is filled
    with bytes the answer's format allows (see `heartbeat`); when the first
    one had to send the head, the upstream's own head is not relayed, and an
    error answer is collected to be told in-band at the end (`in_band_error`).
    `pieces` counts what the upstream sent (its head, each piece). With `usage`,
    the answer's ends are kept for the token counters Ollama reports there.
    """

    def __init__(
        self,
        reply: Reply,
        flow: ClientFlow,
        record: AccessRecord,
        *,
        started: float,
        upstream_head: bool,
        answer_format: Callable[[], str | None],
        heartbeat: float | None,
        usage: AnswerEnds | None = None,
    ):
        self.reply = reply
        self.flow = flow
        self.record = record
        self.started = started
        self.client_head = reply.client_head  # no body bytes go out
        self.upstream_head = upstream_head  # no body bytes come
        self.answer_format = answer_format
        self.head: Head | None = None  # once the final answer's head has arrived
        self.head_sent = False
        self.pieces = 0
        self.own_format: str | None = None  # the format a heartbeat's own head announced
        self.body_started = False
        self.first_body_at: float | None = None  # monotonic time of the first body byte
        self.usage = usage  # the answer's ends, for its token counters
        self.lines = 0  # the answer's lines, where its counters are read: what a stream relayed
        self.strip: UsageStrip | None = None  # takes out what the client did not ask for
        self.tail = b""  # the last two bytes relayed: where a heartbeat may go
        self.error_body: list[bytes] | None = None  # an error answer after the proxy's own head
        self.error_size = 0
        self.encoded = False  # the upstream's head went out with a content coding
        self.decoder: Decoder | None = None  # undoes one after the proxy's own head
        self.heartbeat = (
            Silence(heartbeat, lambda: self.pieces, self.beat) if heartbeat and not self.client_head else None
        )

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    @property
    def complete(self) -> bool:
        """Whether an answer decoded on its way reached its coding's end."""
        return self.decoder is None or self.decoder.complete

    def on_head(self, head: Head, upstream: str) -> None:
        """Take on the upstream's status and headers (unless a heartbeat sent a head already),
        saying which pod answered (`upstream`, its name)."""
        self.head = head
        self.pieces += 1
        record = self.record
        record.upstream_status = head.code
        record.ttfb_ms = round((time.monotonic() - self.started) * 1000, 3)
        coding = coding_of(head.headers)
        if self.own_format is not None:
            self.head_sent = True  # its status and headers cannot go out any more
            if not 200 <= head.code < 300:
                self.error_body = []  # told in-band at the end
            if coding is not None:
                self.decoder = Decoder(coding)  # the proxy's head announced none
            return
        self.encoded = coding is not None
        if head.length is not None or self.encoded:
            self.strip = None  # sized or encoded as the upstream sent it: not a byte changes
        # Tornado refuses control characters in a header; llhttp lets through only
        # the tab, which is whitespace like a space (RFC 9110 §5.5).
        headers = [
            (name, value.replace("\t", " ")) for name, value in end_to_end(head.headers) if name.lower() not in _OURS
        ]
        headers.append((UPSTREAM_HEADER, upstream))
        sized = head.length is not None and head.code != 204
        if sized and (self.client_head or not self.upstream_head):
            # As the upstream sized it (a GET turned HEAD gets no body: no length);
            # otherwise Tornado chunks it, or closes for an HTTP/1.0 client.
            headers.append(("Content-Length", str(head.length)))
        # Tornado sends its own phrase for an empty one (which it would not send).
        self.reply.take_head(head.code, head.reason or None, headers, relayed=True)
        asyncio.get_running_loop().call_soon(self.send_head)

    def send_head(self) -> None:
        if not self.head_sent and not self.reply.answered:
            self.head_sent = True
            self.reply.send_head()

    def on_piece(self, data: bytes) -> asyncio.Future[None] | None:
        """Relay a piece of the answer; a pending result makes the upstream wait (backpressure)."""
        self.pieces += 1
        if self.client_head or self.reply.answered:
            return None
        if self.decoder is not None:
            data = self.decoder.decode(data)
        if self.error_body is not None:
            if self.error_size < ERROR_BODY_LIMIT:
                self.error_body.append(data)
                self.error_size += len(data)
            return None
        if not data:
            return None
        record = self.record
        record.chunks += 1
        record.bytes_out += len(data)
        if not self.body_started:
            self.body_started = True
            self.first_body_at = time.monotonic()
        if self.usage is not None:
            self.usage.add(data)
            self.lines += data.count(b"\n")
        if self.strip is not None:
            data = self.strip(data)
            if not data:
                return None
        if self.heartbeat is not None:
            self.tail = data[-2:] if len(data) >= 2 else (self.tail + data)[-2:]
        if not self.head_sent:
            self.head_sent = True
            self.reply.send_head(data)
            return None
        return self.flow.send(data)

    def end(self) -> None:
        """The answer has ended whole: its head goes out if it has not yet (an answer
        without a body may end before the loop turn its head waits for, and Tornado's
        finish would write one of its own, sized and trimmed its way), then what the
        strip held back (the stream ended inside an event), less what the client did not
        ask for (`UsageStrip.rest`)."""
        assert self.head is not None  # an answer that ended whole had one
        self.send_head()
        rest = self.strip.rest() if self.strip is not None else b""
        if rest and not self.reply.answered:
            self.flow.send(rest)

    # -- heartbeats ------------------------------------------------------------------

    def beat(self) -> None:
        """Send a heartbeat if the answer's format has room for one here."""
        if self.flow.pending is not None:
            return  # the client is slow to read: bytes are on their way already
        if self.own_format is None and self.head is not None and (self.head.length is not None or self.encoded):
            return  # relayed as the upstream sized or encoded it: not one byte more
        answer_format = self.own_format or self.answer_format()
        if answer_format is None:
            return  # not known yet
        if self.head is None and self.own_format is None:
            self._send_own_head(answer_format)
        if may_beat(answer_format, self.body_started, self.tail):
            self.flow.send(BEATS[answer_format])
            self.record.heartbeats += 1

    def _send_own_head(self, answer_format: str) -> None:
        headers = [
            ("Content-Type", CONTENT_TYPES[answer_format]),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),  # for an nginx in front: pass every byte on
            (HEARTBEAT_HEADER, "1"),
        ]
        self.reply.take_head(200, None, headers, relayed=False)
        self.own_format = answer_format
        self.head_sent = True
        self.reply.send_head()

    def tell_in_band(self, status: int | None = None, message: str = "") -> None:
        """After the proxy's own head, an error in the client's format: the proxy's
        (`status`, `message`), or else the upstream's error answer. The record keeps
        the status the error would have had: the answer counts as the failure it is."""
        if status is None:
            assert self.error_body is not None and self.head is not None
            status, message = self.head.code, error_message(b"".join(self.error_body), self.head.code)
        assert self.own_format is not None
        self.record.status, self.record.in_band = status, True
        self.flow.send(in_band_error(self.own_format, self.record.route, status, message))


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


def peer_closed(stream: IOStream) -> bool:
    """Whether the client has closed its side, as far as its socket tells without
    reading (an unread body or request in front of the end hides it)."""
    if stream.closed():
        return True
    try:
        return stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def unacknowledged(sock: socket.socket) -> int:
    """Bytes in a TCP socket's send queue the peer has not acknowledged (Linux's SIOCOUTQ)."""
    queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return queued
