import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import uvloop
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

from tornado_ollama_proxy.app import make_app
from tornado_ollama_proxy.default_plugins import json_logs
from tornado_ollama_proxy.logs import MalformedInputFilter, RequestIdFilter
from tornado_ollama_proxy.proxy import Proxy
from tornado_ollama_proxy.server import ProxyServer
from tornado_ollama_proxy.settings import SCHEMA, Settings

from .fake_ollama import FakeState, make_fake_ollama
from .get_only_front import make_front
from .helpers import ScriptedUpstream


@pytest.fixture
def loop_name(io_loop):
    """The event loop this run of a test is on: asyncio or uvloop."""
    return "uvloop" if type(io_loop.asyncio_loop).__module__.startswith("uvloop") else "asyncio"


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

    def start(self, app, host: str = "127.0.0.1") -> str:
        """Serve `app`: a proxy as the proxy serves itself (its timeouts, its accept
        loop), anything else (the stand-in, a front) on Tornado's own server."""
        [sock] = bind_sockets(0, host, family=socket.AF_INET)
        proxy = app.settings.get("proxy")
        server = ProxyServer(app).http if proxy is not None else HTTPServer(app)
        server.add_sockets([sock])
        if proxy is not None:
            proxy.start()
        self.running.append((server, app))
        return f"http://{host}:{sock.getsockname()[1]}"


@pytest.fixture(autouse=True)
def scripted_upstreams_stopped(request):
    """Scripted upstreams a failing test left running are stopped, so that its
    failure is reported instead of the loop hanging as it closes."""
    # Asked for here, so that this teardown runs while the loop still does.
    io_loop = request.getfixturevalue("io_loop") if "io_loop" in request.fixturenames else None
    yield
    for upstream in list(ScriptedUpstream.running):
        io_loop.run_sync(upstream.stop, timeout=10)


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch):
    """Where a generated key is kept: this test's own folder, so that a key an earlier run
    left (CI runs as root, in one home) never makes a "first start" pass."""
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture
def servers(io_loop):
    started = Servers()
    yield started
    for server, app in started.running:
        server.stop()
        io_loop.run_sync(server.close_all_connections, timeout=10)  # an error, not a hang, if one never ends
        proxy = app.settings.get("proxy") if app is not None else None
        if proxy is not None:
            io_loop.run_sync(proxy.close)


@pytest.fixture
def http(io_loop):
    """An HTTP client for the tests' own requests."""
    client = httpx.AsyncClient(timeout=10)
    yield client
    io_loop.run_sync(client.aclose)


@pytest.fixture
def fake():
    state = FakeState()
    yield state
    if state.blob_gate is not None:
        state.blob_gate.set()  # a stand-in handler held at the gate can end, and its server close


@pytest.fixture
def upstream_url(servers, fake):
    return servers.start(make_fake_ollama(fake))


class ProxyURL(str):
    """A started proxy's URL, which also holds the proxy itself (its pool, metrics…)."""

    proxy: Proxy


@pytest.fixture
def make_proxy(servers, upstream_url, tmp_path):
    """Start a proxy in front of the stand-in; keyword arguments override settings
    (`upstreams` as in a settings file: a list of {"name", "url", …})."""

    def start(**overrides):
        # Served on loopback, as the settings say: a public host would require a generated key.
        options = {"host": "127.0.0.1", "upstream": upstream_url, "plugins_dir": str(tmp_path)}
        options.update(overrides)
        if isinstance(options.get("upstreams"), list):
            validate, _ = SCHEMA["upstreams"]
            options["upstreams"] = validate(options["upstreams"])
        app = make_app(Settings(**options))
        url = ProxyURL(servers.start(app))
        url.proxy = app.settings["proxy"]
        return url

    return start


class StandIn:
    """A stand-in pod of a pool: its state, its URL, and a way to kill it."""

    def __init__(self, state: FakeState, url: str, server: HTTPServer):
        self.state, self.url, self.server = state, url, server

    def __iter__(self):  # state, url = pod
        return iter((self.state, self.url))

    def __getitem__(self, index):
        return (self.state, self.url)[index]

    async def kill(self):
        """Stop listening and drop every connection, as a pod that dies."""
        self.server.stop()
        await self.server.close_all_connections()


@pytest.fixture
def pods(servers):
    """Start stand-in pods of a pool, each its own stand-in Ollama with `knobs` (FakeState's
    fields, a callable for a fresh value each)."""

    def start(count, **knobs):
        started = []
        for _ in range(count):
            state = FakeState(**{name: value() if callable(value) else value for name, value in knobs.items()})
            servers.start(make_fake_ollama(state))
            server, _ = servers.running[-1]
            port = next(iter(server._sockets.values())).getsockname()[1]
            started.append(StandIn(state, f"http://127.0.0.1:{port}", server))
        return started

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

    def __init__(self, port: int | None = None):
        if port is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        self.port = port
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


@pytest.fixture
def log_lines():
    """Every record, formatted by the built-in JSON handler, parsed back."""
    sink = io.StringIO()
    handler = json_logs.log_handler(Settings(log_format="json"))
    handler.setStream(sink)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(MalformedInputFilter())
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in sink.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(saved)


@pytest.fixture
def launch(tmp_path):
    """Start the console script the way the Procfile does: no arguments, configured by the environment."""
    processes = []

    def start(env, preexec_fn=None):
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("tornado-ollama-proxy"))],
            cwd=tmp_path,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # a graceful stop also saves its coverage data
        process.wait(30)
        process.stdout.close()
        process.stderr.close()


NGINX_CONF = """
worker_processes 1;
daemon off;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 0;
    proxy_http_version 1.1;
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_read_timeout {read_timeout}s;
    proxy_set_header Connection "";
    proxy_set_header X-Forwarded-For $remote_addr;
    upstream target {{
        server {target};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ {method} proxy_pass http://target; }}
    }}
}}
"""


class NginxFront:
    """A real nginx on loopback before `target`: keeps its upstream connections
    alive, as a platform's front does; optionally turns every request into GET
    and gives up on a silent upstream after `read_timeout` seconds."""

    def __init__(self, folder: Path, target: str, *, as_get: bool = False, read_timeout: float = 600):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(exist_ok=True)
        config = folder / "nginx.conf"
        config.write_text(
            NGINX_CONF.format(
                dir=folder,
                port=self.port,
                target=target.removeprefix("http://"),
                read_timeout=read_timeout,
                method="proxy_method GET;" if as_get else "",
                user="user root;" if os.geteuid() == 0 else "",
            )
        )
        self.folder = folder
        self.process = subprocess.Popen(["nginx", "-p", str(folder), "-c", str(config)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not (folder / "nginx.pid").exists():  # written once it listens
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {self.process.stderr.read().decode()}")
            time.sleep(0.02)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.process.stderr.close()


@pytest.fixture
def clock(monkeypatch):
    """The wall clock (`time.time`, which the limits count by) moved only by the test, so
    that a window's reset is exact: a whole second to start with, so that sums of halves
    and quarters stay exact in binary."""
    now = [float(int(time.time()))]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


@pytest.fixture
def nginx(tmp_path):
    """Start nginx fronts; they are stopped when the test ends."""
    started = []

    def start(target: str, **options) -> str:
        front = NginxFront(tmp_path / f"nginx-{len(started)}", target, **options)
        started.append(front)
        return front.url

    yield start
    for front in started:
        front.stop()
