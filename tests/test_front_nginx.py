"""Behind a real keep-alive front (nginx, as a platform's): the proxy's refusals
never make another user's request fail on a shared connection."""

import asyncio

import httpx

from tornado_ollama_proxy.auth import parse_entries

ROUNDS = 150  # per client, several clients at once


async def test_a_rate_limited_client_costs_a_well_behaved_one_nothing(make_proxy, nginx):
    proxy = make_proxy(
        rate_limit_routes={"/api/chat": "1/minute"}, client_key_header="X-API-Key", trusted_proxies=("127.0.0.1",)
    )
    front = nginx(proxy)
    greedy, polite = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, pool=None)) as http:

        async def refused():
            for _ in range(ROUNDS):
                response = await http.post(
                    front + "/api/chat",
                    headers={"X-API-Key": "greedy"},
                    json={"model": "llama3.2", "messages": [], "stream": False},
                )
                greedy.append(response.status_code)

        async def served():
            for _ in range(ROUNDS):
                response = await http.post(
                    front + "/api/show", headers={"X-API-Key": "polite"}, json={"model": "llama3.2"}
                )
                polite.append(response.status_code)

        await asyncio.gather(*(call() for _ in range(4) for call in (refused, served)))
    assert sorted(greedy) == [200] + [429] * (4 * ROUNDS - 1)
    assert polite == [200] * (4 * ROUNDS)  # never a 502


async def test_a_large_body_refused_at_once_reaches_the_client_through_a_keep_alive_front(make_proxy, nginx):
    """The proxy says no before the body is in, and lingers: it reads and drops the body
    before it closes, so the front, still sending, takes the answer and not a reset."""
    proxy = make_proxy(api_keys=parse_entries([{"name": "k", "key": "k" * 43}]))
    front = nginx(proxy)
    body = b"a" * (5 * 1024 * 1024)
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(6):
            refused = await http.post(front + "/api/chat", content=body)
            assert (refused.status_code, refused.headers["content-type"]) == (401, "application/json; charset=utf-8")
            assert refused.json()["error"].startswith("missing or invalid API key")
        admitted = await http.get(front + "/api/version", headers={"Authorization": "Bearer " + "k" * 43})
        assert admitted.status_code == 200
