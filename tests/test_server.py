import asyncio
import errno
import json
import os
import signal
import socket
import sys

import pytest

from tornado_ollama_proxy.app import make_app
from tornado_ollama_proxy.server import Acceptor, ProxyServer, loop_factory
from tornado_ollama_proxy.settings import Settings, SettingsError
from tornado_ollama_proxy.tornado_private import buffered_bytes

from .helpers import open_raw, read_chunked_to_end, read_response, until

CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def start_server(io_loop, upstream_url, tmp_path):
    started = []

    def start(**overrides):
        settings = Settings(host="127.0.0.1", port=0, upstream=upstream_url, plugins_dir=str(tmp_path), **overrides)
        server = ProxyServer(make_app(settings))
        server.listen()
        started.append(server)
        return server, f"http://127.0.0.1:{server.port}"

    yield start
    for server in started:
        server.http.stop()
        io_loop.run_sync(server.http.close_all_connections)


async def send_chat(url, body=CHAT):
    reader, writer = await open_raw(url)
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return reader, writer


async def test_drain_stops_accepting_and_lets_in_flight_streams_finish(start_server, fake):
    server, url = start_server()
    fake.lockstep = asyncio.Queue()
    fake.lockstep.put_nowait(True)
    reader, writer = await send_chat(url)
    await reader.readuntil(b'"done": false}\n')
    draining = asyncio.ensure_future(server.drain())
    await asyncio.sleep(0)  # let drain stop the listener
    with pytest.raises(ConnectionRefusedError):
        await open_raw(url)
    assert not draining.done()
    for _ in range(3):
        fake.lockstep.put_nowait(True)
    await read_chunked_to_end(reader)
    await asyncio.wait_for(draining, 5)
    writer.close()


async def test_drain_cuts_what_outlives_the_grace_period(start_server, fake):
    server, url = start_server(shutdown_grace=0.2)
    reader, writer = await send_chat(
        url, json.dumps({"model": "silent", "messages": [{"role": "user", "content": "x"}]}).encode()
    )
    await asyncio.wait_for(fake.arrived.get(), 5)
    await asyncio.wait_for(server.drain(), 5)
    assert await reader.read() == b""  # closed without an answer
    assert await asyncio.wait_for(fake.disconnected.get(), 1) == "/api/chat"
    writer.close()


async def test_drain_with_nothing_in_flight_is_immediate(start_server):
    server, _ = start_server()
    await asyncio.wait_for(server.drain(), 1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_ends_the_wait_and_the_handlers_are_removed(start_server, signum):
    server, _ = start_server()
    with server.stop_signals() as stop:
        os.kill(os.getpid(), signum)  # handled from the moment the with is entered
        await asyncio.wait_for(stop.wait(), 5)
    assert not asyncio.get_running_loop().remove_signal_handler(signum)


def test_uvloop_is_used_when_installed_unless_declined():
    import uvloop

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert loop_factory("auto") is None
    with pytest.raises(SettingsError) as caught:
        loop_factory("uvloop")
    assert "pip install 'tornado-ollama-proxy[speed]'" in str(caught.value)


def test_a_replacement_worker_starts_with_stop_signals_unblocked():
    from tornado_ollama_proxy.workers import _unblock_stop_signals

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _unblock_stop_signals()
    assert not {signal.SIGTERM, signal.SIGINT} & signal.pthread_sigmask(signal.SIG_BLOCK, set())


# -- draining with keep-alive connections -------------------------------------------------


async def kept_connection(url):
    """A connection that has carried one request and is kept for the next."""
    reader, writer = await open_raw(url)
    writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    return reader, writer


def head_begun(server) -> bool:
    """Some connection holds part of a request head."""
    return any(buffered_bytes(connection.stream) for connection in server.http.waiting)


async def test_a_drain_closes_kept_idle_connections_at_once(start_server, fake):
    server, url = start_server(shutdown_grace=5)
    _, holder_writer = await send_chat(
        url, json.dumps({"model": "silent", "messages": [{"role": "user", "content": "x"}]}).encode()
    )
    assert await asyncio.wait_for(fake.arrived.get(), 5) == "/api/chat"  # in flight through the drain
    idle_reader, idle_writer = await kept_connection(url)
    draining = asyncio.ensure_future(server.drain())
    assert await asyncio.wait_for(idle_reader.read(), 2) == b""  # not left to be reused and cut later
    assert not draining.done()
    holder_writer.close()
    await asyncio.wait_for(draining, 5)
    idle_writer.close()


async def test_a_request_begun_on_a_kept_connection_during_a_drain_gets_503_and_close(start_server, fake):
    server, url = start_server(shutdown_grace=5)
    _, holder_writer = await send_chat(
        url, json.dumps({"model": "silent", "messages": [{"role": "user", "content": "x"}]}).encode()
    )
    assert await asyncio.wait_for(fake.arrived.get(), 5) == "/api/chat"
    reader, writer = await kept_connection(url)
    writer.write(b"GET /api/ta")  # a request under way as the drain begins
    await until(lambda: head_begun(server))
    draining = asyncio.ensure_future(server.drain())
    await asyncio.sleep(0)
    writer.write(b"gs HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"], headers["retry-after"]) == (503, ["close"], ["1"])
    assert json.loads(body) == {"error": "the proxy is shutting down; retry"}
    assert await reader.read() == b""
    assert [seen.path for seen in fake.seen] == ["/api/chat", "/api/version"]
    holder_writer.close()
    await asyncio.wait_for(draining, 5)
    writer.close()


async def test_health_says_503_while_draining(start_server, fake):
    server, url = start_server(shutdown_grace=5)
    _, holder_writer = await send_chat(
        url, json.dumps({"model": "silent", "messages": [{"role": "user", "content": "x"}]}).encode()
    )
    assert await asyncio.wait_for(fake.arrived.get(), 5) == "/api/chat"
    reader, writer = await kept_connection(url)
    writer.write(b"GET /_proxy/he")
    await until(lambda: head_begun(server))
    draining = asyncio.ensure_future(server.drain())
    await asyncio.sleep(0)
    writer.write(b"alth HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, json.loads(body)) == (503, {"error": "the proxy is shutting down"})
    holder_writer.close()
    await asyncio.wait_for(draining, 5)
    writer.close()


# -- slow and silent clients ------------------------------------------------------------


async def closed_within(reader, low: float, high: float) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(reader.read(), high + 5) == b""
    assert low <= loop.time() - started <= high


async def test_a_connection_that_sends_half_a_head_is_closed_after_header_timeout(start_server, fake):
    _, url = start_server(header_timeout=0.3, keepalive_timeout=30)
    reader, writer = await open_raw(url)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: ")
    await closed_within(reader, 0.25, 2)
    assert fake.seen == []
    writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(start_server):
    _, url = start_server(header_timeout=0.3, keepalive_timeout=30)
    reader, writer = await open_raw(url)
    await closed_within(reader, 0.25, 2)
    writer.close()


async def test_an_idle_kept_connection_is_closed_after_keepalive_timeout(start_server):
    _, url = start_server(header_timeout=30, keepalive_timeout=0.4)
    reader, writer = await kept_connection(url)
    await closed_within(reader, 0.35, 3)
    writer.close()


async def test_a_head_begun_on_a_kept_connection_gets_header_timeout_more(start_server):
    _, url = start_server(header_timeout=0.6, keepalive_timeout=0.3)
    reader, writer = await kept_connection(url)
    writer.write(b"GET /api/version HTTP/1.1\r\n")  # begun, not finished, before the kept time is up
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(0.5)  # past the keep-alive time: still open, the head has begun
    writer.write(b"Host: x\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    assert loop.time() - started >= 0.5
    writer.close()


async def test_requests_keep_coming_on_one_connection_within_the_timeouts(start_server):
    _, url = start_server(header_timeout=0.3, keepalive_timeout=0.3)
    reader, writer = await kept_connection(url)
    for _ in range(5):
        await asyncio.sleep(0.1)
        writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
    writer.close()


# -- accepting -------------------------------------------------------------------------


class FlakySocket(socket.socket):
    """A listening socket whose accept() fails with the given errors first."""

    def __init__(self, *errors):
        super().__init__()
        self.errors = list(errors)
        self.bind(("127.0.0.1", 0))
        self.listen(512)
        self.setblocking(False)

    def accept(self):
        if self.errors:
            raise self.errors.pop(0)
        return super().accept()


async def test_a_burst_of_connections_is_accepted_in_rounds(io_loop):
    listener = FlakySocket()
    accepted = []
    clients = [socket.create_connection(listener.getsockname()) for _ in range(200)]
    acceptor = Acceptor(listener, lambda connection, address: accepted.append(connection))
    await until(lambda: len(accepted) == 200)  # 128 per turn, then the rest: nobody starves meanwhile
    acceptor.remove()
    for sock in accepted + clients:
        sock.close()
    listener.close()


async def test_an_aborted_connection_is_skipped_and_other_errors_are_raised(io_loop):
    listener = FlakySocket(ConnectionAbortedError(), OSError(errno.EPERM, "not allowed"))
    accepted = []
    client = socket.create_connection(listener.getsockname())
    acceptor = Acceptor(listener, lambda connection, address: accepted.append(connection))
    acceptor.remove()  # driven by hand below
    with pytest.raises(PermissionError):
        acceptor._accept(listener.fileno(), 0)
    acceptor._accept(listener.fileno(), 0)
    assert len(accepted) == 1
    for sock in [*accepted, client, listener]:
        sock.close()


async def test_out_of_descriptors_accepting_pauses_and_can_be_stopped_meanwhile(io_loop, caplog, monkeypatch):
    monkeypatch.setattr(Acceptor, "shortage_logged", float("-inf"))  # nothing logged yet in this process
    listener = FlakySocket(OSError(errno.EMFILE, "Too many open files"))
    client = socket.create_connection(listener.getsockname())
    acceptor = Acceptor(listener, lambda connection, address: connection.close())
    await until(lambda: acceptor.resuming is not None)
    assert [record.getMessage() for record in caplog.records] == ["cannot accept connections, pausing"]
    acceptor.remove()  # while paused: the resumption is cancelled too
    client.close()
    listener.close()


async def test_a_client_connection_keeps_nagle_off_across_its_requests(start_server):
    server, url = start_server()
    reader, writer = await open_raw(url)
    for _ in range(2):  # Tornado would turn it on again after each request
        writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
        (connection,) = server.http._connections
        assert connection.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    writer.close()
