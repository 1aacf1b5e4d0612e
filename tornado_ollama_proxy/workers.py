"""Several worker processes on one port.

The parent binds the listening sockets once, starts each worker as
``python -m tornado_ollama_proxy`` with the same arguments and the sockets'
descriptors, restarts a worker that dies, and on SIGTERM or SIGINT closes
its own copy of the sockets and passes the signal on, so that every worker
drains and the port stops accepting as soon as the workers close theirs;
then exits 0. Workers are fresh interpreters, so nothing touches an event
loop before they start.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from prometheus_client.multiprocess import mark_process_dead
from tornado.netutil import bind_sockets

from .server import STOP_SIGNALS
from .settings import Settings

WORKER_FDS = "TORNADO_OLLAMA_PROXY_WORKER_FDS"
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)


def inherited_sockets() -> list[socket.socket] | None:
    """In a worker, the listening sockets its parent bound; None in a process of its own."""
    fds = os.environ.get(WORKER_FDS)
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",")] if fds else None


class Supervisor:
    def __init__(self, settings: Settings, argv: list[str]):
        self.settings = settings
        self.argv = argv
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        self.sockets: list[socket.socket] = []

    def run(self) -> int:
        settings = self.settings
        self.sockets = bind_sockets(settings.port, settings.host)
        fds = [sock.fileno() for sock in self.sockets]
        env = {**os.environ, WORKER_FDS: ",".join(map(str, fds))}
        # Metrics must add up across workers: give them a shared folder unless one is set.
        created = None if METRICS_DIR in env else tempfile.mkdtemp(prefix="ollama-proxy-metrics-")
        if created is not None:
            env[METRICS_DIR] = created
        try:
            return self._supervise(env, fds)
        finally:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)

    def _supervise(self, env: dict[str, str], fds: list[int]) -> int:
        settings = self.settings
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._stop)
        count = settings.worker_count
        log.info(
            "starting workers",
            extra={
                "workers": count,
                "address": f"http://{settings.host}:{self.sockets[0].getsockname()[1]}",
            },
        )
        for _ in range(count):
            self._spawn(env, fds)
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
                    self._spawn(env, fds)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        log.info("workers stopped")
        return 0

    def _spawn(self, env: dict[str, str], fds: list[int]) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "tornado_ollama_proxy", *self.argv],
            env=env,
            pass_fds=fds,
            # A replacement is started with stop signals blocked (see run); its
            # own mask must not inherit that. The supervisor runs no threads.
            preexec_fn=_unblock_stop_signals,
        )
        self.children[process.pid] = (process, time.monotonic())

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        for sock in self.sockets:
            sock.close()  # once the workers close theirs, new connections are refused, not left queued
        for process, _ in self.children.values():
            process.send_signal(signum)


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
