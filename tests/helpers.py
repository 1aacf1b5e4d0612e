"""Clients and upstreams at the byte level, for what a library client would hide."""

import asyncio
import json
import socket
import struct
import time
from typing import ClassVar
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


async def open_raw(url: str, *, rcvbuf: int | None = None):
    """A plain TCP connection to a server under test."""
    sock = None
    if rcvbuf is not None:
        # A small fixed receive buffer (no autotuning) makes a slow reader slow.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(address(url))
        return await asyncio.open_connection(sock=sock)
    return await asyncio.open_connection(*address(url))


async def send_json(url: str, method: bytes, path: bytes, data, headers: bytes = b""):
    """Open a raw connection and send a request with `data` as its JSON body; return the connection."""
    reader, writer = await open_raw(url)
    body = json.dumps(data).encode()
    head = b"%s %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n" % (method, path, headers, len(body))
    writer.write(head + body)
    return reader, writer


async def raw_request(url: str, data: bytes) -> bytes:
    """Send raw request bytes and read until the server closes or the response is complete."""
    reader, writer = await open_raw(url)
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    length = _content_length(head)
    body = await reader.readexactly(length) if length is not None else await reader.read()
    writer.close()
    return head + body


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


def split_response(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


async def read_chunked_to_end(reader) -> int:
    """Read a chunked body (after the head) up to its terminating chunk; return its size."""
    size, tail = 0, b"\r\n"  # so that an empty body's lone terminator matches too
    while not tail.endswith(b"\r\n0\r\n\r\n"):
        chunk = await reader.read(1 << 20)
        if not chunk:
            raise AssertionError("connection closed before the end of the body")
        size += len(chunk)
        tail = (tail + chunk)[-16:]
    return size


async def settled(read, *, quiet: float = 0.5, limit: float = 30.0):
    """Wait until `read()` stops changing for `quiet` seconds and return it.

    A stall has no event to await: quiescence can only be observed over time.
    """
    deadline = time.monotonic() + limit
    last = read()
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        value = read()
        if value != last:
            last, still_since = value, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return value
    raise AssertionError(f"value kept changing for {limit} s (last {last})")


def hang_up_at_once(writer):
    """Close at once with a reset (RST), unread bytes or not: a client that has what it
    wanted, or a server that dies."""
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def unused_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class BlackHole:
    """A listening socket whose accept queue is full, so connects hang unanswered."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.listener.getsockname())
            self.fillers.append(filler)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def close(self):
        for sock in [*self.fillers, self.listener]:
            sock.close()


class ScriptedUpstream:
    """An upstream whose every connection runs `script(reader, writer)`; it counts
    connections and sets `closed` each time a connection's script returns."""

    running: ClassVar[list["ScriptedUpstream"]] = []  # started and not yet stopped, for the tests' teardown

    def __init__(self, script):
        self.script = script
        self.connections = 0
        self.closed = asyncio.Event()
        self.server = None
        self.tasks = set()
        self.writers = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        ScriptedUpstream.running.append(self)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer):
        self.connections += 1
        self.tasks.add(asyncio.current_task())
        self.writers.append(writer)
        try:
            await self.script(reader, writer)
        finally:
            writer.close()
            self.closed.set()

    async def stop(self):
        """Stop listening, close every connection and wait for the scripts to end."""
        if self in ScriptedUpstream.running:
            ScriptedUpstream.running.remove(self)
        self.server.close()
        for writer in self.writers:
            writer.close()
        for task in self.tasks:
            task.cancel()  # a script waiting on something the test never gave
        await asyncio.gather(*self.tasks, return_exceptions=True)


class CannedUpstream(ScriptedUpstream):
    """An upstream that answers fixed bytes: on each connection, per answer, it
    reads a request's head (not its body) and sends the answer; then it waits
    for the client to close (`linger`) or hangs up."""

    def __init__(self, *answers: bytes, read_request: bool = True, linger: bool = False):
        super().__init__(self._answer)
        self.answers, self.read_request, self.linger = answers, read_request, linger
        self.requests: list[bytes] = []

    async def _answer(self, reader, writer):
        for answer in self.answers:
            if self.read_request:
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(answer)
            await writer.drain()
        if self.linger:
            await reader.read()


async def read_response(reader, *, head: bool = False) -> tuple[int, dict[str, list[str]], bytes]:
    """One whole response from a raw connection: its status, headers and (de-chunked) body."""
    status, headers, _ = split_response(await reader.readuntil(b"\r\n\r\n"))
    if head or status in (204, 304):
        return status, headers, b""
    return status, headers, await read_body(reader, headers)


async def read_body(reader, headers: dict[str, list[str]]) -> bytes:
    """A response's body, framed as its headers say (de-chunked)."""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"][0]))
    if headers.get("transfer-encoding") == ["chunked"]:
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # no trailers are sent: the blank line
        return body
    return await reader.read()


async def until(condition, *, limit: float = 10.0) -> None:
    """Wait until `condition()` holds: for a state no event announces."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {limit} s")
        await asyncio.sleep(0.01)


async def read_log(process, message):
    """Read a process's JSON log lines until one has `message`; return it."""
    return (await read_logs(process, message))[-1]


async def read_logs(process, message):
    """Read a process's log lines, each of which must be JSON, until one has `message`;
    return them all, parsed."""
    loop = asyncio.get_running_loop()
    records = []
    while True:
        line = await asyncio.wait_for(loop.run_in_executor(None, process.stdout.readline), 30)
        assert line, process.stderr.read()
        records.append(json.loads(line))
        if records[-1]["message"] == message:
            return records


def parse_metrics(text: str) -> dict:
    """{(sample name, frozenset(labels)): value}"""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(http, proxy) -> dict:
    response = await http.get(proxy + "/_proxy/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse_metrics(response.text)


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def pool_of(started, **common):
    """The `upstreams` setting for stand-in pods a, b, c…"""
    return [{"name": "abcdefgh"[n], "url": url, **common} for n, (_, url) in enumerate(started)]


async def ready(proxy):
    """The pool has read every pod's models (as its first look does within seconds)."""
    await proxy.proxy.pool.refresh_all()


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    """An event stream's events, each (its name, its data)."""
    events = []
    for event in body.removesuffix(b"\n\n").split(b"\n\n"):
        name, data = event.split(b"\n")
        events.append((name.removeprefix(b"event: ").decode(), json.loads(data.removeprefix(b"data: "))))
    return events


def tokens_reported(path: str, body: bytes, stream: bool) -> tuple[int, int]:
    """The prompt and output tokens an answer of the Responses or Messages API reports."""
    if not stream:
        usage = json.loads(body)["usage"]
    elif path == "/v1/responses":
        [(name, completed)] = sse_events(body)[-1:]
        assert name == "response.completed"  # the last event: no "data: [DONE]" follows
        usage = completed["response"]["usage"]
    else:
        [(name, delta), (end, _)] = sse_events(body)[-2:]
        assert (name, end) == ("message_delta", "message_stop")
        usage = delta["usage"]
    return usage["input_tokens"], usage["output_tokens"]


async def http_1_0_answers(url, *requests: bytes) -> tuple[bytes, bytes]:
    """Send `requests` at once on one connection, as an HTTP/1.0 client keeping it alive
    does; what comes back before the proxy closes it (or stops sending for a second), and
    b"closed" if it closed it, else b"open"."""
    reader, writer = await open_raw(url)
    writer.write(b"".join(requests))
    received = b""
    try:
        while piece := await asyncio.wait_for(reader.read(1 << 16), 1):
            received += piece
    except TimeoutError:
        writer.close()
        return received, b"open"
    writer.close()
    return received, b"closed"


def keep_alive_1_0(method: bytes, path: bytes, body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return b"%s %s HTTP/1.0\r\nConnection: keep-alive\r\n%s\r\n%s" % (method, path, length, body)
