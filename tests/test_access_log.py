"""The access records and request ids, read back as the JSON lines an operator sees."""

import asyncio
import json
import logging

import httpx
import pytest

from .helpers import CannedUpstream, open_raw, unused_url

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "a private prompt"}]}


def access(lines):
    return [line for line in lines if line["name"] == "tornado_ollama_proxy.access"]


async def test_a_plain_request_gets_one_record(proxy_url, http, log_lines):
    response = await http.get(proxy_url + "/api/tags")
    [record] = access(log_lines())
    assert record["level"] == "INFO" and record["message"] == "request"
    assert record["request_id"] == response.headers["x-request-id"]
    assert record["client"] == "127.0.0.1"
    assert (record["method_in"], record["method_out"]) == ("GET", "GET")
    assert (record["path"], record["route"]) == ("/api/tags", "/api/tags")
    assert (record["upstream_status"], record["status"], record["outcome"]) == (200, 200, "ok")
    assert record["bytes_in"] == 0 and record["bytes_out"] == len(response.content)
    assert 0 < record["ttfb_ms"] <= record["duration_ms"]
    assert record["chunks"] >= 1
    assert "headers" not in record


async def test_a_corrected_streamed_chat_shows_get_became_post(proxy_url, http, log_lines):
    body = json.dumps(CHAT).encode()
    response = await http.request("GET", proxy_url + "/api/chat", content=body)
    [record] = access(log_lines())
    assert (record["method_in"], record["method_out"], record["route"]) == ("GET", "POST", "/api/chat")
    assert record["bytes_in"] == len(body) and record["bytes_out"] == len(response.content)
    assert record["chunks"] >= 1 and record["outcome"] == "ok"
    assert "private prompt" not in json.dumps(log_lines())  # bodies are never logged


async def test_an_aborted_stream_is_client_gone(proxy_url, fake, log_lines):
    reader, writer = await open_raw(proxy_url)
    body = json.dumps({**CHAT, "model": "stall"}).encode()
    writer.write(
        b"GET /api/chat HTTP/1.1\r\nHost: x\r\nX-Request-ID: mine-1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    await reader.readuntil(b'"done": false}\n')
    writer.close()
    await asyncio.wait_for(fake.disconnected.get(), 2)
    [record] = access(log_lines())
    assert (record["request_id"], record["outcome"], record["status"]) == ("mine-1", "client_gone", 200)
    assert record["bytes_out"] > 0


async def test_an_upstream_failure_is_upstream_error_with_a_warning_free_record(make_proxy, http, log_lines):
    proxy = make_proxy(upstream=unused_url())
    await http.get(proxy + "/api/tags")
    [record] = access(log_lines())
    assert (record["status"], record["upstream_status"], record["outcome"]) == (502, None, "upstream_error")


async def test_an_idle_upstream_is_a_timeout(make_proxy, http, log_lines):
    proxy = make_proxy(idle_timeout=0.2)
    await http.request("GET", proxy + "/api/chat", json={**CHAT, "model": "silent"})
    [record] = access(log_lines())
    assert (record["status"], record["outcome"]) == (504, "timeout")


async def test_an_idle_upstream_mid_stream_is_a_timeout_too(make_proxy, http, log_lines):
    proxy = make_proxy(idle_timeout=0.2)
    with pytest.raises(httpx.RemoteProtocolError):
        await http.request("GET", proxy + "/api/chat", json={**CHAT, "model": "stall"})
    [record] = access(log_lines())
    assert (record["status"], record["outcome"]) == (200, "timeout")


async def test_a_refused_request_is_rejected(proxy_url, http, log_lines):
    await http.get(proxy_url + "/api/chat")
    [record] = access(log_lines())
    assert (record["status"], record["outcome"], record["method_out"]) == (400, "rejected", None)


async def test_request_id_goes_upstream_and_back_and_tags_every_line(proxy_url, fake, http, log_lines):
    response = await http.get(proxy_url + "/api/tags", headers={"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    assert fake.seen[0].headers["X-Request-Id"] == "trace-42"
    logging.getLogger("tornado_ollama_proxy.test").info("outside any request")
    ours = [line for line in log_lines() if line["name"].startswith("tornado_ollama_proxy")]
    assert [line["request_id"] for line in ours] == ["trace-42", None]


async def test_an_insane_request_id_is_replaced(proxy_url, fake, http):
    response = await http.get(proxy_url + "/api/tags", headers={"X-Request-ID": "x" * 500})
    assert len(response.headers["x-request-id"]) == 32
    assert fake.seen[0].headers["X-Request-Id"] == response.headers["x-request-id"]


async def test_proxy_errors_carry_the_request_id(proxy_url, http):
    response = await http.get(proxy_url + "/_proxy/nothing", headers={"X-Request-ID": "e-1"})
    assert response.headers["x-request-id"] == "e-1"


async def test_log_lines_written_deep_in_the_upstream_fetch_carry_the_id(make_proxy, http, log_lines):
    # Both requests go over one kept-alive upstream connection: the line about
    # the second answer carries the second request's id, not the first's.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    canned = CannedUpstream(ok, b"SPDY/9 banana\r\n\r\n")
    proxy = make_proxy(upstream=await canned.start())
    assert (await http.get(proxy + "/api/tags", headers={"X-Request-ID": "deep-1"})).status_code == 200
    assert (await http.get(proxy + "/api/tags", headers={"X-Request-ID": "deep-2"})).status_code == 502
    await canned.stop()
    assert len(canned.requests) == 2
    [line] = [line for line in log_lines() if line["name"] == "tornado_ollama_proxy.upstream"]
    assert "invalid HTTP/1.1 answer" in line["message"]
    assert line["request_id"] == "deep-2"


async def test_allow_listed_headers_are_logged_and_no_others(make_proxy, http, log_lines):
    proxy = make_proxy(log_headers=("User-Agent", "X-Absent"))
    await http.get(proxy + "/api/tags", headers={"User-Agent": "ollama-python/0.6", "Authorization": "Bearer s"})
    [record] = access(log_lines())
    assert record["headers"] == {"User-Agent": "ollama-python/0.6"}


async def test_health_probes_are_silent_by_default_and_can_be_sampled_in(make_proxy, http, log_lines):
    quiet = make_proxy()
    await http.get(quiet + "/_proxy/health")
    assert access(log_lines()) == []
    loud = make_proxy(access_log_sampling={})
    await http.get(loud + "/_proxy/health")
    [record] = access(log_lines())
    assert (record["route"], record["method_out"], record["status"]) == ("health", None, 200)


async def test_an_unknown_method_is_logged_as_rejected(proxy_url, log_lines):
    reader, writer = await open_raw(proxy_url)
    writer.write(b"BREW /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    [record] = access(log_lines())
    assert (record["method_in"], record["status"], record["outcome"]) == ("BREW", 405, "rejected")


async def test_a_rate_limited_request_is_logged_with_the_resolved_client(make_proxy, http, log_lines):
    proxy = make_proxy(rate_limit="1/minute", trusted_proxies=("127.0.0.1",))
    await http.get(proxy + "/api/tags", headers={"X-Forwarded-For": "203.0.113.9"})
    await http.get(proxy + "/api/tags", headers={"X-Forwarded-For": "203.0.113.9"})
    first, second = access(log_lines())
    assert (first["client"], first["outcome"]) == ("203.0.113.9", "ok")
    assert (second["client"], second["status"], second["outcome"]) == ("203.0.113.9", 429, "rate_limited")
    assert second["upstream_status"] is None


async def test_a_model_name_is_bounded_and_escaped_in_records(proxy_url, http, log_lines):
    for model in ("m" * 5000, "llama\nINFO forged line"):
        await http.post(proxy_url + "/api/generate", json={"model": model, "prompt": "x", "stream": False})
    long, forged = access(log_lines())
    assert long["model"] == "m" * 255 + "…"
    assert forged["model"] == "llama\\nINFO forged line"


async def test_headers_that_carry_credentials_are_masked_whatever_log_headers_says(make_proxy, http, log_lines):
    proxy = make_proxy(log_headers=("X-Team-Key", "Authorization", "User-Agent"), client_key_header="X-Team-Key")
    await http.get(
        proxy + "/api/tags", headers={"X-Team-Key": "secret-1", "Authorization": "Bearer s", "User-Agent": "u" * 2000}
    )
    [record] = access(log_lines())
    assert record["headers"] == {"X-Team-Key": "***", "Authorization": "***", "User-Agent": "u" * 1023 + "…"}


async def test_a_plugin_authenticators_credential_header_is_masked(servers, upstream_url, tmp_path, http, log_lines):
    from tornado_ollama_proxy import hookimpl
    from tornado_ollama_proxy.app import make_app
    from tornado_ollama_proxy.plugins import make_plugin_manager
    from tornado_ollama_proxy.settings import Settings

    class TeamToken:
        removed_headers = ("X-Team-Token",)

        async def authenticate(self, headers, path, scope, client):
            return "team"

    class Plugin:
        @hookimpl
        def authenticate(self, settings):
            return TeamToken()

    settings = Settings(
        host="127.0.0.1", upstream=upstream_url, plugins_dir=str(tmp_path), log_headers=("X-Team-Token",)
    )
    pm = make_plugin_manager(settings)
    pm.register(Plugin(), name="team")
    proxy = servers.start(make_app(settings, pm))
    await http.get(proxy + "/api/tags", headers={"X-Team-Token": "t0ken"})
    [record] = access(log_lines())
    assert (record["key"], record["headers"]) == ("team", {"X-Team-Token": "***"})
