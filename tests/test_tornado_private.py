"""The stream a client's connection is served on, at the socket and event-loop level, and
how its connection frames an answer's pieces."""

import asyncio
import socket
import struct
import subprocess
import sys

import pytest
from tornado.http1connection import HTTP1Connection
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError

from tornado_ollama_proxy.tornado_private import ClientStream, buffered_bytes, format_chunk

from .helpers import until

NEXT = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD_LIMIT = 65536  # Tornado's server reads a head with this max_bytes, as the proxy's does


async def serving(stream_class):
    """A loopback connection as Tornado's server holds it while it serves a request: the
    request's head read, a close callback set (listening for a close), no read waiting."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
    stream = stream_class(served)
    client.sendall(NEXT)
    assert await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=HEAD_LIMIT) == NEXT
    closed = asyncio.get_running_loop().create_future()
    stream.set_close_callback(lambda: closed.set_result(None))
    return stream, client, closed


def registrations(io_loop, monkeypatch) -> list[int]:
    """The events each change to the loop's registration of a stream asks for."""
    changes: list[int] = []
    update_handler = io_loop.update_handler

    def counted(fd, events):
        changes.append(events)
        update_handler(fd, events)

    monkeypatch.setattr(io_loop, "update_handler", counted)
    return changes


async def next_request_come(stream_class, io_loop, monkeypatch):
    """`serving`, and the client's next request come and read ahead, with the changes to the
    loop's registration counted from before it came."""
    stream, client, closed = await serving(stream_class)
    changed = registrations(io_loop, monkeypatch)
    client.sendall(NEXT)
    await until(lambda: buffered_bytes(stream) == len(NEXT))
    return stream, client, closed, changed


def stopped_listening(changes: list[int]) -> bool:
    return bool(changes) and not changes[-1] & IOLoop.READ


@pytest.mark.parametrize(("stream_class", "changes"), [(IOStream, 2), (ClientStream, 0)])
async def test_a_next_request_come_before_it_is_asked_for_keeps_the_loop_listening(
    io_loop, monkeypatch, stream_class, changes
):
    stream, client, _, changed = await next_request_come(stream_class, io_loop, monkeypatch)
    assert await stream.read_until(b"\r\n\r\n") == NEXT
    # Tornado's own stream stops listening, then listens again: two system calls.
    assert len(changed) == changes
    stream.close()
    client.close()


async def test_more_on_top_of_bytes_nobody_asked_for_stops_the_listening_unread(io_loop, monkeypatch):
    stream, client, _, changed = await next_request_come(ClientStream, io_loop, monkeypatch)
    client.sendall(NEXT)  # a second request, pipelined behind the first
    await until(lambda: stopped_listening(changed))
    assert buffered_bytes(stream) == len(NEXT)  # left to TCP
    assert await stream.read_until(b"\r\n\r\n") == NEXT
    assert await stream.read_until(b"\r\n\r\n") == NEXT  # read when asked for, in order
    stream.close()
    client.close()


async def test_a_close_behind_a_pipelined_request_is_not_seen_before_it_is_asked_for(io_loop, monkeypatch):
    stream, client, closed, changed = await next_request_come(ClientStream, io_loop, monkeypatch)
    client.shutdown(socket.SHUT_WR)
    await until(lambda: stopped_listening(changed))
    assert not stream.closed() and not closed.done()  # the answer in progress can go out
    assert await stream.read_until(b"\r\n\r\n") == NEXT
    with pytest.raises(StreamClosedError):
        await stream.read_until(b"\r\n\r\n")
    await closed
    client.close()


async def test_a_client_sending_more_than_it_is_asked_for_is_held_back_and_loses_nothing(io_loop, monkeypatch):
    stream, client, _ = await serving(ClientStream)
    changed = registrations(io_loop, monkeypatch)
    client.setblocking(False)
    flood = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(client, flood))
    await until(lambda: stopped_listening(changed))
    assert 0 < buffered_bytes(stream) < HEAD_LIMIT + stream.read_chunk_size  # one read's worth, as Tornado's
    assert not sending.done()  # TCP holds the rest back
    assert await stream.read_bytes(len(flood)) == flood
    await sending
    stream.close()
    client.close()


async def test_a_close_that_comes_with_the_next_request_is_told_and_the_request_still_read(io_loop):
    stream, client, closed = await serving(ClientStream)
    client.sendall(NEXT)
    client.close()
    await closed
    assert stream.closed()
    assert await stream.read_until(b"\r\n\r\n") == NEXT


async def test_a_read_failed_by_the_close_is_kept_until_its_traceback_may_go(io_loop):
    stream, client, _ = await serving(ClientStream)
    waiting = stream.read_until(b"\r\n\r\n")
    client.close()
    with pytest.raises(StreamClosedError) as raised:
        await waiting
    assert stream.read_failure is raised.value and raised.value.__traceback__ is not None
    stream.forget_failures()
    assert stream.read_failure is None and raised.value.__traceback__ is None
    stream.forget_failures()  # once is enough: nothing more to forget


async def test_a_reset_connections_error_lets_go_of_its_traceback(io_loop):
    stream, client, closed = await serving(ClientStream)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset
    await closed
    assert isinstance(stream.error, ConnectionResetError) and stream.error.__traceback__ is not None
    stream.forget_failures()
    assert stream.error.__traceback__ is None


async def test_a_read_cancelled_before_the_close_is_no_failure(io_loop):
    stream, client, closed = await serving(ClientStream)
    stream.read_until(b"\r\n\r\n").cancel()
    client.close()
    await closed
    assert stream.read_failure is None


@pytest.mark.parametrize(
    ("chunking", "length"), [(True, None), (False, 400), (False, None)], ids=["chunked", "sized", "to the close"]
)
@pytest.mark.parametrize("piece", [b"", b"x", b"y" * 300], ids=["empty", "1 byte", "300 bytes"])
async def test_a_piece_is_framed_as_tornados_own_connection_frames_it(chunking, length, piece):
    with socket.socket() as sock:
        stream = IOStream(sock)
        ours, tornados = HTTP1Connection(stream, is_client=False), HTTP1Connection(stream, is_client=False)
        for connection in (ours, tornados):  # as write_headers leaves them
            connection._chunking_output, connection._expected_content_remaining = chunking, length
        assert format_chunk(ours, piece) == tornados._format_chunk(piece)
        assert ours._expected_content_remaining == tornados._expected_content_remaining  # the length counted down


def test_a_tornado_without_the_framing_method_is_named_at_start_up_not_crashed_on():
    script = (
        "import tornado.http1connection as c; del c.HTTP1Connection._format_chunk; "
        "from tornado_ollama_proxy import tornado_private; tornado_private.require()"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1
    assert "lacks HTTP1Connection._format_chunk, HTTP1Connection's output framing state, which" in ran.stderr
