import asyncio
import importlib.util
import json
import os
import pty
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tornado_ollama_proxy import __version__
from tornado_ollama_proxy.cli import main

from .helpers import parse_metrics, read_log, read_logs, value


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
    env = {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "OLLAMA_PROXY_LOG_LEVEL": "debug",  # the full settings and the files limit are details
    }
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
        "OLLAMA_PROXY_LOG_LEVEL": "debug",
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


@pytest.mark.parametrize("command", [[], ["check"]], ids=["serve", "check"])
def test_an_incompatible_tornado_stops_start_up_with_one_line(monkeypatch, capsys, tmp_path, command):
    from tornado_ollama_proxy import tornado_private

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tornado_private, "MISSING", ["HTTP1Connection._format_chunk"])
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "lacks HTTP1Connection._format_chunk, which this proxy relies on" in err


def test_version_prints_the_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"tornado-ollama-proxy {__version__}\n"


def run_check(tmp_path, *args, **env):
    """`tornado-ollama-proxy check`, as a deploy script runs it: its exit code and output."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("tornado-ollama-proxy")), "check", *args],
        cwd=tmp_path,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stdout, result.stderr


async def test_check_exits_0_when_an_upstream_answers_and_says_what_would_be_served(tmp_path, pods):
    (a, url), _ = pods(2)
    loop = asyncio.get_running_loop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "host": "0.0.0.0",
                "port": 8123,
                "upstreams": [{"name": "gpu", "url": url}, {"name": "off", "url": closed}],
                "rate_limit": "120/minute",
            }
        )
    )
    code, out, _ = await loop.run_in_executor(None, run_check, tmp_path, "--settings", str(settings))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"tornado-ollama-proxy {__version__}: the settings are valid"
    assert "Address:      http://127.0.0.1:8123" in lines
    assert any(line.startswith("Routes:       34: /, /api/version,") for line in lines)
    models = ", ".join(sorted(f"{model}:latest" for model in a.models))
    assert (
        f"Upstream:     gpu at {url.removeprefix('http://')}: Ollama 0.32.0, {len(a.models)} models: {models}" in lines
    )
    host = closed.removeprefix("http://")
    assert f"Upstream:     off at {host}: upstream 'off' refused the connection — is Ollama running at {host}?" in lines
    key = tmp_path / "state" / "tornado-ollama-proxy" / "key"
    assert f"Access keys:  on, one generated key (to be made at the first start in {key})" in lines
    assert not key.exists()  # check makes nothing
    assert "Limits:       rate_limit 120/minute" in lines and lines[-1] == "Upstreams:    1 of 2 answer"


def test_check_exits_1_when_no_upstream_answers_and_2_on_a_settings_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("OLLAMA_PROXY_HOST", "127.0.0.1")
    monkeypatch.setenv("OLLAMA_PROXY_PORT", "0")
    assert main(["check", "--upstream", closed]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "Address:      127.0.0.1, on a free port picked at start" in lines
    assert "Access keys:  off: anyone who can reach the port can use it" in lines
    assert "Limits:       none" in lines and lines[-1] == "Upstreams:    0 of 1 answer"
    (tmp_path / "settings.json").write_text('{"pool_retries": -1}')
    assert main(["check"]) == 2
    assert capsys.readouterr() == (
        "",
        "tornado-ollama-proxy: settings.json: pool_retries: expected a whole number >= 0 "
        "(0: never move a request to another pod), got -1\n",
    )
    (tmp_path / "settings.json").write_text(json.dumps({"api_keys_file": str(tmp_path / "keys")}))
    (tmp_path / "keys").write_text("alice only-a-name-and-no-key=\n")
    assert main(["check"]) == 2
    assert "api_keys_file: " in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # check makes nothing


def test_check_names_the_keys_and_never_a_key():
    from tornado_ollama_proxy.auth import parse_entries
    from tornado_ollama_proxy.check import access_keys
    from tornado_ollama_proxy.settings import Settings

    keys = parse_entries([{"name": "alice", "key": "a" * 43}, {"name": "bob", "key": "b" * 43}])
    assert access_keys(Settings(api_keys=keys)) == "on, 2 keys: alice, bob"
    one = access_keys(Settings(api_keys=keys[:1]))
    assert one == "on, 1 key: alice" and "a" * 43 not in one


async def test_on_a_terminal_the_first_run_is_readable_lines_with_the_summary(tmp_path, upstream_url, fake):
    primary, secondary = pty.openpty()
    env = {
        **os.environ,
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "TERM": "xterm-256color",
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("tornado-ollama-proxy"))],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    loop = asyncio.get_running_loop()
    text = ""
    try:
        while "Workers:" not in text:
            chunk = await asyncio.wait_for(loop.run_in_executor(None, os.read, primary, 65536), 30)
            assert chunk, text
            text += chunk.decode()
    finally:
        process.send_signal(signal.SIGTERM)
        await loop.run_in_executor(None, process.wait, 30)
        os.close(primary)
    lines = text.replace("\r\n", "\n").splitlines()
    assert not any(line.startswith("{") for line in lines)  # not JSON
    [ready] = [n for n, line in enumerate(lines) if line.endswith(f"tornado-ollama-proxy {__version__} is ready")]
    assert "\x1b[32mINFO\x1b[0m" in lines[ready]  # coloured, for a terminal that shows it
    address = next(line.split()[1] for line in lines[ready + 1 :] if line.strip().startswith("Address:"))
    assert lines[ready + 1 :] == [
        f"    Address:      {address}",
        f"    Status page:  {address}/_proxy/",
        f"    Upstream:     default at {upstream_url[7:]}: Ollama 0.32.0, {len(fake.models)} models",
        "    Access keys:  off: anyone who can reach the port can use it",
        f"    Workers:      1, event loop {'uvloop' if importlib.util.find_spec('uvloop') else 'asyncio'}",
    ]
    assert sum("listening" in line and "address=http://127.0.0.1:" in line for line in lines) == 1


async def test_piped_every_line_is_json_and_a_missing_ollama_is_a_warning_that_says_so(launch, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{probe.getsockname()[1]}"
    env = {"PORT": "0", "OLLAMA_PROXY_HOST": "127.0.0.1", "OLLAMA_PROXY_UPSTREAM": "http://" + host}
    process = launch(env)
    records = await read_logs(process, f"tornado-ollama-proxy {__version__} is ready")  # each line parsed
    [warning] = [record for record in records if record["level"] == "WARNING"]
    assert warning["message"] == f"upstream 'default' refused the connection — is Ollama running at {host}?"
    assert not any(record["message"] in ("starting", "open files limit") for record in records)  # DEBUG now
    async with httpx.AsyncClient() as http:  # serving all along
        answer = await http.get(records[-1]["address"] + "/api/tags")
    assert answer.status_code == 502
    process.send_signal(signal.SIGTERM)
    await read_log(process, "stopped")
