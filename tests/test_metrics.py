"""Prometheus metrics, scraped and parsed after a known sequence of requests."""

import asyncio
import json

from .helpers import open_raw, parse_metrics, scrape, split_response, unused_url, value

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


async def test_counters_after_a_known_sequence(proxy_url, fake, http):
    tags = await http.get(proxy_url + "/api/tags")
    body = json.dumps(CHAT).encode()
    chat = await http.request("GET", proxy_url + "/api/chat", content=body)
    await http.request("GET", proxy_url + "/api/chat", content=body)
    await http.get(proxy_url + "/api/chat")  # body lost: 400 from the proxy
    samples = await scrape(http, proxy_url)
    assert value(samples, "ollama_proxy_requests_total", route="/api/tags", method_out="GET", status="200") == 1
    assert value(samples, "ollama_proxy_requests_total", route="/api/chat", method_out="POST", status="200") == 2
    # Refused before going upstream: no method went out, as the access record says.
    assert value(samples, "ollama_proxy_requests_total", route="/api/chat", method_out="none", status="400") == 1
    assert (
        value(samples, "ollama_proxy_method_corrections_total", route="/api/chat", method_in="GET", method_out="POST")
        == 2
    )
    assert value(samples, "ollama_proxy_request_duration_seconds_count", route="/api/chat") == 3
    assert value(samples, "ollama_proxy_time_to_first_byte_seconds_count", route="/api/chat") == 2
    assert value(samples, "ollama_proxy_body_bytes_total", direction="out") == len(tags.content) + 2 * len(chat.content)
    assert value(samples, "ollama_proxy_body_bytes_total", direction="in") == 2 * len(body)
    # Forwarded requests only: the scrape does not count itself.
    assert value(samples, "ollama_proxy_requests_in_flight") == 0
    assert value(samples, "ollama_proxy_streams_in_flight") == 0


async def test_unmapped_paths_share_one_route_label(proxy_url, http):
    for path in ("/api/a", "/api/b", "/api/c"):
        await http.get(proxy_url + path)
    samples = await scrape(http, proxy_url)
    assert value(samples, "ollama_proxy_requests_total", route="unmapped", method_out="GET", status="404") == 3


async def test_streams_in_flight_and_client_disconnects(proxy_url, fake, http):
    reader, writer = await open_raw(proxy_url)
    body = json.dumps({**CHAT, "model": "stall"}).encode()
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await reader.readuntil(b'"done": false}\n')
    during = await scrape(http, proxy_url)
    assert value(during, "ollama_proxy_streams_in_flight") == 1
    assert value(during, "ollama_proxy_requests_in_flight") == 1
    writer.close()
    await asyncio.wait_for(fake.disconnected.get(), 2)
    after = await scrape(http, proxy_url)
    assert value(after, "ollama_proxy_streams_in_flight") == 0
    assert value(after, "ollama_proxy_client_disconnects_total") == 1


async def test_upstream_errors_by_kind(make_proxy, http):
    proxy = make_proxy(upstream=unused_url())
    await http.get(proxy + "/api/tags")
    await http.get(proxy + "/api/ps")
    samples = await scrape(http, proxy)
    assert value(samples, "ollama_proxy_upstream_errors_total", kind="refused") == 2


async def test_idle_timeouts_are_counted(make_proxy, http):
    proxy = make_proxy(idle_timeout=0.2)
    await http.request("GET", proxy + "/api/chat", json={**CHAT, "model": "silent"})
    samples = await scrape(http, proxy)
    assert value(samples, "ollama_proxy_upstream_errors_total", kind="idle_timeout") == 1


async def test_endpoints_can_move_or_be_turned_off(make_proxy, http):
    moved = make_proxy(metrics_path="/admin/metrics", health_path="/admin/health")
    assert (await http.get(moved + "/admin/metrics")).text.startswith("# HELP")
    assert (await http.get(moved + "/admin/health")).json()["status"] == "ok"
    assert (await http.get(moved + "/_proxy/metrics")).status_code == 404
    off = make_proxy(metrics_path=None, health_path=None)
    for path in ("/_proxy/metrics", "/_proxy/health"):
        response = await http.get(off + path)
        assert response.status_code == 404
        assert response.json() == {"error": f"{path} is not an endpoint of this proxy"}


async def test_rate_limited_requests_are_counted_by_reason(make_proxy, http):
    proxy = make_proxy(rate_limit="1/minute")
    for _ in range(3):
        await http.get(proxy + "/api/tags")
    samples = await scrape(http, proxy)
    assert value(samples, "ollama_proxy_rate_limited_total", route="/api/tags", reason="rate") == 2
    assert value(samples, "ollama_proxy_requests_total", route="/api/tags", method_out="none", status="429") == 2


async def test_no_path_a_client_chooses_becomes_a_label(proxy_url, http):
    """10,000 distinct paths under the proxy's own prefix, pipelined on one connection,
    add no label set: the exposition keeps its series and its size."""

    async def send(paths):
        reader, writer = await open_raw(proxy_url)
        writer.write(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path for path in paths))
        for _ in paths:
            status, _, _ = split_response(await reader.readuntil(b"\r\n\r\n"))
            assert status == 404
            await reader.readuntil(b"}")  # the error's JSON body
        writer.close()

    await send([b"/_proxy/first", b"/%5Fproxy/first"])
    await http.get(proxy_url + "/_proxy/metrics")  # so that the scrapes' own series exist
    before = (await http.get(proxy_url + "/_proxy/metrics")).text
    for batch in range(20):
        await send([b"/_proxy/%d-%d-%s" % (batch, n, b"x" * 100) for n in range(500)])
    after = (await http.get(proxy_url + "/_proxy/metrics")).text
    assert parse_metrics(after).keys() == parse_metrics(before).keys()
    assert len(after) - len(before) < 100  # counts grew by some digits, nothing else
    assert (
        value(parse_metrics(after), "ollama_proxy_requests_total", route="not_found", method_out="none", status="404")
        == 10_001
    )
