"""What start-up tells a person: the addresses to use, a first look at each upstream
(bounded: serving never waits for it), the status page, the access keys."""

import io
import socket

import pytest

from tornado_ollama_proxy import __version__
from tornado_ollama_proxy.auth import parse_entries
from tornado_ollama_proxy.default_plugins import json_logs
from tornado_ollama_proxy.startup import Look, addresses, announce, local_addresses, look_at, summary

READY = f"tornado-ollama-proxy {__version__} is ready"


@pytest.mark.parametrize(
    "host, environ, local, expected",
    [
        ("127.0.0.1", {}, ["10.0.0.5"], ["http://127.0.0.1:8000"]),
        (
            "0.0.0.0",
            {},
            ["10.0.0.5", "fd00::5"],
            ["http://127.0.0.1:8000", "http://10.0.0.5:8000", "http://[fd00::5]:8000"],
        ),
        ("", {}, [], ["http://127.0.0.1:8000"]),
        ("::", {}, [], ["http://[::1]:8000"]),
        ("::1", {}, [], ["http://[::1]:8000"]),
        ("10.0.0.5", {"RUNPOD_POD_ID": ""}, [], ["http://10.0.0.5:8000"]),
        (
            "0.0.0.0",
            {"RUNPOD_POD_ID": "abc123xyz"},
            ["10.0.0.5"],
            ["https://abc123xyz-8000.proxy.runpod.net", "http://127.0.0.1:8000", "http://10.0.0.5:8000"],
        ),
    ],
)
def test_the_address_to_use_comes_first(host, environ, local, expected):
    assert addresses(host, 8000, environ, local) == expected


def test_this_machines_own_addresses_leave_out_loopback(monkeypatch):
    found = local_addresses()
    assert all(not address.startswith(("127.", "::1")) for address in found)
    assert len(found) == len(set(found))
    resolved = [("127.0.1.1", 0), ("10.0.4.7", 0), ("10.0.4.7", 0), ("fe80::1%eth0", 0, 0, 2), ("::1", 0, 0, 0)]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *_, **__: [(None, None, None, "", at) for at in resolved])
    assert local_addresses() == ["10.0.4.7", "fe80::1%eth0"]

    def unresolvable(*_, **__):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    assert local_addresses() == []


def test_a_look_says_what_it_found_in_a_few_words():
    assert Look("a", "h:1", "0.12.1", ("llama3.2:latest", "qwen:7b")).said() == "Ollama 0.12.1, 2 models"
    assert Look("a", "h:1", "0.12.1", None).said() == "Ollama 0.12.1, its models unread"
    refused = Look("a", "h:1", failure="upstream 'a' refused the connection")
    assert refused.said() == "upstream 'a' refused the connection — is Ollama running at h:1?"
    assert not refused.reachable


async def test_an_upstream_that_is_not_ollama_is_said_to_be_so(servers, make_proxy):
    from tornado.web import Application

    nothing = servers.start(Application([]))  # 404 to everything
    proxy = make_proxy(upstream=nothing)
    [look] = await look_at(proxy.proxy.pool, 2)
    assert (look.reachable, look.failure) == (False, "upstream 'default' answered 404")


async def test_the_first_look_is_bounded_by_its_own_time(make_proxy):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        proxy = make_proxy(upstream="http://" + address)
        [look] = await look_at(proxy.proxy.pool, 0.2)
    assert look == Look("default", address, failure="upstream 'default' did not answer within 0.2 s")


async def test_the_summary_names_every_upstream_and_warns_of_each_unreachable_one(pods, make_proxy, log_lines, fake):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    [pod] = pods(1)
    proxy = make_proxy(
        upstreams=[{"name": "gpu", "url": pod.url}, {"name": "off", "url": f"http://127.0.0.1:{closed}"}]
    )
    await announce(proxy.proxy, 8123, "uvloop", {})
    lines = log_lines()
    [warning] = [line for line in lines if line["level"] == "WARNING"]
    assert warning["message"] == f"upstream 'off' refused the connection — is Ollama running at 127.0.0.1:{closed}?"
    assert warning["upstream"] == "off"
    [ready] = [line for line in lines if line["message"] == READY]
    assert "lines" not in ready  # the readable lines are for terminals
    assert (ready["address"], ready["status_page"], ready["access_keys"]) == (
        "http://127.0.0.1:8123",
        "http://127.0.0.1:8123/_proxy/",
        "off",
    )
    gpu = {"name": "gpu", "address": pod.url.removeprefix("http://"), "reachable": True, "version": "0.32.0"}
    off = {"name": "off", "address": f"127.0.0.1:{closed}", "reachable": False}
    assert ready["upstreams"] == [
        {**gpu, "models": len(pod.state.models)},
        {**off, "failure": "upstream 'off' refused the connection"},
    ]
    assert (ready["workers"], ready["event_loop"], ready["key_file"]) == (1, "uvloop", None)


async def test_the_summary_as_readable_lines(make_proxy, upstream_url, tmp_path):
    keys = parse_entries([{"name": "alice", "key": "a" * 43}, {"name": "bob", "key": "b" * 43}])
    proxy = make_proxy(api_keys=keys, status_path=None)
    looks = await look_at(proxy.proxy.pool, 2)
    fields, lines = summary(proxy.proxy, looks, ["http://127.0.0.1:8000", "http://10.0.0.5:8000"], "asyncio")
    assert (fields["access_keys"], fields["status_page"]) == ("on", None)
    assert lines == [
        "Address:      http://127.0.0.1:8000  (also http://10.0.0.5:8000)",
        f"Upstream:     default at {upstream_url.removeprefix('http://')}: {looks[0].said()}",
        "Access keys:  on, 2 keys: alice, bob",
        "Workers:      1, event loop asyncio",
    ]
    generated = make_proxy(host="0.0.0.0", generated_key_file=str(tmp_path / "key"))
    fields, lines = summary(generated.proxy, looks, ["http://127.0.0.1:8000"], "asyncio")
    assert (fields["access_keys"], fields["key_file"]) == ("generated", str(tmp_path / "key"))
    assert f"Access keys:  on, one generated key (kept in {tmp_path / 'key'})" in lines
    one = make_proxy(api_keys=parse_entries([{"name": "alice", "key": "a" * 43}]))
    assert "Access keys:  on, 1 key: alice" in summary(one.proxy, looks, ["http://x:1"], "asyncio")[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_readable_lines_on_a_terminal_json_elsewhere_and_colour_only_where_shown(monkeypatch):
    assert json_logs.readable("auto", Terminal()) and json_logs.readable("text", io.StringIO())
    assert not json_logs.readable("auto", io.StringIO()) and not json_logs.readable("json", Terminal())
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert json_logs.coloured(Terminal()) and not json_logs.coloured(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not json_logs.coloured(Terminal())
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not json_logs.coloured(Terminal())
