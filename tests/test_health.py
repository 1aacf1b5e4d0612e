"""The health check is cheap: cached, and shared by callers who ask at once."""

import asyncio

from .helpers import CannedUpstream, unused_url


def version_calls(fake):
    return sum(1 for seen in fake.seen if seen.path == "/api/version")


async def test_concurrent_and_repeated_probes_share_one_upstream_call(make_proxy, fake, http):
    proxy = make_proxy(health_cache_seconds=60)
    answers = await asyncio.gather(*(http.get(proxy + "/_proxy/health") for _ in range(5)))
    answers.append(await http.get(proxy + "/_proxy/health"))
    assert {response.status_code for response in answers} == {200}
    assert version_calls(fake) == 1


async def test_without_caching_every_probe_asks(make_proxy, fake, http):
    proxy = make_proxy(health_cache_seconds=0)
    for _ in range(3):
        assert (await http.get(proxy + "/_proxy/health")).status_code == 200
    assert version_calls(fake) == 3


async def test_an_answer_the_proxy_cannot_parse_fails_the_probe_at_once_every_time(make_proxy, http):
    broken = b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\n{}"
    canned = CannedUpstream(broken, broken)
    proxy = make_proxy(upstream=await canned.start(), health_cache_seconds=0, connect_timeout=30)
    for _ in range(2):  # the first probe's failure does not jam the next
        response = await asyncio.wait_for(http.get(proxy + "/_proxy/health"), 5)
        assert response.status_code == 503
        assert "sent an answer this proxy cannot relay" in response.json()["error"]
    await canned.stop()


async def test_head_probes_get_the_status_without_a_body(make_proxy, http):
    up = await http.head(make_proxy() + "/_proxy/health")
    assert (up.status_code, up.content) == (200, b"")
    assert up.headers["content-type"] == "application/json; charset=utf-8"
    down = await http.head(make_proxy(upstream=unused_url()) + "/_proxy/health")
    assert (down.status_code, down.content) == (503, b"")


async def test_the_proxys_own_endpoints_answer_head_and_name_their_methods(proxy_url, http):
    for path in ("/_proxy/health", "/_proxy/metrics", "/_proxy/status", "/_proxy/"):
        got, head = await http.get(proxy_url + path), await http.head(proxy_url + path)
        assert (head.status_code, head.content, "server" in head.headers) == (got.status_code, b"", False)
        refused = await http.post(proxy_url + path)
        assert (refused.status_code, refused.headers["allow"]) == (405, "GET, HEAD")
        assert refused.json() == {"error": "method not allowed"}
