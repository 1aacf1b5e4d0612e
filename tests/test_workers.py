"""Several worker processes on one port: connections spread over them, restarts,
shared metrics, and a drain that turns new connections away at once."""

import asyncio
import errno
import json
import os
import signal
import socket
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tornado_ollama_proxy import __version__
from tornado_ollama_proxy.workers import WORKER_FDS, bound, inherited_sockets, reserve

from .helpers import address as host_port
from .helpers import read_log, read_logs, read_response

REQUESTS = ("ollama_proxy_requests_total", (("method_out", "GET"), ("route", "/api/tags"), ("status", "200")))
SILENT = json.dumps({"model": "silent", "messages": [{"role": "user", "content": "x"}]}).encode()


def samples(text: str) -> dict:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def workers_env(upstream_url, **more):
    return {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "OLLAMA_PROXY_WORKERS": "2",
        **more,
    }


async def start_workers(launch, env):
    parent = launch(env)
    address = (await read_log(parent, "starting workers"))["address"]
    workers = [(await read_log(parent, "listening"))["pid"] for _ in range(2)]
    return parent, address, workers


def worker_metrics_folder(pid: int) -> Path:
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    return Path(environ["PROMETHEUS_MULTIPROC_DIR"])


async def stop(parent):
    parent.send_signal(signal.SIGTERM)
    await read_log(parent, "workers stopped")
    assert await asyncio.get_running_loop().run_in_executor(None, parent.wait, 30) == 0


async def pids_answering(address: str, count: int) -> list[int]:
    """Open `count` connections at once, then ask on each which worker holds it."""
    connections = await asyncio.wait_for(
        asyncio.gather(*(asyncio.open_connection(*host_port(address)) for _ in range(count))), 10
    )
    for _, writer in connections:
        writer.write(b"GET /_proxy/status HTTP/1.1\r\nHost: x\r\n\r\n")
    pids = []
    for reader, writer in connections:
        status, _, body = await asyncio.wait_for(read_response(reader), 10)  # none waits for a replacement
        assert status == 200
        pids.append(json.loads(body)["worker"]["pid"])
        writer.close()
    return pids


def listening_sockets(pid: int, port: int) -> set[int]:
    """The inodes of the sockets listening on `port` that process `pid` holds."""
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                listening.add(int(fields[9]))
    held = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    return {inode for inode in listening if f"socket:[{inode}]" in held}


async def ended(pid: int) -> None:
    """Wait for a process that is not this one's child to end."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(pid)
    done = loop.create_future()
    loop.add_reader(fd, done.set_result, None)  # readable once it has exited, its sockets closed
    try:
        await asyncio.wait_for(done, 10)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_workers_share_the_port_are_restarted_and_drain_on_sigterm(launch, upstream_url):
    parent, address, (first, second) = await start_workers(launch, workers_env(upstream_url))
    assert first != second and parent.pid not in (first, second)
    async with httpx.AsyncClient() as http:
        for _ in range(20):
            assert (await http.get(address + "/api/tags")).status_code == 200
        text = (await http.get(address + "/_proxy/metrics")).text
    assert samples(text)[REQUESTS] == 20  # whichever worker answered, one scrape sees all

    os.kill(first, signal.SIGKILL)
    exited = await read_log(parent, "worker exited, restarting")
    assert (exited["pid"], exited["exit_code"]) == (first, -9)
    replacement = await read_log(parent, "listening")
    assert replacement["pid"] not in (first, second)
    async with httpx.AsyncClient() as http:
        assert (await http.get(address + "/api/tags")).status_code == 200
    await stop(parent)


async def test_only_the_parent_tells_the_start_up_summary(launch, upstream_url):
    ready = f"tornado-ollama-proxy {__version__} is ready"
    parent = launch(workers_env(upstream_url))
    records = await read_logs(parent, ready)
    while sum(record["message"] == "listening" for record in records) < 2:
        records += await read_logs(parent, "listening")
    parent.send_signal(signal.SIGTERM)
    records += await read_logs(parent, "workers stopped")
    [summary] = [record for record in records if record["message"] == ready]
    assert (summary["workers"], summary["upstreams"][0]["reachable"]) == (2, True)


async def test_a_dead_workers_gauges_stop_counting(launch, upstream_url, fake):
    parent, address, workers = await start_workers(launch, workers_env(upstream_url))
    _, holder = await asyncio.open_connection(*host_port(address))
    holder.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SILENT) + SILENT)
    await asyncio.wait_for(fake.arrived.get(), 10)  # one request in flight in one worker
    for pid in workers:
        os.kill(pid, signal.SIGKILL)  # it dies with its request
    for _ in workers:
        await read_log(parent, "listening")
    async with httpx.AsyncClient() as http:
        text = (await http.get(address + "/_proxy/metrics")).text
    assert samples(text)[("ollama_proxy_requests_in_flight", ())] == 0
    holder.close()
    await stop(parent)


async def test_the_metrics_folder_is_made_for_the_workers_and_removed_after(launch, upstream_url, tmp_path):
    parent, _, (worker, _) = await start_workers(launch, workers_env(upstream_url, TMPDIR=str(tmp_path)))
    folder = worker_metrics_folder(worker)
    assert folder.parent == tmp_path and folder.is_dir()
    await stop(parent)
    assert not folder.exists()


async def test_a_given_metrics_folder_is_used_and_kept(launch, upstream_url, tmp_path):
    given = tmp_path / "metrics"
    given.mkdir()
    env = workers_env(upstream_url, TMPDIR=str(tmp_path), PROMETHEUS_MULTIPROC_DIR=str(given))
    parent, _, (worker, _) = await start_workers(launch, env)
    assert worker_metrics_folder(worker) == given
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics"]  # no other folder made
    await stop(parent)
    assert given.is_dir()


async def test_during_a_drain_new_connections_are_refused_at_once(launch, upstream_url, fake):
    env = workers_env(upstream_url, OLLAMA_PROXY_SHUTDOWN_GRACE="20")
    parent, address, _ = await start_workers(launch, env)
    _, holder = await asyncio.open_connection(*host_port(address))
    holder.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SILENT) + SILENT)
    await asyncio.wait_for(fake.arrived.get(), 10)  # keeps one worker draining
    parent.send_signal(signal.SIGTERM)
    for _ in range(2):
        await read_log(parent, "draining")
    started = asyncio.get_running_loop().time()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*host_port(address)), 5)
    except ConnectionRefusedError:
        pass
    else:  # accepted by the kernel: it must not be left waiting for the drain's end
        writer.close()
        raise AssertionError("a new connection was accepted during the drain")
    assert asyncio.get_running_loop().time() - started < 2
    holder.close()
    await read_log(parent, "workers stopped")
    assert await asyncio.get_running_loop().run_in_executor(None, parent.wait, 30) == 0


async def test_connections_opened_at_once_spread_over_the_workers(launch, upstream_url):
    parent, address, workers = await start_workers(launch, workers_env(upstream_url))
    _, port = host_port(address)
    first, second = (listening_sockets(pid, port) for pid in workers)
    assert len(first) == len(second) == 1 and first != second  # a socket each, not one shared
    assert listening_sockets(parent.pid, port) == set()
    pids = await pids_answering(address, 40)
    # The kernel's hash gives each worker 20 give or take a few (a share below 10: p < 0.001).
    assert min(pids.count(pid) for pid in workers) >= 10, pids
    await stop(parent)


async def test_a_dead_workers_new_connections_go_to_the_live_one_until_its_replacement_listens(launch, upstream_url):
    parent, address, (dead, survivor) = await start_workers(launch, workers_env(upstream_url))
    os.kill(parent.pid, signal.SIGSTOP)  # no replacement until the test has looked
    try:
        os.kill(dead, signal.SIGKILL)
        await ended(dead)
        assert set(await pids_answering(address, 40)) == {survivor}
    finally:
        os.kill(parent.pid, signal.SIGCONT)
    assert (await read_log(parent, "worker exited, restarting"))["pid"] == dead
    replacement = (await read_log(parent, "listening"))["pid"]
    assert set(await pids_answering(address, 40)) == {survivor, replacement}
    await stop(parent)


async def test_the_port_stays_held_while_no_worker_lives(launch, upstream_url):
    parent, address, workers = await start_workers(launch, workers_env(upstream_url))
    os.kill(parent.pid, signal.SIGSTOP)
    try:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
            await ended(pid)
        with socket.socket() as other:
            try:
                other.bind(host_port(address))
            except OSError as error:
                assert error.errno == errno.EADDRINUSE
            else:
                raise AssertionError("another program could take the port")
    finally:
        os.kill(parent.pid, signal.SIGCONT)
    for _ in workers:
        await read_log(parent, "listening")
    await stop(parent)


async def test_a_port_another_process_listens_on_is_not_shared(launch, upstream_url):
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even one that would share it
        other.bind(("127.0.0.1", 0))
        other.listen()
        parent = launch(workers_env(upstream_url, PORT=str(other.getsockname()[1])))
        exit_code = await asyncio.get_running_loop().run_in_executor(None, parent.wait, 30)
    assert exit_code != 0
    assert "Address already in use" in parent.stderr.read()


def test_each_address_family_of_the_host_is_held_and_served_on_one_port(monkeypatch):
    real = socket.getaddrinfo

    def both_families(host, *args):
        return real("127.0.0.1", *args) + real("::1", *args)

    monkeypatch.setattr(socket, "getaddrinfo", both_families)
    reserved = reserve(0, "dual-stack.test")
    assert [sock.family for sock in reserved] == [socket.AF_INET, socket.AF_INET6]
    port = reserved[0].getsockname()[1]
    assert reserved[1].getsockname()[1] == port
    given = [bound(sock.family, sock.getsockname()).detach() for sock in reserved]
    monkeypatch.setenv(WORKER_FDS, ",".join(map(str, given)))
    listening = inherited_sockets()
    for host in ("127.0.0.1", "::1"):
        socket.create_connection((host, port), timeout=5).close()
    for sock in [*listening, *reserved]:
        sock.close()
