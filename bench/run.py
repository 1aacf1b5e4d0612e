"""Benchmarks: the proxy against a direct connection (the limit) and nginx doing the same job.

    python bench/run.py [--quick] [--repeats N] [--only 1,2,...] [--baseline REV]

Every scenario runs against the three targets in the same invocation,
interleaved (the order rotates each repeat), and prints medians and the
proxy/nginx ratio. CPU is read from each server process's own accounting
(/proc/<pid>/stat), steadier than wall time on a shared 2-core machine; the
load that other processes put on the machine meanwhile is printed too.
With --baseline, scenarios 1 and 2 also run the proxy as it was at REV
(checked out into a temporary git worktree) and print proxy/baseline ratios,
repeat by repeat: their median and range.
Scenario 6 drives one and two workers with wrk, a load generator in C, and
counts the requests each worker served. Scenario 7 compares the proxy in front
of four one-slot stand-in pods with the proxy in front of one. Scenario 8
compares the proxy whose pod has slots (every generation through the fair queue,
never full) with the same proxy whose pod has none: CPU per request, run by run.
Nothing is asserted: figures are printed.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
NODE_ORIGINAL = "ollama-proxy-fix"  # the seed's TypeScript original, from the npm registry


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def machine_cpu() -> float:
    """CPU seconds all the cores have been busy since boot (/proc/stat), stolen time included."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / TICK


def own_cpu(pids: list[int]) -> float:
    """CPU seconds of the servers `pids`, of this process and of its finished children (wrk)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(cpu_seconds(pid) for pid in pids) + sum(use.ru_utime + use.ru_stime for use in usage)


def outside(own: list[int]):
    """A watch on the load from outside the benchmark (whose servers are `own`): the machine is
    shared. Called, it gives the cores that other processes kept busy since it was made."""
    machine, mine, started = machine_cpu(), own_cpu(own), time.monotonic()
    return lambda: (machine_cpu() - machine - (own_cpu(own) - mine)) / (time.monotonic() - started)


class Target:
    def __init__(self, name: str, port: int, pid: int | None, corrects: bool, workers: bool = False):
        self.name, self.port, self.pid, self.corrects, self.workers = name, port, pid, corrects, workers

    def method(self, real: str) -> bytes:
        """What the client sends: GET when the target must restore the method, as the platform does."""
        return b"GET" if self.corrects else real.encode()

    def cpu(self) -> float:
        """CPU seconds of the serving process, or of every worker under a supervising parent."""
        if not self.pid:
            return 0.0
        return sum(cpu_seconds(pid) for pid in (children(self.pid) if self.workers else [self.pid]))


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def wait_for_port(port: int, limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


def start_server(script: str, port: int, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, str(HERE / script), str(port), *args], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    return process


def start_nginx(config: str, **values: object) -> subprocess.Popen:
    """nginx on bench/`config`, each ``@NAME@`` in it replaced by values[NAME], in a folder of its own."""
    folder = tempfile.mkdtemp()
    text = (HERE / config).read_text()
    for name, value in {"DIR": folder, **values}.items():
        text = text.replace(f"@{name}@", str(value))
    path = Path(folder) / "nginx.conf"
    path.write_text(text)
    return subprocess.Popen(["nginx", "-c", str(path), "-p", folder])


def nginx_worker(master: subprocess.Popen) -> int:
    return children(master.pid)[0]


def upstream(port: int) -> dict[str, str]:
    """One pod, as every version of the proxy is told it."""
    return {"OLLAMA_PROXY_UPSTREAM": f"http://127.0.0.1:{port}"}


def pods_of(ports: list[int], slots: int | None) -> dict[str, str]:
    """A pool of pods with `slots` each (None: not set, and so no queue), in the `upstreams`
    setting's JSON form."""
    pods = [
        {"name": f"pod{n}", "url": f"http://127.0.0.1:{port}", **({"slots": slots} if slots is not None else {})}
        for n, port in enumerate(ports, 1)
    ]
    return {"OLLAMA_PROXY_UPSTREAMS": json.dumps(pods)}


def proxy_env(settings: dict[str, str], source: Path | None) -> dict[str, str]:
    """The proxy's environment: `settings` on loopback, nothing written to the home folder (a
    generated key would be), and its package from `source` when given, else the installed one."""
    return {
        **os.environ,
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_PLUGINS_DIR": tempfile.mkdtemp(),
        "XDG_STATE_HOME": tempfile.mkdtemp(),
        **({"PYTHONPATH": str(source)} if source else {}),
        **settings,
    }


def start_proxy(port: int, settings: dict[str, str], source: Path | None = None) -> subprocess.Popen:
    # From a folder of its own, where no other tornado_ollama_proxy shadows the one meant.
    return subprocess.Popen(
        [sys.executable, "-m", "tornado_ollama_proxy"],
        env=proxy_env({"OLLAMA_PROXY_PORT": str(port), **settings}, source),
        cwd=tempfile.mkdtemp(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def imported(source: Path | None) -> Path:
    """The package `start_proxy` runs with `source`: imported by the same interpreter, from the
    same kind of folder, with the same environment."""
    result = subprocess.run(
        [sys.executable, "-c", "import tornado_ollama_proxy as p; print(p.__file__)"],
        env=proxy_env({}, source),
        cwd=tempfile.mkdtemp(),
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(result.stdout.strip()).parent


@contextlib.contextmanager
def worktree(revision: str | None):
    """`revision` of this repository checked out in a temporary git worktree, removed at
    the end (None without a revision)."""
    if revision is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as parent:
        folder = Path(parent) / "baseline"
        git("worktree", "add", "--detach", "--quiet", str(folder), revision)
        try:
            yield folder
        finally:
            git("worktree", "remove", "--force", str(folder))


def git(*args: str, cwd: Path = HERE.parent) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def start_node_original(port: int, upstream_port: int) -> subprocess.Popen:
    """The seed's original, installed into a temporary folder and started as ``npx ollama-proxy-fix``
    starts it: its own bin script, so that the process measured is its node. Its README's
    settings are environment variables: OLLAMA_PROXY_PORT, OLLAMA_HOST and OLLAMA_PORT."""
    folder = tempfile.mkdtemp()
    subprocess.run(
        ["npm", "install", "--silent", "--prefix", folder, "--no-audit", "--no-fund", NODE_ORIGINAL], check=True
    )
    env = {
        **os.environ,
        "OLLAMA_PROXY_PORT": str(port),
        "OLLAMA_HOST": "127.0.0.1",
        "OLLAMA_PORT": str(upstream_port),
    }
    # It writes three lines per request to stdout: kept, as the proxy keeps its access log.
    return subprocess.Popen(
        [str(Path(folder) / "node_modules" / ".bin" / NODE_ORIGINAL)], env=env, cwd=folder, stdout=subprocess.DEVNULL
    )


async def get(port: int, path: str) -> tuple[bytes, bytes]:
    """GET `path` on a new connection: the answer's status line and its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % path.encode())
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    return head.split(b"\r\n")[0], body


async def get_json(port: int, path: str) -> tuple[bytes, dict]:
    """GET `path` on a new connection: the answer's status line and its JSON body."""
    status, body = await get(port, path)
    return status, json.loads(body)


async def wait_for_workers(port: int, count: int, limit: float = 10) -> list[int]:
    """The pids of the `count` workers of a proxy, once each has answered on a new connection: each
    then listens, so that connections opened next spread over all of them."""
    await wait_for_port(port, limit)  # refused until a worker listens
    seen: set[int] = set()
    deadline = time.monotonic() + limit
    while len(seen) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(seen)} of {count} workers answered")
        seen.add((await get_json(port, "/_proxy/status"))[1]["worker"]["pid"])
    return sorted(seen)


async def wait_for_pool(port: int, limit: float = 10) -> None:
    """Until the proxy is healthy and has read every pod's models (it balances on them)."""
    await wait_for_port(port, limit)
    deadline = time.monotonic() + limit
    while True:
        status, health = await get_json(port, "/_proxy/health")
        if b" 200 " in status and all(pod["models"] and pod["loaded"] for pod in health.get("upstreams", [])):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool is not ready: {health}")
        await asyncio.sleep(0.05)


# -- clients -----------------------------------------------------------------


async def request(port: int, method: bytes, path: str, body: bytes = b"", keep=None):
    """Send one request (on `keep`, an open (reader, writer), if given) and read the whole answer
    (its Content-Length's bytes, or its chunks)."""
    reader, writer = keep or await asyncio.open_connection("127.0.0.1", port)
    kind = b"Content-Type: application/json\r\n" if body else b""  # Express reads a body only when told it is JSON
    writer.write(
        b"%s %s HTTP/1.1\r\nHost: localhost\r\n%sContent-Length: %d\r\n\r\n%s"
        % (method, path.encode(), kind, len(body), body)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 2"), head  # an error answered fast must not count as a fast answer
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)  # and its CRLF
        await reader.readline()  # the end's empty line
        return reader, writer
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    await reader.readexactly(length)
    return reader, writer


async def token_stream(target: Target, lines: int, rate: int, latencies: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    body = json.dumps({"n": lines, "rate": rate}).encode()
    writer.write(
        b"%s /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
        % (target.method("POST"), len(body), body)
    )
    await reader.readuntil(b"\r\n\r\n")
    seen = 0
    while seen < lines:
        line = await reader.readline()
        if line.startswith(b'{"t":'):
            latencies.append(time.monotonic_ns() - int(line[5 : line.index(b",")]))
            seen += 1
    writer.close()


async def scenario_streams(target: Target, streams: int, seconds: float) -> dict:
    rate = 50
    latencies: list[int] = []
    before = target.cpu()
    await asyncio.gather(*(token_stream(target, int(rate * seconds), rate, latencies) for _ in range(streams)))
    cpu = target.cpu() - before
    latencies.sort()
    return {
        "p50_ms": latencies[len(latencies) // 2] / 1e6,
        "p99_ms": latencies[int(len(latencies) * 0.99)] / 1e6,
        "cpu_us_per_chunk": cpu * 1e6 / len(latencies),
    }


async def scenario_small(target: Target, path: str, real_method: str, seconds: float, body: bytes = b"") -> dict:
    """50 kept connections sending `path` for `seconds`, each its next request when its last is
    answered; `body`, or a model's name for a POST upstream."""
    body = body or (b'{"model": "llama3.2"}' if real_method == "POST" else b"")
    count = 0
    deadline = time.monotonic() + seconds

    async def worker():
        nonlocal count
        keep = None
        while time.monotonic() < deadline:
            keep = await request(target.port, target.method(real_method), path, body, keep)
            count += 1
        keep[1].close()

    before, started = target.cpu(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(50)))
    elapsed, cpu = time.monotonic() - started, target.cpu() - before
    return {"requests_per_s": count / elapsed, "cpu_us_per_request": cpu * 1e6 / count}


async def scenario_upload(target: Target, size: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    path = b"/api/blobs/sha256:" + b"0" * 64
    writer.write(
        b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (target.method("POST"), path, size)
    )
    block = b"u" * (1 << 20)
    started = time.monotonic()
    for _ in range(size // len(block)):
        writer.write(block)
        await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    elapsed = time.monotonic() - started
    writer.close()
    return {"upload_MB_per_s": size / 1e6 / elapsed}


async def scenario_download(target: Target, size: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    body = json.dumps({"size": size}).encode()
    started = time.monotonic()
    writer.write(
        b"%s /api/pull HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
        % (target.method("POST"), len(body), body)
    )
    await reader.readuntil(b"\r\n\r\n")
    received, tail = 0, b"\r\n"
    while not tail.endswith(b"\r\n0\r\n\r\n"):
        chunk = await reader.read(1 << 20)
        received += len(chunk)
        tail = (tail + chunk)[-16:]
    elapsed = time.monotonic() - started
    writer.close()
    return {"download_MB_per_s": size / 1e6 / elapsed}


async def scenario_idle(target: Target, streams: int) -> dict:
    body = json.dumps({"n": 3600, "rate": 1}).encode()
    connections = []
    for _ in range(streams):
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        writer.write(
            b"%s /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
            % (target.method("POST"), len(body), body)
        )
        connections.append((reader, writer))
    for reader, _ in connections:
        await reader.readuntil(b"}\n")  # every stream is open and flowing
    rss = memory_kib(target.pid, "VmRSS") / 1024 if target.pid else 0.0
    for _, writer in connections:
        writer.close()
    return {"rss_MB": rss}


# -- the run -----------------------------------------------------------------


def table(title: str, results: dict[str, list[dict]]) -> None:
    print(f"\n## {title}\n")
    metrics = list(next(iter(results.values()))[0])
    print("| target | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    medians = {name: {m: statistics.median(run[m] for run in runs) for m in metrics} for name, runs in results.items()}
    for name, values in medians.items():
        print(f"| {name} | " + " | ".join(f"{values[m]:.3g}" for m in metrics) + " |")
    for name in (name for name in medians if name.startswith("proxy") and "nginx" in medians):
        ratios = [medians[name][m] / medians["nginx"][m] if medians["nginx"][m] else float("nan") for m in metrics]
        print(f"| {name} / nginx | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    # Repeat by repeat: single runs on a shared machine differ more than the changes worth seeing.
    for other in ("nginx", "relay floor", "tornado floor", "tornado web on llhttp", "node original", "baseline"):
        if other in results:
            pairs = list(zip(results["proxy"], results[other], strict=True))
            cells = (spread([run[m] / base[m] for run, base in pairs if base[m]]) for m in metrics)
            print(f"| proxy / {other}, each run's: median (min to max) | " + " | ".join(cells) + " |")


def spread(ratios: list[float]) -> str:
    """The median of `ratios` and their range."""
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f} to {max(ratios):.3f})"


async def interleaved(targets: list[Target], repeats: int, run) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {t.name: [] for t in targets}
    for repeat in range(repeats):
        order = targets[repeat % len(targets) :] + targets[: repeat % len(targets)]
        for target in order:
            results[target.name].append(await run(target))
    return results


async def startup_seconds(upstream_port: int) -> float:
    port = free_port()
    started = time.monotonic()
    process = start_proxy(port, upstream(upstream_port))
    await wait_for_port(port)
    await request(port, b"GET", "/api/tags")
    elapsed = time.monotonic() - started
    process.terminate()
    process.wait()
    return elapsed


# -- 6. one worker against two, with wrk --------------------------------------


def wrk(port: int, seconds: float, connections: int = 50) -> float:
    """Requests/s of wrk's kept connections on /api/tags: one thread in C, so that
    the client is not what limits the server."""
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", f"http://127.0.0.1:{port}/api/tags"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stdout.splitlines():
        if "Non-2xx" in line or "Socket errors" in line:
            print(f"wrk on port {port}: {line.strip()}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    assert found, result.stdout
    return float(found[1])


def served(workers: list[int], metrics: str) -> list[float]:
    """Requests each worker has counted so far, from its own file in the workers' metrics folder."""
    return [
        sum(
            sample.value
            for metric in MultiProcessCollector.merge([f"{metrics}/counter_{pid}.db"])
            for sample in metric.samples
            if sample.name == "ollama_proxy_requests_total"
        )
        for pid in workers
    ]


QUIET = 0.1  # cores of other load under which a wrk pair counts as measured on a quiet machine


class WrkRun(NamedTuple):
    rate: float  # requests/s
    share: str  # of the requests, per worker
    others: float  # cores that processes outside the benchmark kept busy


def wrk_run(
    port: int, seconds: float, own: list[int], workers: list[int], metrics: str, connections: int = 50
) -> WrkRun:
    """wrk on `port`, the share of its requests each of `workers` served, and the load from
    outside the benchmark (whose servers are `own`) meanwhile: the machine is shared."""
    others, before = outside(own), served(workers, metrics)
    rate = wrk(port, seconds, connections)
    counts = [later - earlier for earlier, later in zip(before, served(workers, metrics), strict=True)]
    return WrkRun(rate, " / ".join(f"{count / sum(counts):.0%}" for count in counts), others())


async def scenario_workers(seconds: float, pairs: int) -> None:
    """One worker and two in interleaved pairs, then two behind a front that keeps 16 idle
    connections to them; upstream, nginx answering a constant."""
    constant_port, one_port, two_port, front_port = (free_port() for _ in range(4))
    metrics = tempfile.mkdtemp()
    constant = start_nginx("constant.conf", PORT=constant_port)
    one = start_proxy(one_port, upstream(constant_port))
    two = start_proxy(
        two_port, {**upstream(constant_port), "OLLAMA_PROXY_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": metrics}
    )
    front = start_nginx("nginx.conf", PORT=front_port, UPSTREAM=f"127.0.0.1:{two_port}", KEEPALIVE=16)
    try:
        for port in (constant_port, one_port, front_port):
            await wait_for_port(port)
        workers = await wait_for_workers(two_port, 2)
        own = [one.pid, *workers, nginx_worker(constant), nginx_worker(front)]
        print(f"\n## 6. wrk -t1 -c50 -d{seconds:g}s on /api/tags, constant nginx upstream: 1 worker against 2\n")
        print(
            "| pair | 1 worker (requests/s) | 2 workers (requests/s) | 2w / 1w | requests per worker (2w) "
            "| other load (cores), 1w / 2w |"
        )
        print("|---|---|---|---|---|---|")
        alones, boths, quiet = [], [], []
        for pair in range(pairs):
            # The order alternates, so that a drift in the machine's load evens out.
            order = (one_port, two_port) if pair % 2 == 0 else (two_port, one_port)
            runs = {port: wrk_run(port, seconds, own, workers if port == two_port else [], metrics) for port in order}
            alone, both = runs[one_port], runs[two_port]
            alones.append(alone.rate)
            boths.append(both.rate)
            if max(alone.others, both.others) < QUIET:
                quiet.append(both.rate / alone.rate)
            print(
                f"| {pair + 1} | {alone.rate:.0f} | {both.rate:.0f} | {both.rate / alone.rate:.2f}x | {both.share} "
                f"| {alone.others:.2f} / {both.others:.2f} |"
            )
        ratios = [both / alone for alone, both in zip(alones, boths, strict=True)]
        print(
            f"| median | {statistics.median(alones):.0f} | {statistics.median(boths):.0f} "
            f"| {statistics.median(ratios):.2f}x | | |"
        )
        if quiet:
            print(
                f"\nmedian 2w / 1w of the {len(quiet)} pairs with other load below {QUIET} core in both runs: "
                f"{statistics.median(quiet):.2f}x"
            )
        print("\n2 workers behind nginx keeping 16 idle connections to them (`keepalive 16`), requests per worker:\n")
        print("| client connections | " + " | ".join(f"run {run + 1}" for run in range(pairs)) + " |")
        print("|---|" + "---|" * pairs)
        for connections in (4, 50):  # fewer than it keeps, and more
            fronted = [wrk_run(front_port, seconds, own, workers, metrics, connections) for _ in range(pairs)]
            print(f"| {connections} | " + " | ".join(f"{run.share} ({run.rate:.0f}/s)" for run in fronted) + " |")
    finally:
        for process in (front, two, one, constant):
            process.terminate()
            process.wait()


# -- 7. a pool of one-slot pods ---------------------------------------------------

GENERATION = 0.2  # seconds each stand-in pod takes per generation, one at a time
CLIENTS = 16  # each sends its next generation when its last is answered


class PoolRun(NamedTuple):
    rate: float  # generations/s
    cpu_us: float  # the proxy's CPU per generation
    answered: int
    served: list[int]  # generations each pod served
    most_generating: list[int]  # per pod, at once: 1 if it served one at a time
    most_waiting: list[int]


async def generations(target: Target, pods: list[int], seconds: float) -> PoolRun:
    """CLIENTS clients sending generations for `seconds`, each with a prompt never sent before, so
    that no two share a conversation (whose pod the proxy would prefer). The rate counts up to
    the last answer; the pods count what they served."""
    sent, answered = itertools.count(), 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal answered
        keep = None
        while time.monotonic() < deadline:
            prompt = f"generation {next(sent)}"
            body = json.dumps({"model": "llama3.2", "prompt": prompt, "stream": False}).encode()
            keep = await request(target.port, target.method("POST"), "/api/generate", body, keep)
            answered += 1
        keep[1].close()

    before = [(await get_json(pod, "/bench/stats"))[1] for pod in pods]  # this also starts the pods' most-at-once
    cpu, started = target.cpu(), time.monotonic()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    elapsed, cpu = time.monotonic() - started, target.cpu() - cpu
    after = [(await get_json(pod, "/bench/stats"))[1] for pod in pods]
    return PoolRun(
        answered / elapsed,
        cpu * 1e6 / answered,
        answered,
        [later["served"] - earlier["served"] for earlier, later in zip(before, after, strict=True)],
        [later["most_generating"] for later in after],
        [later["most_waiting"] for later in after],
    )


async def scenario_pool(seconds: float, repeats: int) -> None:
    """The proxy in front of four one-slot pods against in front of one of them, in interleaved
    runs: four should give four times the generations/s, if it spreads them evenly."""
    pods = [free_port() for _ in range(4)]
    one_port, four_port = free_port(), free_port()
    processes = [start_server("upstream.py", port, str(GENERATION)) for port in pods]
    processes += [start_proxy(one_port, pods_of(pods[:1], 1)), start_proxy(four_port, pods_of(pods, 1))]
    try:
        for port in (one_port, four_port):
            await wait_for_pool(port)
        one, four = (
            Target("1 pod", one_port, processes[-2].pid, corrects=True),
            Target("4 pods", four_port, processes[-1].pid, corrects=True),
        )
        results = await interleaved([one, four], repeats, lambda t: generations(t, pods, seconds))
        print(
            f"\n## 7. a pool: {CLIENTS} clients for {seconds:g} s, one-slot pods of {GENERATION:g} s per generation, "
            "1 pod against 4\n"
        )
        print(
            "| run | 1 pod (generations/s) | 4 pods (generations/s) | 4 / 1 | generations per pod (4 pods) "
            "| most waiting at once per pod (4 pods) | proxy CPU per generation (µs), 1 / 4 |"
        )
        print("|---|---|---|---|---|---|---|")
        for run, (alone, pool) in enumerate(zip(results[one.name], results[four.name], strict=True), 1):
            print(
                f"| {run} | {alone.rate:.2f} | {pool.rate:.2f} | {pool.rate / alone.rate:.2f}x "
                f"| {' / '.join(map(str, pool.served))} | {' / '.join(map(str, pool.most_waiting))} "
                f"| {alone.cpu_us:.0f} / {pool.cpu_us:.0f} |"
            )
        rates = {name: [run.rate for run in runs] for name, runs in results.items()}
        ratios = [pool / alone for alone, pool in zip(rates[one.name], rates[four.name], strict=True)]
        print(
            f"| median | {statistics.median(rates[one.name]):.2f} | {statistics.median(rates[four.name]):.2f} "
            f"| {spread(ratios)} | | | |"
        )
        runs = [run for runs in results.values() for run in runs]
        print(
            f"\nMost generating at once on any pod in any run: {max(max(run.most_generating) for run in runs)}; "
            f"generations answered {sum(run.answered for run in runs)}, served by the pods "
            f"{sum(sum(run.served) for run in runs)}."
        )
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait()


# -- 8. the fair queue on an idle pool ---------------------------------------------

IDLE_SLOTS = 64  # more than scenario_small's 50 connections: a slot is always free, nothing waits
PROMPT = "Why is the sky blue?"
GENERATIONS = {  # a title's words for each, and what it sends (GET-converted to POST /api/generate)
    "one JSON answer": json.dumps({"model": "llama3.2", "prompt": PROMPT, "stream": False}).encode(),
    "streamed, 11 NDJSON lines": json.dumps({"model": "llama3.2", "prompt": PROMPT}).encode(),
}


def print_pairs(pairs: list[tuple[dict, dict]]) -> None:
    """Scenario 8's table: each run's CPU per request without and with the queue, and their ratio."""
    print(
        "| run | no queue: CPU per request (µs) | queue: CPU per request (µs) | queue / no queue "
        "| requests/s, no queue / queue | other load (cores), no queue / queue |"
    )
    print("|---|---|---|---|---|---|")
    for number, (alone, through) in enumerate(pairs, 1):
        print(
            f"| {number} | {alone['cpu_us_per_request']:.1f} | {through['cpu_us_per_request']:.1f} "
            f"| {through['cpu_us_per_request'] / alone['cpu_us_per_request']:.3f}x "
            f"| {alone['requests_per_s']:.0f} / {through['requests_per_s']:.0f} "
            f"| {alone['others']:.2f} / {through['others']:.2f} |"
        )
    medians = [
        {metric: statistics.median(pair[side][metric] for pair in pairs) for metric in pairs[0][side]}
        for side in (0, 1)
    ]
    ratios = [through["cpu_us_per_request"] / alone["cpu_us_per_request"] for alone, through in pairs]
    print(
        f"| median (min to max) | {medians[0]['cpu_us_per_request']:.1f} "
        f"| {medians[1]['cpu_us_per_request']:.1f} | {spread(ratios)} "
        f"| {medians[0]['requests_per_s']:.0f} / {medians[1]['requests_per_s']:.0f} | |"
    )


async def scenario_idle_queue(seconds: float, repeats: int) -> None:
    """The proxy whose pod has `slots`, so that every generation goes through the fair queue,
    against the same proxy whose pod has none, in interleaved runs, on a pod that answers at
    once and a pool never full: the queue should cost less than 5 % more CPU per request."""
    upstream_port, plain_port, queued_port = (free_port() for _ in range(3))
    processes = [
        start_server("upstream.py", upstream_port, "0"),
        plain_process := start_proxy(plain_port, pods_of([upstream_port], None)),
        queued_process := start_proxy(queued_port, pods_of([upstream_port], IDLE_SLOTS)),
    ]
    own = [process.pid for process in processes]
    try:
        for port in (plain_port, queued_port):
            await wait_for_pool(port)
        plain = Target("no queue", plain_port, plain_process.pid, corrects=True)
        queued = Target("queue", queued_port, queued_process.pid, corrects=True)

        async def measure(target: Target, body: bytes) -> dict:
            others = outside(own)
            return {**await scenario_small(target, "/api/generate", "POST", seconds, body), "others": others()}

        for words, body in GENERATIONS.items():
            title = (
                f"/api/generate, {words}, 50 connections, one pod answering at once: "
                f"its slots {IDLE_SLOTS} (queue) against not set (no queue)"
            )
            others = outside(own)
            results = await interleaved([plain, queued], repeats, lambda t, b=body: measure(t, b))
            print(f"\n## 8. the fair queue on an idle pool: {title}\n")
            print_pairs(list(zip(results[plain.name], results[queued.name], strict=True)))
            print(f"\nOther load meanwhile: {others():.2f} cores.")
            # The same, both proxies loaded at once in each run: what the machine does
            # meanwhile (other load, its clock's speed) weighs on both alike.
            others = outside(own)
            pairs = [await asyncio.gather(measure(plain, body), measure(queued, body)) for _ in range(repeats)]
            print(f"\n## 8. side by side, each run loading both at once: {title}\n")
            print_pairs([(alone, through) for alone, through in pairs])
            print(f"\nOther load meanwhile: {others():.2f} cores.")
        waits = {
            (sample.name, sample.labels.get("le")): sample.value
            for family in text_string_to_metric_families((await get(queued_port, "/_proxy/metrics"))[1].decode())
            for sample in family.samples
        }
        print(
            f"\nThe queue admitted {waits['ollama_proxy_queue_wait_seconds_count', None]:.0f} generations, "
            f"{waits['ollama_proxy_queue_wait_seconds_bucket', '0.001']:.0f} of them within 1 ms "
            "(its `queue_wait_seconds`)."
        )
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller bulk transfers")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per target, wrk pairs (at least 3; 5 or more with --baseline)"
    )
    parser.add_argument(
        "--only", default="1,2,3,4,5,6,7,8", help="comma-separated scenario numbers to run (default: all)"
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="a git revision of this repository to run too, as the target 'baseline', in scenarios 1 and 2",
    )
    args = parser.parse_args()
    with worktree(args.baseline) as source:
        await suite(args, source)


async def suite(args: argparse.Namespace, source: Path | None) -> None:
    only = set(args.only.split(","))
    seconds = 2.0 if args.quick else 5.0
    bulk = (256 if args.quick else 1024) * 1024 * 1024
    needed = ["nginx", *(["npm"] if "2" in only else []), *(["wrk"] if "6" in only else [])]
    missing = [command for command in needed if shutil.which(command) is None]
    if missing:
        sys.exit(f"bench needs {', '.join(missing)} (Debian packages of those names)")
    print(f"proxy: the package in {imported(None)}")
    if source:
        package = imported(source)
        assert package.is_relative_to(source), package  # else the baseline would be the proxy itself
        print(
            f"baseline: {args.baseline} ({git('rev-parse', '--short', 'HEAD', cwd=source)}), the package in {package}"
        )
    upstream_port, nginx_port, proxy_port, workers_port, floor_port, node_port, baseline_port = (
        free_port() for _ in range(7)
    )
    llhttp_port, relay_port = free_port(), free_port()
    processes = [
        upstream_process := start_server("upstream.py", upstream_port),
        floor := start_server("floor.py", floor_port),
        llhttp := start_server("llhttp_floor.py", llhttp_port),
        relay := start_server("relay_floor.py", relay_port, str(upstream_port)),
        nginx := start_nginx("nginx.conf", PORT=nginx_port, UPSTREAM=f"127.0.0.1:{upstream_port}", KEEPALIVE=64),
        proxy := start_proxy(proxy_port, upstream(upstream_port)),
        workers := start_proxy(workers_port, {**upstream(upstream_port), "OLLAMA_PROXY_WORKERS": "2"}),
    ]
    try:
        await wait_for_port(nginx_port)
        await wait_for_port(proxy_port)
        worker_pids = await wait_for_workers(workers_port, 2)
        own = [upstream_process.pid, floor.pid, llhttp.pid, relay.pid, nginx_worker(nginx), proxy.pid, *worker_pids]
        targets = [
            Target("direct", upstream_port, upstream_process.pid, corrects=False),
            Target("nginx", nginx_port, nginx_worker(nginx), corrects=True),
            proxy_target := Target("proxy", proxy_port, proxy.pid, corrects=True),
        ]
        # Scenarios 1 and 2 also run against the proxy with two worker processes, and the
        # baseline when given; scenario 1 also against uvloop passing bytes on (the relay
        # floor); scenario 2 against the seed's Node original and bare Tornado answering a
        # constant (the floor), on its own HTTP/1.1 server and on llhttp.
        with_workers = [*targets, Target("proxy x2", workers_port, workers.pid, corrects=True, workers=True)]
        if source:
            processes.append(baseline := start_proxy(baseline_port, upstream(upstream_port), source))
            await wait_for_port(baseline_port)
            with_workers.append(Target("baseline", baseline_port, baseline.pid, corrects=True))
            own.append(baseline.pid)
        stream_targets = [*with_workers, Target("relay floor", relay_port, relay.pid, corrects=False)]
        small_targets = [
            *with_workers,
            Target("tornado floor", floor_port, floor.pid, corrects=False),
            Target("tornado web on llhttp", llhttp_port, llhttp.pid, corrects=False),
        ]
        if "2" in only:
            processes.append(node := start_node_original(node_port, upstream_port))
            await wait_for_port(node_port)
            small_targets.append(Target("node original", node_port, node.pid, corrects=True))
            own.append(node.pid)

        async def compare(title: str, targets: list[Target], repeats: int, run) -> None:
            others = outside(own)
            table(title, await interleaved(targets, repeats, run))
            print(f"\nOther load meanwhile: {others():.2f} cores.")

        print(
            f"# tornado-ollama-proxy benchmarks ({os.cpu_count()} cores, {'quick' if args.quick else 'full'} run, "
            f"medians of {args.repeats}; direct CPU is the stand-in upstream's own)"
        )
        for streams in (1, 100, 500) if "1" in only else ():
            await compare(
                f"1. token streams: {streams} x 50 chunks/s",
                stream_targets,
                args.repeats,
                lambda t, s=streams: scenario_streams(t, s, seconds),
            )
        for path, method in (("/api/tags", "GET"), ("/api/show", "POST")) if "2" in only else ():
            await compare(
                f"2. small requests: {path} ({method} upstream), 50 connections",
                small_targets,
                args.repeats,
                lambda t, p=path, m=method: scenario_small(t, p, m, seconds),
            )
            others = outside(own)
            references = [t for t in small_targets if t.name in ("tornado floor", "node original", "baseline")]
            print("\nLoaded at once with the proxy, each pair in turn: CPU per request, proxy / reference\n")
            print("| reference | each run's: median (min to max) |\n|---|---|")
            for reference in references:
                ratios = []
                for _ in range(args.repeats):
                    mine, theirs = await asyncio.gather(
                        scenario_small(proxy_target, path, method, seconds),
                        scenario_small(reference, path, method, seconds),
                    )
                    ratios.append(mine["cpu_us_per_request"] / theirs["cpu_us_per_request"])
                print(f"| {reference.name} | {spread(ratios)} |")
            print(f"\nOther load meanwhile: {others():.2f} cores.")
        if "3" in only:
            await compare(
                f"3a. bulk upload of {bulk >> 20} MiB to /api/blobs",
                targets,
                args.repeats,
                lambda t: scenario_upload(t, bulk),
            )
            await compare(
                f"3b. bulk streamed download of {bulk >> 20} MiB",
                targets,
                args.repeats,
                lambda t: scenario_download(t, bulk),
            )
            print(f"\nproxy peak RSS after bulk transfers: {memory_kib(proxy.pid, 'VmHWM') / 1024:.1f} MB")
        if "4" in only:
            await compare(
                "4. 1,000 idle streams (one chunk per second): server RSS",
                targets[1:],
                1,
                lambda t: scenario_idle(t, 1000),
            )
        if "5" in only:
            times = [await startup_seconds(upstream_port) for _ in range(args.repeats)]
            print(f"\n## 5. start-up to first answered request\n\nproxy: median {statistics.median(times):.3f} s")
        if "6" in only:
            await scenario_workers(3.0 if args.quick else 8.0, max(3, args.repeats))
        if "7" in only:
            await scenario_pool(4.0 if args.quick else 10.0, args.repeats)
        if "8" in only:
            await scenario_idle_queue(seconds, args.repeats if args.quick else max(5, args.repeats))
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait()


if __name__ == "__main__":
    asyncio.run(main())
