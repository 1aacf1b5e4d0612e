"""The stream a client's connection is served on, at the socket and event-loop level."""

import asyncio
import socket

import pytest
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError

from tornado_ollama_proxy.tornado_private import READ_AHEAD, ClientStream, buffered_bytes

from .helpers import until

NEXT = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"


def listening(stream_class):
    """A stream listening for a close while it serves a request, as Tornado's server
    connection sets it (a close callback, no read waiting), and the client's socket."""
    served, client = socket.socketpair()
    stream = stream_class(served)
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


@pytest.mark.parametrize(("stream_class", "changes"), [(IOStream, 2), (ClientStream, 0)])
async def test_a_next_request_come_before_it_is_asked_for_keeps_the_loop_listening(
    io_loop, monkeypatch, stream_class, changes
):
    stream, client, _ = listening(stream_class)
    changed = registrations(io_loop, monkeypatch)
    client.sendall(NEXT)
    await until(lambda: buffered_bytes(stream) == len(NEXT))
    assert await stream.read_until(b"\r\n\r\n") == NEXT
    # Tornado's own stream stops listening, then listens again: two system calls.
    assert len(changed) == changes
    stream.close()
    client.close()


async def test_a_client_sending_more_than_it_is_asked_for_is_held_back_and_loses_nothing(io_loop, monkeypatch):
    stream, client, _ = listening(ClientStream)
    changed = registrations(io_loop, monkeypatch)
    client.setblocking(False)
    flood = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(client, flood))
    await until(lambda: changed and not changed[-1] & IOLoop.READ)  # stopped listening
    held = buffered_bytes(stream)
    assert READ_AHEAD <= held < READ_AHEAD + stream.read_chunk_size
    assert not sending.done()  # TCP holds the rest back
    assert await stream.read_bytes(len(flood)) == flood
    await sending
    stream.close()
    client.close()


async def test_a_client_closing_after_its_next_request_is_told_as_tornado_tells_it(io_loop):
    stream, client, closed = listening(ClientStream)
    client.sendall(NEXT)
    client.close()
    await closed
    assert stream.closed()
    assert await stream.read_until(b"\r\n\r\n") == NEXT  # what came before the close is still read


async def test_a_read_failed_by_the_close_is_kept_until_its_traceback_may_go(io_loop):
    stream, client, _ = listening(ClientStream)
    waiting = stream.read_until(b"\r\n\r\n")
    client.close()
    with pytest.raises(StreamClosedError) as raised:
        await waiting
    assert stream.read_failure is raised.value and raised.value.__traceback__ is not None
    stream.forget_read_failure()
    assert stream.read_failure is None and raised.value.__traceback__ is None
    stream.forget_read_failure()  # once is enough: nothing more to forget


async def test_a_read_cancelled_before_the_close_is_no_failure(io_loop):
    stream, client, closed = listening(ClientStream)
    stream.read_until(b"\r\n\r\n").cancel()
    client.close()
    await closed
    assert stream.read_failure is None
