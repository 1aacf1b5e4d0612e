"""Closed by default: a proxy on a public address without keys makes one and requires it."""

import asyncio
import json
import os
import pty
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tornado_ollama_proxy import generated_key
from tornado_ollama_proxy.cli import main
from tornado_ollama_proxy.generated_key import GeneratedKeyError, default_path, load_or_create
from tornado_ollama_proxy.settings import Settings, SettingsError, load_settings

from .helpers import read_log

PUBLIC = {"PORT": "0", "OLLAMA_PROXY_HOST": "0.0.0.0"}
REQUIRED = "access key required: none is configured and this address is public, so a generated key is used"


# -- the key file ---------------------------------------------------------------------------


def test_a_key_is_made_once_for_its_user_alone_and_kept(tmp_path):
    path = tmp_path / "state" / "tornado-ollama-proxy" / "key"
    made = load_or_create(path)
    assert made.created and len(made.key) == 43  # 256 bits, url-safe
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == made.key + "\n"
    again = load_or_create(path)
    assert (again.key, again.created) == (made.key, False)
    assert made.key not in repr(made)


def test_processes_starting_at_once_agree_on_one_key(tmp_path):
    path = tmp_path / "key"
    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(lambda _: load_or_create(path), range(64)))
    assert len({generated.key for generated in made}) == 1
    assert sum(generated.created for generated in made) == 1
    assert [child.name for child in tmp_path.iterdir()] == ["key"]  # nothing left aside


def test_the_default_place_follows_xdg_state_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_path() == tmp_path / "tornado-ollama-proxy" / "key"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_path() == Path.home() / ".local" / "state" / "tornado-ollama-proxy" / "key"


def test_a_place_that_cannot_be_written_is_named():
    with pytest.raises(GeneratedKeyError, match=r"generated_key_file: /proc/nowhere/key cannot be created: "):
        load_or_create(Path("/proc/nowhere/key"))  # not even root makes folders there


def test_a_process_that_made_the_key_first_wins(tmp_path, monkeypatch):
    path = tmp_path / "key"
    path.write_text("made-by-the-other-process\n")
    path.chmod(0o600)
    real_read = generated_key._read
    calls = []

    def read_before_the_other_wrote(where):
        calls.append(where)
        if len(calls) == 1:
            raise FileNotFoundError  # as it was when this process looked
        return real_read(where)

    monkeypatch.setattr(generated_key, "_read", read_before_the_other_wrote)
    made = load_or_create(path)
    assert (made.key, made.created) == ("made-by-the-other-process", False)
    assert [child.name for child in tmp_path.iterdir()] == ["key"]


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "dir").write_text("a file where a folder should be")
    with pytest.raises(GeneratedKeyError, match="cannot be read: Not a directory; set generated_key_file"):
        load_or_create(tmp_path / "dir" / "key")


@pytest.mark.parametrize("content", [b"", b"  \n", b"two words\n", b"\xff\xfe"])
def test_a_key_file_without_one_key_is_refused(tmp_path, content):
    (tmp_path / "key").write_bytes(content)
    (tmp_path / "key").chmod(0o600)
    with pytest.raises(GeneratedKeyError, match=r"generated_key_file: .*key"):
        load_or_create(tmp_path / "key")


def test_a_key_file_must_be_this_users_own_file_that_others_cannot_read(tmp_path):
    chosen = tmp_path / "chosen"
    chosen.write_text("someone-elses-key\n")
    chosen.chmod(0o600)
    (tmp_path / "link").symlink_to(chosen)
    with pytest.raises(GeneratedKeyError, match="link is a symbolic link"):
        load_or_create(tmp_path / "link")
    shared = tmp_path / "shared"
    shared.write_text("guessme\n")
    shared.chmod(0o644)
    with pytest.raises(GeneratedKeyError, match=r"may be read or written by others \(mode 0644\): chmod 600 it"):
        load_or_create(shared)


def test_a_key_file_of_another_user_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "key"
    load_or_create(path)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(path).st_uid + 1)
    with pytest.raises(GeneratedKeyError, match="belongs to another user"):
        load_or_create(path)


# -- settings -------------------------------------------------------------------------------


def test_open_is_a_flag():
    with pytest.raises(SettingsError, match="OLLAMA_PROXY_OPEN: open: expected true or false"):
        load_settings(None, environ={"OLLAMA_PROXY_OPEN": "yes"})


def test_open_goes_with_no_keys(tmp_path):
    assert load_settings(None, environ={"OLLAMA_PROXY_OPEN": "1"}).open
    assert not Settings(open=True).public
    assert not Settings(host="127.0.0.1").public and Settings().public
    with pytest.raises(SettingsError, match="open: true opens the proxy to anyone, and cannot go with api_keys"):
        load_settings(None, environ={"OLLAMA_PROXY_OPEN": "true", "OLLAMA_PROXY_API_KEYS": "k" * 43})


def test_open_with_keys_stops_start_up_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.json").write_text(json.dumps({"open": True, "api_keys_file": "keys.txt"}))
    assert main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_key_file_that_cannot_be_made_stops_start_up_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "occupied").write_text("")
    monkeypatch.setenv("OLLAMA_PROXY_GENERATED_KEY_FILE", str(tmp_path / "occupied" / "key"))
    monkeypatch.setenv("OLLAMA_PROXY_PLUGINS_DIR", str(tmp_path))
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read: Not a directory" in err


# -- a public proxy, started as users start it ----------------------------------------------


async def test_a_public_proxy_without_keys_requires_the_key_it_made(launch, upstream_url, state_home):
    first = launch({**PUBLIC, "OLLAMA_PROXY_UPSTREAM": upstream_url})
    warning = await read_log(first, REQUIRED)
    key_file = state_home / "tornado-ollama-proxy" / "key"
    assert (warning["level"], warning["key_file"], warning["made_now"]) == ("WARNING", str(key_file), True)
    key = key_file.read_text().strip()
    address = (await read_log(first, "listening"))["address"].replace("0.0.0.0", "127.0.0.1")
    async with httpx.AsyncClient() as http:
        assert (await http.get(address + "/api/tags")).status_code == 401
        assert (await http.get(address + "/api/tags", headers={"Authorization": f"Bearer {key}"})).status_code == 200
    first.terminate()
    output = first.stdout.read() + first.stderr.read()
    assert key not in output  # piped, as on a PaaS: the key is never written to a log
    await asyncio.get_running_loop().run_in_executor(None, first.wait, 30)
    again = launch({**PUBLIC, "OLLAMA_PROXY_UPSTREAM": upstream_url})
    assert (await read_log(again, REQUIRED))["made_now"] is False  # reused
    assert key_file.read_text().strip() == key
    await read_log(again, "listening")


async def test_with_workers_the_parent_makes_the_key_and_says_so_once(launch, upstream_url, state_home):
    parent = launch({**PUBLIC, "OLLAMA_PROXY_UPSTREAM": upstream_url, "OLLAMA_PROXY_WORKERS": "2"})
    await read_log(parent, REQUIRED)
    address = (await read_log(parent, "starting workers"))["address"].replace("0.0.0.0", "127.0.0.1")
    for _ in range(2):
        await read_log(parent, "listening")
    key = (state_home / "tornado-ollama-proxy" / "key").read_text().strip()
    async with httpx.AsyncClient() as http:
        for _ in range(8):  # whichever worker answers, it wants the parent's key
            connection = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"})
            assert (await connection.get(address + "/api/tags")).status_code == 200
            await connection.aclose()
        assert (await http.get(address + "/api/tags")).status_code == 401
    parent.terminate()
    output = parent.stdout.read()
    await asyncio.get_running_loop().run_in_executor(None, parent.wait, 30)
    assert output.count(REQUIRED) == 0  # read already: the rest holds no other


def test_on_a_terminal_the_key_is_shown_once_with_how_to_use_it(upstream_url, state_home):
    """Run under a pseudo-terminal, as a person runs the README's first command."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("tornado-ollama-proxy"))],
        env={**os.environ, **PUBLIC, "OLLAMA_PROXY_UPSTREAM": upstream_url, "XDG_STATE_HOME": str(state_home)},
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        cwd=state_home.parent,
    )
    os.close(terminal)
    seen = b""
    try:
        while b"Workers:" not in seen:  # the start-up summary's last line
            chunk = os.read(controller, 65536)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
    finally:
        process.terminate()
        process.wait(30)
        os.close(controller)
    path = state_home / "tornado-ollama-proxy" / "key"
    key = path.read_text().strip()
    text = seen.decode()
    assert text.count(key) == 3  # the key, the Python client's variable, the header
    assert f"OLLAMA_API_KEY={key}" in text and f"Authorization: Bearer {key}" in text
    assert f"Access keys:  on, one generated key (kept in {path})" in text  # never the key in a log line


async def test_an_open_proxy_reached_through_another_proxy_says_so_once(make_proxy, http, log_lines):
    proxy = make_proxy()  # on loopback: open
    await http.get(proxy + "/api/version")
    for header in ("X-Forwarded-For", "Forwarded", "CF-Connecting-IP"):
        assert (await http.get(proxy + "/api/version", headers={header: "203.0.113.7"})).status_code == 200
    warnings = [line for line in log_lines() if line["level"] == "WARNING"]
    assert [(line["message"], line["header"]) for line in warnings] == [
        (
            "no access keys, and requests arrive through another proxy: whoever reaches that one can use this one",
            "X-Forwarded-For",
        )
    ]


async def test_a_key_file_of_comments_only_leaves_no_public_proxy_open(launch, upstream_url, tmp_path):
    (tmp_path / "keys.txt").write_text("# everyone's keys, commented out for now\n# alice:k1\n")
    process = launch(
        {**PUBLIC, "OLLAMA_PROXY_UPSTREAM": upstream_url, "OLLAMA_PROXY_API_KEYS_FILE": str(tmp_path / "keys.txt")}
    )
    await read_log(process, REQUIRED)
    address = (await read_log(process, "listening"))["address"].replace("0.0.0.0", "127.0.0.1")
    async with httpx.AsyncClient() as http:
        assert (await http.get(address + "/api/tags")).status_code == 401
