"""HTTP/1.1 framing (RFC 9112): request bodies in, request heads out, answers in.

Pure functions and a byte-fed reader, no I/O, so every framing rule is unit
tested on bytes alone. Answers are parsed by llhttp (the parser Node.js uses,
through httptools); `AnswerReader` adds what llhttp leaves to its caller: a
HEAD answer has no body, a close-delimited body ends at EOF, caps on the head
and on interim answers, transfer codings other than chunked refused, and
whether the connection may carry another request. The body bytes of one read
become one piece: they arrived together, so relaying them together adds no
delay and saves a write each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools
from tornado.httputil import HTTPHeaders

from .errors import Rejection
from .headers import value_of

# Tornado's server caps bodies at 100 MB by default; the handler lifts its cap to
# this (max_body_size is the proxy's own limit). A longer declared body is refused
# before the request goes anywhere, as Tornado would refuse it once it reads the body.
LARGEST_BODY = 2**62
MAX_HEAD = 64 * 1024  # status line and headers (and trailers), as Tornado's server allows
MAX_INTERIM = 10  # 1xx answers before the final one, as Tornado's client allows
_LENGTH_LIST = re.compile(r",[ \t]*")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class MalformedAnswer(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 answer (or not one this proxy relays)."""


class IncompleteAnswer(Exception):
    """The upstream closed the connection before its answer was complete."""


# -- request bodies in ------------------------------------------------------------


def declared_body(headers: HTTPHeaders) -> int | None:
    """The request body's length, None when it comes chunked; `Rejection` 400 for
    framing Tornado's server would refuse only once it reads the body.

    The same rules as Tornado's `HTTP1Connection._read_body`, checked before the
    proxy acts on the request: Content-Length with Transfer-Encoding, a coding
    other than exactly ``chunked``, unequal or non-numeric lengths.
    """
    coding = value_of(headers, "Transfer-Encoding")
    length = value_of(headers, "Content-Length")
    if coding is not None:
        if length is not None:
            raise Rejection(400, "a request may not have both Content-Length and Transfer-Encoding")
        if coding.lower() != "chunked":
            raise Rejection(
                400, f"Transfer-Encoding {coding[:40]!r} is not supported: send chunked or a Content-Length"
            )
        return None
    if length is None:
        return 0
    values = set(_LENGTH_LIST.split(length))
    value = values.pop()
    if values or not value.isascii() or not value.isdigit():
        raise Rejection(400, f"Content-Length {length[:40]!r} is not a byte count")
    if len(value) > len(str(LARGEST_BODY)) or int(value) > LARGEST_BODY:
        raise Rejection(400, f"Content-Length {length[:40]!r} is larger than any body this proxy accepts")
    return int(value)


# -- requests out -----------------------------------------------------------------


def request_head(method: str, target: str, headers: HTTPHeaders, body_length: int | None) -> bytes:
    """A request's head; `body_length` None means a chunked body follows."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.get_all() if name.lower() != "content-length"]
    if body_length is None:
        lines.append("Transfer-Encoding: chunked")
    elif body_length or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {body_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked request body (never the terminating empty one)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# -- answers in -------------------------------------------------------------------


@dataclass(slots=True)
class Head:
    """A final (non-1xx) answer's status line and headers.

    `length` is the body's length when the answer is delimited by
    Content-Length (for a HEAD answer, the length it announces), None when it
    is chunked or ends when the connection closes: what a relay may announce.
    """

    version: str
    code: int
    reason: str
    headers: list[tuple[str, str]]
    length: int | None

    def lines(self) -> list[str]:
        """The head as `header_callback` lines, the way Tornado's client reports them."""
        return (
            [f"{self.version} {self.code} {self.reason}\r\n"]
            + [f"{name}: {value}\r\n" for name, value in self.headers]
            + ["\r\n"]
        )

    def http_headers(self) -> HTTPHeaders:
        headers = HTTPHeaders()
        for name, value in self.headers:
            headers.add(name, value)
        return headers


@dataclass(slots=True)
class Data:
    """Body bytes, de-chunked."""

    data: bytes


@dataclass(slots=True)
class End:
    """The answer is complete; `reusable` says whether the connection may carry another request."""

    reusable: bool


Event = Head | Data | End

# Reader states.
_HEAD, _BODY, _UNTIL_CLOSE, _DONE = range(4)


class AnswerReader:
    """Reads one answer to a request made with `method`.

    `feed` takes bytes as they arrive and returns the events they complete;
    `feed_eof` is called when the upstream closes. Any byte after the answer's
    end means the upstream does not frame its answers as it says: the
    connection is then not reused.
    """

    def __init__(self, method: str):
        # None once the answer has ended (`close`): the parser holds this reader, and
        # the two would otherwise stay in a cycle, for the garbage collector to find.
        parser = httptools.HttpResponseParser(self)
        # Chunked with a Content-Length is relayed as chunked (RFC 9112 §6.3),
        # and the connection is not reused after it.
        parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self._parser: httptools.HttpResponseParser | None = parser
        self._head_request = method == "HEAD"
        self._state = _HEAD
        self._events: list[Event] = []
        self._body: list[bytes] = []
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0  # of the head (or trailers) being read
        self._unproductive = 0  # bytes fed since the head or the last body bytes
        self._interim = 0
        self._reusable = True
        self._stray = False  # bytes after the end
        self.started = False  # any byte of the answer arrived

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Event]:
        if not data or self._state == _DONE:
            return []
        self.started = True
        self._unproductive += len(data)
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, MalformedAnswer):
                raise error.__context__ from None
            if self._state != _DONE:
                raise MalformedAnswer(f"invalid HTTP/1.1 answer: {error}") from None
            self._stray = True  # what follows the end is not ours to parse
        if self._unproductive > MAX_HEAD and self._state != _DONE:
            # An endless header, chunk-size line or trailer: llhttp would take it all.
            what = "head is" if self._state == _HEAD else "chunk framing or trailers are"
            raise MalformedAnswer(f"the answer's {what} larger than {MAX_HEAD} bytes")
        return self._take_events()

    def feed_eof(self, reset: bool = False) -> list[Event]:
        """The upstream closed; `reset` when it did so abruptly, which cannot be the
        end of a body that ends when the connection closes."""
        if self._state == _UNTIL_CLOSE and not reset:
            self._finish()
            return self._take_events()
        if self._state == _DONE:
            return []
        raise IncompleteAnswer("the upstream closed the connection before its answer was complete")

    def _take_events(self) -> list[Event]:
        self._take_body()
        events = self._events
        self._events = []
        if self._stray and events and type(events[-1]) is End:
            events[-1] = End(False)
        return events

    def _take_body(self) -> None:
        if self._body:
            body = self._body
            self._body = []
            self._events.append(Data(body[0] if len(body) == 1 else b"".join(body)))

    def _finish(self) -> None:
        self._take_body()
        self._events.append(End(self._reusable))
        self.close()

    def close(self) -> None:
        """Read no more of this answer (it has ended, or its exchange has failed)."""
        self._state = _DONE
        self._parser = None

    # -- llhttp's callbacks (through httptools) ------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _DONE:
            self._stray = True

    def on_status(self, reason: bytes) -> None:
        if _CONTROL.search(reason):  # llhttp lets these through; RFC 9112 §4 does not
            raise MalformedAnswer(f"invalid reason phrase {reason[:40]!r}")
        self._reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state == _DONE:
            return  # what llhttp reads after a HEAD answer's end is stray
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            what = "head is" if self._state == _HEAD else "trailers are"
            raise MalformedAnswer(f"the answer's {what} larger than {MAX_HEAD} bytes")
        if self._state == _HEAD:
            self._headers.append((name.decode("latin-1"), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        if self._state == _DONE:
            return
        parser = self._parser
        assert parser is not None
        code = parser.get_status_code()
        headers, self._headers = self._headers, []
        self._head_size = 0
        if code < 100:
            raise MalformedAnswer(f"invalid status code {code:03d}")
        if code == 101:
            raise MalformedAnswer(_SWITCHED)
        if code < 200:  # 100 Continue, 103 Early Hints: the final answer follows
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise MalformedAnswer(f"more than {MAX_INTERIM} interim (1xx) answers")
            return
        self._unproductive = 0
        length, chunked = _framing(headers)
        # llhttp's keep-alive verdict is only valid before the message completes.
        self._reusable = parser.should_keep_alive() and not (chunked and length is not None)
        self._events.append(
            Head("HTTP/" + parser.get_http_version(), code, self._reason, headers, None if chunked else length)
        )
        if self._head_request:
            # No body follows a HEAD answer; one it announces anyway could
            # arrive after the next request was sent, so none is risked.
            self._reusable = self._reusable and not chunked and not length
            self._finish()
        elif code in (204, 304) or chunked or length is not None:
            self._state = _BODY
        else:
            self._state, self._reusable = _UNTIL_CLOSE, False

    def on_body(self, data: bytes) -> None:
        if self._state == _DONE:
            self._stray = True
        else:
            self._unproductive = 0
            self._body.append(data)

    def on_message_complete(self) -> None:
        if self._state == _BODY:
            self._finish()


_SWITCHED = "the upstream switched protocols, which this proxy does not relay"


def _framing(headers: list[tuple[str, str]]) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of an answer; `MalformedAnswer` for a transfer
    coding other than chunked alone, which a relay could not pass on unchanged."""
    length = None
    chunked = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "content-length":
            length = int(value)  # llhttp has checked it: digits, once
        elif lowered == "transfer-encoding":
            if chunked or value.lower() != "chunked":
                raise MalformedAnswer(f"unsupported Transfer-Encoding {value[:40]!r}")
            chunked = True
    return length, chunked
