"""Behind a real keep-alive front (nginx, as a platform's): the proxy's refusals
never make another user's request fail on a shared connection."""

import asyncio

import httpx

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
