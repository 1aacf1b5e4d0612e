"""Listening on the configured address, and draining in-flight requests on SIGTERM."""

import asyncio
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from contextlib import suppress

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from .settings import SettingsError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on: uvloop (cheaper per chunk and per request) when
    installed and not declined, else asyncio's own (None)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SettingsError(
                "event_loop: 'uvloop' needs the uvloop package: pip install 'tornado-ollama-proxy[speed]'"
            ) from None
        return None
    return uvloop.new_event_loop


def raise_open_files_limit() -> int:
    """Lift the soft file-descriptor limit to the hard one.

    Each stream holds two sockets; a soft limit of 1024, common on pods,
    would cap the proxy near 500 concurrent streams.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with suppress(ValueError, OSError):  # an unlimited hard limit cannot be the soft one
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ProxyServer:
    def __init__(self, app: Application):
        self.proxy = app.proxy
        self.http = HTTPServer(app)
        self.port: int | None = None

    def listen(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen on the configured address, or on sockets a parent process bound."""
        settings = self.proxy.settings
        sockets = sockets or bind_sockets(settings.port, settings.host)
        self.port = sockets[0].getsockname()[1]
        self.http.add_sockets(sockets)
        log.info(
            "listening",
            extra={
                "address": f"http://{settings.host}:{self.port}",
                "upstream": settings.upstream_base,
                "routes": len(self.proxy.routes),
                "pid": os.getpid(),
            },
        )

    async def wait_for_stop_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    async def drain(self) -> None:
        """Stop accepting, give in-flight requests the grace period, then close everything."""
        grace = self.proxy.settings.shutdown_grace
        self.http.stop()
        log.info("draining", extra={"in_flight": self.proxy.in_flight.count, "grace_s": grace})
        try:
            await asyncio.wait_for(self.proxy.in_flight.wait_idle(), grace)
        except TimeoutError:
            log.warning("grace period over, closing", extra={"in_flight": self.proxy.in_flight.count})
        await self.http.close_all_connections()
        self.proxy.upstream.close()
        log.info("stopped")


async def serve(app: Application, sockets: list[socket.socket] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    log.info("open files limit", extra={"max_open_files": raise_open_files_limit()})
    server = ProxyServer(app)
    server.listen(sockets)
    await server.wait_for_stop_signal()
    await server.drain()
