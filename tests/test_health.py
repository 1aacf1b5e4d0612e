"""The health check is cheap: cached, and shared by callers who ask at once."""

import asyncio


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
