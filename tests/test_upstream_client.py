"""The keep-alive upstream client, against real scripted servers on loopback."""

import asyncio
import socket
import struct

import pytest
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError

from tornado_ollama_proxy import upstream_client
from tornado_ollama_proxy.framing import IncompleteAnswer, MalformedAnswer
from tornado_ollama_proxy.upstream_client import (
    AbortableRequest,
    AnswerTimeout,
    ConnectTimeout,
    PooledHTTPClient,
)

from .helpers import BlackHole, CannedUpstream, ScriptedUpstream, until

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture
def client(io_loop):
    pooled = PooledHTTPClient(force_instance=True)
    yield pooled
    pooled.close()


async def read_request(reader) -> tuple[bytes, bytes]:
    """One request's head and de-chunked body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    if b"transfer-encoding: chunked" in lines:
        body = b""
        while size := int((await reader.readline()).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
        return head, body
    length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
    return head, await reader.readexactly(length)


def answering(*answers: bytes, seen: list | None = None, linger: bool = True):
    """A script that reads a request and sends the next answer, for each answer;
    then it waits for the client to close (`linger`) or hangs up."""

    async def script(reader, writer):
        for answer in answers:
            request = await read_request(reader)
            if seen is not None:
                seen.append(request)
            writer.write(answer)
            await writer.drain()
        if linger:
            await reader.read()

    return script


def fetch(client, url, method="GET", **options):
    return client.fetch(
        AbortableRequest(url, method=method, allow_nonstandard_methods=True, **options), raise_error=False
    )


# -- keep-alive ------------------------------------------------------------------


async def test_one_connection_carries_request_after_request(client):
    seen = []
    upstream = ScriptedUpstream(answering(OK, OK, OK, seen=seen))
    url = await upstream.start()
    for _ in range(3):
        response = await fetch(client, url + "/api/tags?x=1")
        assert (response.code, response.body, response.headers["Content-Type"]) == (200, b"{}", "application/json")
    assert upstream.connections == 1
    assert seen[0][0].startswith(b"GET /api/tags?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    await upstream.stop()


async def test_an_answer_that_closes_is_not_reused(client):
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    upstream = ScriptedUpstream(answering(closing))
    url = await upstream.start()
    for _ in range(2):
        assert (await fetch(client, url)).code == 200
    assert upstream.connections == 2
    await upstream.stop()


async def test_an_upstream_closing_a_kept_connection_as_it_is_reused_gets_the_request_again(client):
    seen = []
    # The second request on the first connection meets a hang-up with no answer.
    upstream = ScriptedUpstream(answering(OK, b"", seen=seen, linger=False))
    url = await upstream.start()
    assert (await fetch(client, url)).code == 200
    response = await fetch(client, url + "/api/version")
    assert response.code == 200
    assert upstream.connections == 2
    assert [head.split(b" ")[1] for head, _ in seen] == [b"/", b"/api/version", b"/api/version"]
    await upstream.stop()


@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_a_request_with_effects_is_not_sent_twice(client, method):
    seen = []
    upstream = ScriptedUpstream(answering(OK, b"", seen=seen, linger=False))
    url = await upstream.start()
    assert (await fetch(client, url)).code == 200
    with pytest.raises(IncompleteAnswer):  # it may have been carried out: the client is told, not the upstream again
        await fetch(client, url + "/api/delete", method, body=b'{"model": "m"}')
    assert upstream.connections == 1
    assert [head.split(b" ")[:2] for head, _ in seen] == [[b"GET", b"/"], [method.encode(), b"/api/delete"]]
    await upstream.stop()


async def test_a_streamed_body_is_not_sent_twice(client):
    upstream = ScriptedUpstream(answering(OK, b"", linger=False))
    url = await upstream.start()
    assert (await fetch(client, url)).code == 200

    async def produce(write):
        await write(b"part")

    with pytest.raises(IncompleteAnswer):
        await fetch(client, url, "POST", body_producer=produce)
    assert upstream.connections == 1
    await upstream.stop()


async def test_bytes_on_an_idle_connection_retire_it(client):
    idle = asyncio.Event()

    async def script(reader, writer):
        await read_request(reader)
        writer.write(OK)
        await idle.wait()
        writer.write(b"HTTP/1.1 200 OK\r\n")  # the start of an answer nobody asked for
        await reader.read()

    upstream = ScriptedUpstream(script)
    url = await upstream.start()
    assert (await fetch(client, url)).code == 200
    idle.set()
    await upstream.closed.wait()  # the client hung up on the stray bytes
    upstream.script = answering(OK)
    assert (await fetch(client, url)).code == 200
    assert upstream.connections == 2
    await upstream.stop()


async def test_idle_connections_expire(client, monkeypatch):
    monkeypatch.setattr(upstream_client, "IDLE_SECONDS", 0.05)
    upstream = ScriptedUpstream(answering(OK))
    url = await upstream.start()
    assert (await fetch(client, url)).code == 200
    await upstream.closed.wait()  # closed by the client once idle long enough
    await upstream.stop()


async def test_each_idle_connection_expires_on_its_own_time(client, monkeypatch):
    monkeypatch.setattr(upstream_client, "IDLE_SECONDS", 0.4)
    go, order = asyncio.Event(), []

    async def script(reader, writer):
        head, _ = await read_request(reader)
        if b"/later" in head:
            await go.wait()
        writer.write(OK)
        await reader.read()  # until the client closes
        order.append((head.split(b" ")[1], asyncio.get_running_loop().time()))

    upstream = ScriptedUpstream(script)
    url = await upstream.start()
    sooner, later = fetch(client, url + "/sooner"), fetch(client, url + "/later")
    assert (await sooner).code == 200
    await asyncio.sleep(0.3)  # the second connection becomes idle this much later
    go.set()
    assert (await later).code == 200
    while len(order) < 2:
        upstream.closed.clear()
        await upstream.closed.wait()
    [(first, closed_first), (second, closed_second)] = order
    assert (first, second) == (b"/sooner", b"/later")
    assert closed_second - closed_first >= 0.15  # not swept together with the older one
    await upstream.stop()


async def test_idle_connections_are_capped(client, monkeypatch):
    monkeypatch.setattr(upstream_client, "IDLE_CONNECTIONS", 1)
    closes = []

    async def script(reader, writer):
        await answering(OK)(reader, writer)
        closes.append(True)

    upstream = ScriptedUpstream(script)
    url = await upstream.start()
    responses = await asyncio.gather(*(fetch(client, url) for _ in range(3)))
    assert [r.code for r in responses] == [200] * 3
    while len(closes) < 2:  # two of three connections are closed, one is kept
        upstream.closed.clear()
        await upstream.closed.wait()
    assert upstream.connections == 3 and len(closes) == 2
    await upstream.stop()


async def test_an_exchange_ending_after_the_client_closed_drops_its_connection(io_loop):
    client = PooledHTTPClient(force_instance=True)
    release = asyncio.Event()

    async def script(reader, writer):
        await read_request(reader)
        await release.wait()
        writer.write(OK)
        await reader.read()

    upstream = ScriptedUpstream(script)
    url = await upstream.start()
    pending = fetch(client, url)
    client.close()
    release.set()
    assert (await pending).code == 200
    await upstream.closed.wait()
    await upstream.stop()


# -- request bodies ------------------------------------------------------------------


async def test_a_produced_body_without_a_length_goes_chunked(client):
    seen = []
    upstream = ScriptedUpstream(answering(OK, OK, seen=seen))
    url = await upstream.start()

    async def produce(write):
        for part in (b"one ", b"two ", b"three"):
            await write(part)

    for _ in range(2):
        assert (await fetch(client, url, "DELETE", body_producer=produce)).code == 200
    for head, body in seen:
        assert b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
        assert body == b"one two three"
    assert upstream.connections == 1  # the last chunk went out: the connection is clean
    await upstream.stop()


async def test_a_produced_body_with_a_length_goes_as_is(client):
    seen = []
    upstream = ScriptedUpstream(answering(OK, OK, seen=seen))
    url = await upstream.start()

    answered = asyncio.Event()

    async def produce(write):
        await write(b"12345")
        await write(b"67890")
        await answered.wait()  # like the handler's producer, which returns when its client's body has ended

    headers = HTTPHeaders({"Content-Length": "10"})
    for _ in range(2):
        answered.clear()
        request = AbortableRequest(
            url, method="POST", headers=headers, body_producer=produce, header_callback=lambda _: answered.set()
        )
        assert (await client.fetch(request, raise_error=False)).code == 200
    for head, body in seen:
        assert b"\r\ncontent-length: 10\r\n" in head.lower() and b"chunked" not in head.lower()
        assert body == b"1234567890"
    # Answered once the last byte arrived, before the producer returned: the
    # connection is clean all the same, and kept.
    assert upstream.connections == 1
    await upstream.stop()


async def test_a_failing_producer_fails_the_fetch(client):
    upstream = ScriptedUpstream(answering(OK))
    url = await upstream.start()

    async def produce(write):
        await write(b"x")
        raise ValueError("the source broke")

    with pytest.raises(ValueError, match="the source broke"):
        await fetch(client, url, "POST", body_producer=produce)
    await upstream.stop()


async def test_writing_a_body_after_the_answer_ended_raises_stream_closed(client):
    early = b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\n\r\n"
    written = asyncio.get_running_loop().create_future()

    upstream = CannedUpstream(early, linger=True)  # answers before the body
    url = await upstream.start()
    answered = asyncio.Event()

    async def produce(write):
        await answered.wait()
        try:
            await write(b"late")
        except StreamClosedError as error:
            written.set_result(error)

    response = fetch(client, url, "POST", body_producer=produce)
    assert (await response).code == 413
    answered.set()
    assert isinstance(await written, StreamClosedError)
    await upstream.closed.wait()  # a body cut short leaves the connection unusable
    await upstream.stop()


async def test_a_body_write_waiting_for_room_ends_when_the_connection_is_lost(client):
    blocked, outcome = asyncio.Event(), []

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await blocked.wait()  # reads no body: the client's send buffer fills
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

    upstream = ScriptedUpstream(script)
    url = await upstream.start()

    async def produce(write):
        try:
            while True:
                room = write(b"x" * 65536)
                if not room.done():
                    blocked.set()
                    outcome.append("waited")
                await room
        except StreamClosedError:
            outcome.append("closed")

    with pytest.raises(IncompleteAnswer):
        await fetch(client, url, "POST", body_producer=produce)
    assert outcome[0] == "waited" and outcome[-1] == "closed"
    await upstream.stop()


# -- answers, relayed with backpressure -------------------------------------------------------


async def test_a_pending_relay_stops_reading_until_it_is_done(client):
    pieces, relayed, gate = [], asyncio.Event(), asyncio.get_running_loop().create_future()

    async def script(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await relayed.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await reader.read()

    upstream = ScriptedUpstream(script)
    url = await upstream.start()

    def relay(piece):
        pieces.append(piece)
        relayed.set()
        return gate if len(pieces) == 1 else None

    response = fetch(client, url, streaming_callback=relay)
    await relayed.wait()
    # Everything has been sent; a reader that did not wait would finish now.
    done, _ = await asyncio.wait([response], timeout=0.3)
    assert not done and pieces == [b"first"]
    gate.set_result(None)
    assert (await response).code == 200
    assert pieces == [b"first", b"second"]
    await upstream.stop()


async def test_events_held_behind_a_pending_relay_follow_it(client):
    upstream = ScriptedUpstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    url = await upstream.start()
    gate = asyncio.get_running_loop().create_future()
    pieces = []

    def relay(piece):
        pieces.append(piece)
        asyncio.get_running_loop().call_soon(gate.set_result, None)
        return gate

    response = await fetch(client, url, streaming_callback=relay)
    assert (response.code, pieces) == (200, [b"hello"])
    await upstream.stop()


async def test_an_upstream_hanging_up_while_a_relay_is_pending(client):
    relayed, lost = asyncio.Event(), asyncio.Event()

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await relayed.wait()
        # A hard hang-up mid-answer, while the client still uploads.
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

    upstream = ScriptedUpstream(script)
    url = await upstream.start()
    gate = asyncio.get_running_loop().create_future()
    pieces = []

    def relay(piece):
        pieces.append(piece)
        relayed.set()
        return gate

    async def produce(write):
        await upstream.closed.wait()
        try:
            while True:  # reading is paused: the reset shows when writing
                await write(b"x" * 65536)
                await asyncio.sleep(0)
        except StreamClosedError:
            lost.set()

    response = fetch(client, url, "POST", body_producer=produce, streaming_callback=relay)
    await lost.wait()
    gate.set_result(None)  # the relay ends after the connection was lost
    with pytest.raises(IncompleteAnswer):
        await response
    assert pieces == [b"first"]
    await upstream.stop()


async def test_a_relay_that_fails_fails_the_fetch(client):
    upstream = ScriptedUpstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    url = await upstream.start()

    def raising(piece):
        raise RuntimeError("client side broke")

    with pytest.raises(RuntimeError, match="client side broke"):
        await fetch(client, url, streaming_callback=raising)

    def failed_at_once(piece):
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(RuntimeError("failed at once"))
        return failed

    with pytest.raises(RuntimeError, match="failed at once"):
        await fetch(client, url, streaming_callback=failed_at_once)

    def failing_later(piece):
        failing = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(failing.set_exception, RuntimeError("failed later"))
        return failing

    with pytest.raises(RuntimeError, match="failed later"):
        await fetch(client, url, streaming_callback=failing_later)
    await upstream.stop()


async def test_a_relay_may_be_a_coroutine_or_a_done_future(client):
    upstream = ScriptedUpstream(
        answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    )
    url = await upstream.start()
    pieces = []

    async def relay(piece):
        pieces.append(piece)

    assert (await fetch(client, url, streaming_callback=relay)).code == 200
    assert pieces == [b"ok"]

    def relayed_at_once(piece):
        pieces.append(piece)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    assert (await fetch(client, url, streaming_callback=relayed_at_once)).code == 200
    assert pieces == [b"ok", b"ok"]
    await upstream.stop()


async def test_aborting_from_the_callbacks_ends_the_fetch(client):
    upstream = ScriptedUpstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    url = await upstream.start()
    for callback in ("header_callback", "streaming_callback"):
        request = AbortableRequest(url)
        setattr(request, callback, lambda _, request=request, name=callback: request.abort(LookupError(name)))
        with pytest.raises(LookupError, match=callback):
            await client.fetch(request, raise_error=False)
    await upstream.stop()


async def test_an_answer_held_whole_is_capped(client, monkeypatch):
    monkeypatch.setattr(upstream_client, "MAX_BUFFERED_ANSWER", 10)
    upstream = ScriptedUpstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"))
    url = await upstream.start()
    with pytest.raises(MalformedAnswer, match="answer larger than 10 bytes"):
        await fetch(client, url)
    await upstream.stop()


async def test_an_answer_until_close(client):
    async def script(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")

    upstream = ScriptedUpstream(script)
    url = await upstream.start()
    response = await fetch(client, url)
    assert (response.code, response.body) == (200, b"all of it")
    await upstream.stop()


async def test_an_error_status_is_an_answer(client):
    upstream = ScriptedUpstream(answering(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"))
    url = await upstream.start()
    response = await fetch(client, url)
    assert (response.code, response.reason, response.body) == (404, "Not Found", b"{}")
    await upstream.stop()


# -- connecting and timeouts -------------------------------------------------------------


async def test_connect_timeout(client):
    hole = BlackHole()
    with pytest.raises(ConnectTimeout, match="no connection within 0.2 s"):
        await fetch(client, hole.url, connect_timeout=0.2)
    hole.close()


async def test_aborting_while_connecting_to_a_silent_host(client):
    hole = BlackHole()
    request = AbortableRequest(hole.url, connect_timeout=0.2)
    response = client.fetch(request, raise_error=False)
    request.abort(LookupError("client left"))
    with pytest.raises(LookupError, match="client left"):
        await response
    request.abort(LookupError("again"))  # a no-op once ended
    hole.close()


async def test_aborting_as_the_connection_comes_up_closes_it(client, monkeypatch):
    upstream = ScriptedUpstream(answering(OK))
    url = await upstream.start()
    request = AbortableRequest(url)
    made = upstream_client.UpstreamConnection.connection_made

    def made_then_aborted(connection, transport):
        made(connection, transport)
        request.abort(LookupError("left just then"))

    monkeypatch.setattr(upstream_client.UpstreamConnection, "connection_made", made_then_aborted)
    with pytest.raises(LookupError, match="left just then"):
        await client.fetch(request, raise_error=False)
    await upstream.closed.wait()  # the new connection was closed, not leaked
    await upstream.stop()


async def test_request_timeout(client):
    async def silent(reader, writer):
        await reader.read()

    upstream = ScriptedUpstream(silent)
    url = await upstream.start()
    with pytest.raises(AnswerTimeout, match="no complete answer within 0.2 s"):
        await fetch(client, url, request_timeout=0.2)
    await upstream.stop()


# -- other callers, and odd moments --------------------------------------------------------


async def test_a_plain_url_can_be_fetched_as_with_any_async_http_client(client):
    upstream = ScriptedUpstream(answering(OK))
    url = await upstream.start()
    response = await client.fetch(url + "/api/version?x=1")
    assert (response.code, response.body, response.headers["Content-Type"]) == (200, b"{}", "application/json")
    await upstream.stop()


async def test_an_idle_connection_the_upstream_closes_leaves_the_pool(client):
    upstream = ScriptedUpstream(answering(OK, linger=False))  # answers once, then hangs up
    url = await upstream.start()
    assert (await fetch(client, url)).code == 200
    await until(lambda: not client._idle[("http", "127.0.0.1", int(url.rsplit(":", 1)[1]))])
    assert (await fetch(client, url)).code == 200  # on a new connection, not the closed one
    assert upstream.connections == 2
    await upstream.stop()
