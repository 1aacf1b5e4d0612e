"""HTTP/1.1 framing for the upstream side: request heads out, answers in (RFC 9112).

Pure functions and a byte-fed reader, no I/O, so every framing rule is unit
tested on bytes alone. The reader turns whatever bytes have arrived into
events, joining the body bytes of one read into one piece: they arrived
together, so relaying them together adds no delay and saves a write each.
"""

from __future__ import annotations

from dataclasses import dataclass

from tornado.httputil import HTTPHeaders

MAX_HEAD = 64 * 1024  # status line and headers, as Tornado's server allows
MAX_CHUNK_LINE = 1024  # a chunk-size line with its extensions
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class MalformedAnswer(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 answer."""


class IncompleteAnswer(Exception):
    """The upstream closed the connection before its answer was complete."""


@dataclass
class Head:
    """A final (non-1xx) answer's status line and headers."""

    version: str
    code: int
    reason: str
    headers: list[tuple[str, str]]

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


@dataclass
class Data:
    """Body bytes, de-chunked."""

    data: bytes


@dataclass
class End:
    """The answer is complete; `reusable` says whether the connection may carry another request."""

    reusable: bool


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

# Reader states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class AnswerReader:
    """Reads one answer to a request made with `method`.

    `feed` takes bytes as they arrive and returns the events they complete;
    `feed_eof` is called when the upstream closes. Bytes after the answer's end
    mean the upstream does not frame its answers as it says: the connection
    is then not reused.
    """

    def __init__(self, method: str):
        self._method = method
        self._state = _HEAD
        self._buffer = b""  # bytes that do not yet complete a head, chunk-size line or chunk end
        self._remaining = 0  # body bytes still expected (Content-Length) or of the current chunk
        self._reusable = True
        self.started = False  # any byte of the answer arrived

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Head | Data | End]:
        if self._state == _DONE:
            return []
        if data:
            self.started = True
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        events: list[Head | Data | End] = []
        body: list[bytes] = []
        position = 0
        while position < len(data) and self._state != _DONE:
            state = self._state
            if state == _HEAD:
                position = self._read_head(data, position, events)
                if position < 0:
                    break
            elif state in (_LENGTH, _CHUNK_DATA):
                take = min(self._remaining, len(data) - position)
                body.append(data[position : position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _CHUNK_END if state == _CHUNK_DATA else _DONE
            elif state == _CHUNK_SIZE:
                end = data.find(b"\r\n", position, position + MAX_CHUNK_LINE)
                if end < 0:
                    self._keep(data, position, MAX_CHUNK_LINE, "a chunk-size line")
                    break
                self._remaining = _chunk_size(data[position:end])
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
                position = end + 2
            elif state == _CHUNK_END:
                if len(data) - position < 2:
                    self._buffer = data[position:]
                    break
                if data[position : position + 2] != b"\r\n":
                    raise MalformedAnswer("a chunk is longer than its size says")
                self._state = _CHUNK_SIZE
                position += 2
            elif state == _TRAILERS:
                end = data.find(b"\r\n", position)
                if end < 0:
                    self._keep(data, position, MAX_HEAD, "the trailers")
                    break
                if end == position:
                    self._state = _DONE
                position = end + 2
            else:  # _UNTIL_CLOSE
                body.append(data[position:])
                position = len(data)
        if body:
            events.append(Data(b"".join(body) if len(body) > 1 else body[0]))
        if self._state == _DONE:
            # Bytes after the end: the upstream does not frame as it says.
            events.append(End(self._reusable and position == len(data)))
        return events

    def feed_eof(self) -> list[Head | Data | End]:
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            return [End(False)]
        if self._state == _DONE:
            return []
        raise IncompleteAnswer("the upstream closed the connection before its answer was complete")

    def _keep(self, data: bytes, position: int, limit: int, what: str) -> None:
        self._buffer = data[position:]
        if len(self._buffer) >= limit:
            raise MalformedAnswer(f"{what} exceeds {limit} bytes")

    def _read_head(self, data: bytes, position: int, events: list) -> int:
        """Parse a head from `position`; return where it ends, or -1 when more bytes are needed."""
        end = data.find(b"\r\n\r\n", position)
        if end < 0:
            self._keep(data, position, MAX_HEAD, "the answer's head")
            return -1
        if end - position > MAX_HEAD:
            raise MalformedAnswer(f"the answer's head exceeds {MAX_HEAD} bytes")
        head = _parse_head(data[position:end].decode("latin-1"))
        if head.code < 200:
            if head.code == 101:
                raise MalformedAnswer("the upstream switched protocols, which this proxy does not relay")
            return end + 4  # an interim answer (100 Continue, 103 Early Hints): the final one follows
        events.append(head)
        self._frame_body(head)
        return end + 4

    def _frame_body(self, head: Head) -> None:
        """Decide how the body is delimited (RFC 9112 §6.3)."""
        connection: set[str] = set()
        codings: list[str] = []
        lengths: set[str] = set()
        for name, value in head.headers:
            name = name.lower()
            if name == "connection":
                connection.update(token.strip().lower() for token in value.split(","))
            elif name == "transfer-encoding":
                codings += [token.strip().lower() for token in value.split(",")]
            elif name == "content-length":
                lengths.add(value.strip())
        self._reusable = head.version == "HTTP/1.1" and "close" not in connection
        if self._method == "HEAD" or head.code in (204, 304):
            self._state = _DONE
        elif codings:
            if codings[-1] == "chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state, self._reusable = _UNTIL_CLOSE, False
        elif lengths:
            if len(lengths) > 1 or not all(value.isascii() and value.isdigit() for value in lengths):
                raise MalformedAnswer(f"invalid Content-Length {', '.join(sorted(lengths))[:80]!r}")
            self._remaining = int(lengths.pop())
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state, self._reusable = _UNTIL_CLOSE, False


def _parse_head(text: str) -> Head:
    status, *lines = text.split("\r\n")
    version, _, rest = status.partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise MalformedAnswer(f"not an HTTP/1.x status line: {status[:80]!r}")
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise MalformedAnswer(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    return Head(version, int(code), reason, headers)


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip(b" \t")
    if not size or len(size) > 16 or not HEX_DIGITS.issuperset(size):
        raise MalformedAnswer(f"invalid chunk size {line[:40]!r}")
    return int(size, 16)
