import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tornado_ollama_proxy.cli import main


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


async def read_log(process, message):
    loop = asyncio.get_running_loop()
    while True:
        line = await asyncio.wait_for(loop.run_in_executor(None, process.stdout.readline), 30)
        assert line, process.stderr.read()
        record = json.loads(line)
        if record["message"] == message:
            return record


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
    assert listening["upstream"] == upstream_url
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
    env = {"PORT": "0", "OLLAMA_PROXY_HOST": "127.0.0.1", "OLLAMA_PROXY_UPSTREAM": upstream_url,
           "PROMETHEUS_MULTIPROC_DIR": str(folder)}
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
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    key = ("ollama_proxy_requests_total", (("method_out", "GET"), ("route", "/api/tags"), ("status", "200")))
    assert samples[key] == 2


async def test_two_proxy_processes_share_one_rate_limit_through_redis(launch, upstream_url, redis_server):
    env = {"PORT": "0", "OLLAMA_PROXY_HOST": "127.0.0.1", "OLLAMA_PROXY_UPSTREAM": upstream_url,
           "OLLAMA_PROXY_RATE_LIMIT": "3/minute", "OLLAMA_PROXY_RATE_LIMIT_STORAGE": redis_server.url}
    addresses = []
    for _ in range(2):
        process = launch(env)
        addresses.append((await read_log(process, "listening"))["address"])
    async with httpx.AsyncClient() as http:
        codes = [(await http.get(address + "/api/tags")).status_code for address in addresses * 2]
    assert codes == [200, 200, 200, 429]


async def test_workers_share_the_port_are_restarted_and_drain_on_sigterm(launch, upstream_url):
    env = {"PORT": "0", "OLLAMA_PROXY_HOST": "127.0.0.1", "OLLAMA_PROXY_UPSTREAM": upstream_url,
           "OLLAMA_PROXY_WORKERS": "2"}
    parent = launch(env)
    address = (await read_log(parent, "starting workers"))["address"]
    first, second = await read_log(parent, "listening"), await read_log(parent, "listening")
    assert first["pid"] != second["pid"] and parent.pid not in (first["pid"], second["pid"])
    async with httpx.AsyncClient() as http:
        for _ in range(20):
            assert (await http.get(address + "/api/tags")).status_code == 200
        text = (await http.get(address + "/_proxy/metrics")).text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    key = ("ollama_proxy_requests_total", (("method_out", "GET"), ("route", "/api/tags"), ("status", "200")))
    assert samples[key] == 20  # whichever worker answered, one scrape sees all

    os.kill(first["pid"], signal.SIGKILL)
    exited = await read_log(parent, "worker exited, restarting")
    assert (exited["pid"], exited["exit_code"]) == (first["pid"], -9)
    replacement = await read_log(parent, "listening")
    assert replacement["pid"] not in (first["pid"], second["pid"])
    async with httpx.AsyncClient() as http:
        assert (await http.get(address + "/api/tags")).status_code == 200

    parent.send_signal(signal.SIGTERM)
    await read_log(parent, "workers stopped")
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, parent.wait, 30) == 0
