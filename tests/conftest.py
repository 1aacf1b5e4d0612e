import asyncio
import socket
import subprocess

import httpx
import pytest
import uvloop
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

from tornado_ollama_proxy.app import make_app
from tornado_ollama_proxy.settings import Settings

from .fake_ollama import FakeState, make_fake_ollama
from .get_only_front import make_front


@pytest.fixture(params=["asyncio", "uvloop"])
def io_loop(request):
    """Every async test runs on both event loops the proxy supports."""
    make_loop = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    loop = IOLoop(asyncio_loop=make_loop())
    loop.make_current()
    yield loop
    loop.clear_current()
    loop.close(all_fds=True)


class Servers:
    """Starts servers on loopback ports and stops them when the test ends."""

    def __init__(self):
        self.running = []

    def start(self, app) -> str:
        [sock] = bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        server = HTTPServer(app)
        server.add_sockets([sock])
        self.running.append((server, app))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def servers(io_loop):
    started = Servers()
    yield started
    for server, app in started.running:
        server.stop()
        io_loop.run_sync(server.close_all_connections)
        proxy = getattr(app, "proxy", None)
        if proxy is not None:
            proxy.upstream.close()


@pytest.fixture
def http(io_loop):
    """An HTTP client for the tests' own requests."""
    client = httpx.AsyncClient(timeout=10)
    yield client
    io_loop.run_sync(client.aclose)


@pytest.fixture
def fake():
    return FakeState()


@pytest.fixture
def upstream_url(servers, fake):
    return servers.start(make_fake_ollama(fake))


@pytest.fixture
def make_proxy(servers, upstream_url, tmp_path):
    """Start a proxy in front of the stand-in; keyword arguments override settings."""

    def start(**overrides):
        options = {"upstream": upstream_url, "plugins_dir": str(tmp_path)}
        options.update(overrides)
        app = make_app(Settings(**options))
        return servers.start(app)

    return start


@pytest.fixture
def proxy_url(make_proxy):
    return make_proxy()


@pytest.fixture
def front_url(servers, proxy_url):
    """The platform in front: every request reaches the proxy as GET."""
    return servers.start(make_front(proxy_url))


class RedisServer:
    """A real redis-server on a free loopback port, for this test only."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in self.process.stdout:  # its own word that it is ready, not a guess
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError("redis-server did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.process.stdout.close()


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()
