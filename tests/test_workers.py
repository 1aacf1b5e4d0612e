"""Several worker processes on one port: restarts, shared metrics, and a drain
that turns new connections away at once."""

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .helpers import read_log

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


async def test_a_dead_workers_gauges_stop_counting(launch, upstream_url, fake):
    parent, address, workers = await start_workers(launch, workers_env(upstream_url))
    host, port = address.removeprefix("http://").split(":")
    _, holder = await asyncio.open_connection(host, int(port))
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
    host, port = address.removeprefix("http://").split(":")
    _, holder = await asyncio.open_connection(host, int(port))
    holder.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SILENT) + SILENT)
    await asyncio.wait_for(fake.arrived.get(), 10)  # keeps one worker draining
    parent.send_signal(signal.SIGTERM)
    for _ in range(2):
        await read_log(parent, "draining")
    started = asyncio.get_running_loop().time()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    except ConnectionRefusedError:
        pass
    else:  # accepted by the kernel: it must not be left waiting for the drain's end
        writer.close()
        raise AssertionError("a new connection was accepted during the drain")
    assert asyncio.get_running_loop().time() - started < 2
    holder.close()
    await read_log(parent, "workers stopped")
    assert await asyncio.get_running_loop().run_in_executor(None, parent.wait, 30) == 0
