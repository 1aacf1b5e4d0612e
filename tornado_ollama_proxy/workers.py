"""Several worker processes on one port, each with a listening socket of its own.

With one shared socket, the kernel hands each new connection to whichever
worker wakes first, so connections opened together can land mostly on one
worker, which then serves them for their whole kept-alive life. Instead each
worker gets its own socket bound to the address with SO_REUSEPORT, and the
kernel spreads new connections over the listening ones by a hash of their
addresses (nginx's ``reuseport``).

The parent resolves the address once and holds it with sockets that are bound
but do not listen, so that the port stays taken even while no worker lives
(the kernel picks it for no outgoing connection, and a program that binds it
without SO_REUSEADDR fails). It starts each worker as ``python -m tornado_ollama_proxy`` with the
same arguments and a fresh socket's descriptors, and keeps no copy: the worker
listens once it is ready, and when it dies its socket leaves the group with
it, so new connections go to the live workers instead of queueing for the
replacement. On SIGTERM or SIGINT the parent passes the signal on; each worker
closes its socket as its drain starts, so the port refuses new connections at
once; then the parent exits 0. Workers are fresh interpreters, so nothing
touches an event loop before they start.
"""

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client.multiprocess import mark_process_dead
from tornado.netutil import bind_sockets

from .server import STOP_SIGNALS
from .settings import Settings

WORKER_FDS = "TORNADO_OLLAMA_PROXY_WORKER_FDS"
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
BACKLOG = 128  # as Tornado's own listening sockets

log = logging.getLogger(__name__)


def inherited_sockets() -> list[socket.socket] | None:
    """In a worker, the sockets its parent bound for it, now listening; None in a process of its own."""
    fds = os.environ.get(WORKER_FDS)
    if not fds:
        return None
    sockets = [socket.socket(fileno=int(fd)) for fd in fds.split(",")]
    for sock in sockets:
        sock.setblocking(False)
        sock.listen(BACKLOG)
    return sockets


def reserve(port: int, host: str) -> list[socket.socket]:
    """Sockets that hold `host`'s addresses on `port` without listening.

    Tornado resolves the addresses (a socket per address family, one port for
    all when 0 asks for a free one). Its sockets are bound without SO_REUSEPORT,
    so that a port another process holds fails here, as with one worker,
    instead of being shared with it; they listen, so they serve only as the
    pattern.
    """
    pattern = bind_sockets(port, host)
    addresses = [(sock.family, sock.getsockname()) for sock in pattern]
    for sock in pattern:
        sock.close()
    return [bound(family, address) for family, address in addresses]


def bound(family: socket.AddressFamily, address: tuple[Any, ...]) -> socket.socket:
    """A socket bound to `address` with SO_REUSEPORT. It joins the kernel's
    group for the address only when it listens, so no connection waits on it
    before then."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as Tornado's: IPv4 has a socket of its own
    sock.bind(address)
    return sock


class Supervisor:
    def __init__(self, settings: Settings, argv: list[str], announce: Callable[[int], Coroutine[Any, Any, None]]):
        self.settings = settings
        self.argv = argv
        self.announce = announce  # tells the port once the workers serve it (only here, not in each)
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        self.reserved: list[socket.socket] = []

    def run(self) -> int:
        settings = self.settings
        self.reserved = reserve(settings.port, settings.host)
        env = dict(os.environ)
        # Metrics must add up across workers: give them a shared folder unless one is set.
        created = None if METRICS_DIR in env else tempfile.mkdtemp(prefix="ollama-proxy-metrics-")
        if created is not None:
            env[METRICS_DIR] = created
        try:
            return self._supervise(env)
        finally:
            for sock in self.reserved:
                sock.close()
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)

    def _supervise(self, env: dict[str, str]) -> int:
        settings = self.settings
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._stop)
        count = settings.worker_count
        log.info(
            "starting workers",
            extra={
                "workers": count,
                "address": f"http://{settings.host}:{self.reserved[0].getsockname()[1]}",
            },
        )
        for _ in range(count):
            self._spawn(env)
        asyncio.run(self.announce(self.reserved[0].getsockname()[1]))
        while self.children:
            pid, status = os.wait()
            # A stop signal arriving while a worker is replaced waits until the
            # replacement exists, so that it is passed on to it too.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                _, started = self.children.pop(pid)
                mark_process_dead(pid, env[METRICS_DIR])  # type: ignore[no-untyped-call]  # its live gauges no longer count
                if not self.stopping:
                    log.warning(
                        "worker exited, restarting",
                        extra={
                            "pid": pid,
                            "exit_code": os.waitstatus_to_exitcode(status),
                        },
                    )
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))  # no crash loop above 1/s
                    self._spawn(env)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        log.info("workers stopped")
        return 0

    def _spawn(self, env: dict[str, str]) -> None:
        sockets = [bound(sock.family, sock.getsockname()) for sock in self.reserved]
        fds = [sock.fileno() for sock in sockets]
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "tornado_ollama_proxy", *self.argv],
                env={**env, WORKER_FDS: ",".join(map(str, fds))},
                pass_fds=fds,
                # A replacement is started with stop signals blocked (see run); its
                # own mask must not inherit that. The supervisor runs no threads.
                preexec_fn=_unblock_stop_signals,
            )
        finally:
            for sock in sockets:
                sock.close()  # the worker's copy is the only one: its socket dies with it
        self.children[process.pid] = (process, time.monotonic())

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        for process, _ in self.children.values():
            process.send_signal(signum)


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
