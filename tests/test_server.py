import asyncio
import json
import os
import signal
import sys

import pytest

from tornado_ollama_proxy.app import make_app
from tornado_ollama_proxy.server import ProxyServer, loop_factory
from tornado_ollama_proxy.settings import Settings, SettingsError

from .helpers import open_raw, read_chunked_to_end

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
    reader, writer = await send_chat(url, json.dumps({"model": "silent", "messages": [{"role": "user", "content": "x"}]}).encode())
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
    waiting = asyncio.ensure_future(server.wait_for_stop_signal())
    await asyncio.sleep(0)  # let it install its handlers
    os.kill(os.getpid(), signum)
    await asyncio.wait_for(waiting, 5)
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
