import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tornado_ollama_proxy.cli import main

from .helpers import parse_metrics, read_log, value


def test_invalid_settings_exit_2_with_one_line_naming_the_key(tmp_path, capsys):
    path = tmp_path / "settings.json"
    path.write_text('{"idle_timeout": "soon"}')
    assert main(["--settings", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"tornado-ollama-proxy: {path}: idle_timeout: expected a number of seconds > 0, got 'soon'\n"


def test_invalid_flag_exits_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--upstream", "localhost:11434"]) == 2
    assert "--upstream: upstream: expected an http:// or https:// URL" in capsys.readouterr().err


def test_a_broken_plugin_exits_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("raise ImportError('needs numpy')\n")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"plugins_dir": "."}))
    assert main(["--settings", str(settings)]) == 2
    err = capsys.readouterr().err
    assert "broken.py failed to load: ImportError: needs numpy" in err
    assert "Traceback" not in err


def test_an_unavailable_event_loop_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OLLAMA_PROXY_EVENT_LOOP", "uvloop")
    assert main([]) == 2
    assert "event_loop: 'uvloop' needs the uvloop package" in capsys.readouterr().err


def test_python_dash_m_reports_bad_settings_without_a_traceback(tmp_path):
    (tmp_path / "settings.json").write_text('{"port": "http"}')
    result = subprocess.run(
        [sys.executable, "-m", "tornado_ollama_proxy"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "settings.json: port: expected a whole number from 0 to 65535" in result.stderr


def low_soft_file_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


async def test_console_script_serves_on_paas_port_and_drains_on_sigterm(launch, upstream_url):
    env = {"PORT": "0", "OLLAMA_PROXY_HOST": "127.0.0.1", "OLLAMA_PROXY_UPSTREAM": upstream_url}
    process = launch(env, preexec_fn=low_soft_file_limit)
    starting = await read_log(process, "starting")
    assert "tornado_ollama_proxy.default_plugins.ollama_routes" in starting["plugins"]
    limit = await read_log(process, "open files limit")
    assert limit["max_open_files"] == resource.getrlimit(resource.RLIMIT_NOFILE)[1] > 256
    listening = await read_log(process, "listening")
    assert listening["upstreams"] == ["default"]  # by name: a URL may hold a secret
    async with httpx.AsyncClient() as http:
        response = await http.request("GET", listening["address"] + "/api/show", json={"model": "llama3.2"})
    assert response.status_code == 200
    process.send_signal(signal.SIGTERM)
    await read_log(process, "stopped")
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, process.wait, 30) == 0


async def test_metrics_add_up_across_processes_in_multiprocess_mode(launch, upstream_url, tmp_path):
    """Two workers writing to one PROMETHEUS_MULTIPROC_DIR: a scrape of either sees both."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
    }
    addresses = []
    for event_loop in ("auto", "asyncio"):  # one on uvloop, one on asyncio's own loop
        process = launch({**env, "OLLAMA_PROXY_EVENT_LOOP": event_loop})
        starting = await read_log(process, "starting")
        assert starting["event_loop"] == ("uvloop" if event_loop == "auto" else "asyncio")
        addresses.append((await read_log(process, "listening"))["address"])
    async with httpx.AsyncClient() as http:
        for address in addresses:
            await http.get(address + "/api/tags")
        text = (await http.get(addresses[0] + "/_proxy/metrics")).text
    samples = parse_metrics(text)
    assert value(samples, "ollama_proxy_requests_total", method_out="GET", route="/api/tags", status="200") == 2


async def test_two_proxy_processes_share_one_rate_limit_through_redis(launch, upstream_url, redis_server):
    env = {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "OLLAMA_PROXY_RATE_LIMIT": "3/minute",
        "OLLAMA_PROXY_RATE_LIMIT_STORAGE": redis_server.url,
    }
    addresses = []
    for _ in range(2):
        process = launch(env)
        addresses.append((await read_log(process, "listening"))["address"])
    async with httpx.AsyncClient() as http:
        codes = [(await http.get(address + "/api/tags")).status_code for address in addresses * 2]
    assert codes == [200, 200, 200, 429]


def few_file_descriptors():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


async def test_running_out_of_descriptors_pauses_accepting_instead_of_spinning(launch, upstream_url, loop_name):
    env = {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "OLLAMA_PROXY_EVENT_LOOP": loop_name,  # the proxy on the loop this run of the test is on
    }
    process = launch(env, preexec_fn=few_file_descriptors)
    address = (await read_log(process, "listening"))["address"]
    idle = [await asyncio.open_connection(*address.removeprefix("http://").split(":")) for _ in range(80)]
    paused = await read_log(process, "cannot accept connections, pausing")
    assert (paused["level"], paused["reason"], paused["pause_s"]) == ("WARNING", "Too many open files", 0.5)
    before = cpu_seconds(process.pid)
    await asyncio.sleep(1.5)  # three pauses' worth: a spinning accept loop would burn this whole second
    assert cpu_seconds(process.pid) - before < 0.5
    for _, writer in idle:
        writer.close()
    async with httpx.AsyncClient() as http:  # served again once descriptors are free
        response = await http.get(address + "/api/version", timeout=10)
    assert response.status_code == 200
    process.send_signal(signal.SIGTERM)
    rest = [json.loads(line) for line in process.stdout.read().splitlines()]
    assert [r["message"] for r in rest].count("cannot accept connections, pausing") == 0  # once per minute, not per try
    assert not [r for r in rest if r["level"] == "ERROR"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_incompatible_tornado_stops_start_up_with_one_line(monkeypatch, capsys, tmp_path):
    from tornado_ollama_proxy import tornado_private

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tornado_private, "MISSING", ["HTTP1Connection._format_chunk"])
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "lacks HTTP1Connection._format_chunk, which this proxy relies on" in err
