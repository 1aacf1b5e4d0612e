"""Relaying the answer to the client: straight to the socket, queued when it is full."""

import asyncio
import contextlib
import socket
import struct

import pytest
from tornado.iostream import IOStream

from tornado_ollama_proxy.framing import Head
from tornado_ollama_proxy.record import AccessRecord
from tornado_ollama_proxy.relay import AnswerRelay, send_now_or_queue

from .helpers import CannedUpstream, ScriptedUpstream, open_raw, read_response


def stream_to_peer(sndbuf: int | None = None) -> tuple[IOStream, socket.socket]:
    """An IOStream on one end of a loopback TCP connection, and the plain socket at the other."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        if sndbuf is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        client.connect(listener.getsockname())
        peer, _ = listener.accept()
    peer.setblocking(False)
    return IOStream(client), peer


async def receive(peer: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        received += await asyncio.get_running_loop().sock_recv(peer, size - len(received))
    return received


async def test_sending_what_the_socket_takes_at_once_costs_no_future(io_loop):
    stream, peer = stream_to_peer()
    assert send_now_or_queue(stream, b"token") is None
    assert await receive(peer, 5) == b"token"
    stream.close()
    peer.close()


async def test_what_the_socket_does_not_take_is_queued_in_order(io_loop):
    stream, peer = stream_to_peer(sndbuf=65536)
    big, more = bytes(range(256)) * 16384, b"after"  # 4 MiB: more than the kernel takes at once
    first = send_now_or_queue(stream, big)
    assert first is not None and not first.done()
    second = send_now_or_queue(stream, more)  # queued behind the first, not sent past it
    assert second is not None
    assert await receive(peer, len(big) + len(more)) == big + more
    await second
    assert first.done() and not stream.writing()
    stream.close()
    peer.close()


async def test_a_full_socket_queues_the_whole_piece(io_loop):
    stream, peer = stream_to_peer(sndbuf=4096)
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filled += stream.socket.send(b"f" * 4096)
    queued = send_now_or_queue(stream, b"next")
    assert queued is not None and not queued.done()
    assert (await receive(peer, filled + 4))[-4:] == b"next"
    await queued
    stream.close()
    peer.close()


async def test_a_client_that_reset_closes_the_stream(io_loop):
    stream, peer = stream_to_peer()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    assert send_now_or_queue(stream, b"token") is None
    assert stream.closed()
    assert send_now_or_queue(stream, b"token") is None  # nothing to wait for


# -- unusual and broken answers, through the proxy -----------------------------------


async def proxy_before(make_proxy, *answers, **settings):
    canned = CannedUpstream(*answers, linger=True)
    return canned, make_proxy(upstream=await canned.start(), **settings)


class Noted:
    """A client's side of an answer that notes what the relay tells it."""

    client_head = False
    answered = False

    def __init__(self):
        self.told: list[str] = []

    def take_head(self, code, reason, headers, *, relayed):
        self.told.append(f"head {code} taken")

    def send_head(self, first=b""):
        self.told.append("head sent")

    def finish(self):
        self.answered = True
        self.told.append("finished")


@pytest.mark.parametrize("code", [200, 204, 304])
async def test_an_answer_that_ends_before_its_heads_turn_sends_the_head_first(io_loop, code):
    reply = Noted()
    relay = AnswerRelay(
        reply,
        None,
        AccessRecord("id", "127.0.0.1", "HEAD", "/api/tags", "/api/tags"),
        started=0.0,
        upstream_head=True,
        answer_format=lambda: None,
        heartbeat=None,
    )
    relay.on_head(Head("HTTP/1.1", code, "", [("Content-Type", "application/json")], None), "pod")
    relay.end()  # in the same loop turn, as the journey settles an answer already whole
    reply.finish()
    await asyncio.sleep(0)  # the turn the head was to go out in
    assert reply.told == [f"head {code} taken", "head sent", "finished"]


@pytest.mark.parametrize("status", [b"HTTP/1.1 200 ", b"HTTP/1.1 200"])
async def test_an_answer_with_an_empty_or_no_reason_is_relayed(make_proxy, status):
    canned, proxy = await proxy_before(make_proxy, status + b"\r\nContent-Length: 2\r\n\r\nok")
    reader, writer = await open_raw(proxy)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")  # a reason phrase is informative only: the usual one
    assert await reader.readexactly(2) == b"ok"
    writer.close()
    await canned.stop()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 Early\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_an_answer_the_proxy_cannot_relay_is_a_502_at_once(make_proxy, http, log_lines, answer):
    canned, proxy = await proxy_before(make_proxy, answer, idle_timeout=60)
    started = asyncio.get_running_loop().time()
    response = await http.get(proxy + "/api/tags")
    assert response.status_code == 502
    assert "sent an answer this proxy cannot relay" in response.json()["error"]
    assert asyncio.get_running_loop().time() - started < 5  # not after the idle timeout
    [record] = [line for line in log_lines() if line["message"] == "request"]
    assert (record["status"], record["outcome"]) == (502, "upstream_error")  # never an empty 200
    await canned.stop()


async def test_a_tab_inside_a_header_value_is_relayed_as_a_space(make_proxy, http):
    canned, proxy = await proxy_before(make_proxy, b"HTTP/1.1 200 OK\r\nX-Note: a\tb\r\nContent-Length: 0\r\n\r\n")
    response = await http.get(proxy + "/api/tags")
    assert (response.status_code, response.headers["x-note"]) == (200, "a b")
    await canned.stop()


async def test_chunked_with_a_content_length_reaches_the_client_chunked_and_whole(make_proxy):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    canned, proxy = await proxy_before(make_proxy, answer, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
    reader, writer = await open_raw(proxy)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, body) == (200, b"ok")
    assert "content-length" not in headers and headers["transfer-encoding"] == ["chunked"]
    writer.write(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    assert canned.connections == 2  # an answer framed two ways is not followed by another on its connection
    writer.close()
    await canned.stop()


async def test_a_body_sent_after_a_head_answer_reaches_nobody(make_proxy):
    async def script(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        if request.startswith(b"HEAD "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            await writer.drain()
            try:
                await reader.readuntil(b"\r\n\r\n")  # a next request on this connection ...
            except asyncio.IncompleteReadError:
                return  # ... never comes: the proxy did not reuse it
            writer.write(b"hello")  # a broken upstream's body for the HEAD, late
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nworld")
        await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start())
    reader, writer = await open_raw(proxy)
    writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await read_response(reader, head=True)
    assert (status, headers["content-length"]) == (200, ["5"])
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await read_response(reader) == (200, ANY_HEADERS, b"world")
    writer.close()
    await upstream.stop()


class _AnyHeaders:
    def __eq__(self, other):
        return isinstance(other, dict)


ANY_HEADERS = _AnyHeaders()


async def test_a_head_request_counts_no_body_bytes_out(proxy_url, http, log_lines):
    response = await http.head(proxy_url + "/api/ps")  # GET upstream: it answers with a body
    assert response.status_code == 200 and response.content == b""
    [record] = [line for line in log_lines() if line["message"] == "request"]
    assert (record["method_out"], record["bytes_out"]) == ("GET", 0)
