"""Limits end to end: 429s with headers, concurrency slots, Redis shared between proxies."""

import asyncio
import json
import logging

import httpx
import openai
import pytest

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.app import make_app
from tornado_ollama_proxy.auth import parse_entries
from tornado_ollama_proxy.plugins import make_plugin_manager
from tornado_ollama_proxy.ratelimit import (
    Admission,
    LimitsRateLimiter,
    RateLimited,
)
from tornado_ollama_proxy.settings import Settings
from tornado_ollama_proxy.storage import OutageLog

from .conftest import RedisServer
from .helpers import hang_up_at_once, open_raw, read_log, until

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
SILENT = json.dumps({**CHAT, "model": "silent"}).encode()


async def test_over_the_limit_is_a_429_with_retry_after_and_nothing_forwarded(make_proxy, fake, http):
    proxy = make_proxy(rate_limit="2/minute")
    first = await http.get(proxy + "/api/tags")
    second = await http.get(proxy + "/api/tags")
    third = await http.get(proxy + "/api/tags")
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    assert (first.headers["ratelimit-limit"], first.headers["ratelimit-remaining"]) == ("2", "1")
    assert second.headers["ratelimit-remaining"] == "0"
    assert 0 < int(first.headers["ratelimit-reset"]) <= 60
    assert 0 < int(third.headers["retry-after"]) <= 60
    assert third.headers["ratelimit-remaining"] == "0"
    error = third.json()["error"]
    assert error.startswith("rate limit exceeded: 2 per 1 minute for /api/tags; retry in ")
    assert [seen.path for seen in fake.seen] == ["/api/tags", "/api/tags"]


def told(answer):
    """The rate-limit headers of an answer, as a client reads them."""
    return {name: value for name, value in answer.headers.items() if "ratelimit" in name or name == "retry-after"}


def window(remaining, reset, openai_reset, limit="2"):
    """The headers of a request rate limit's window: RateLimit-* and OpenAI's trio."""
    return {
        "ratelimit-limit": limit,
        "ratelimit-remaining": remaining,
        "ratelimit-reset": reset,
        "x-ratelimit-limit-requests": limit,
        "x-ratelimit-remaining-requests": remaining,
        "x-ratelimit-reset-requests": openai_reset,
    }


async def test_answers_tell_the_requests_left_as_openai_does_and_refusals_too(make_proxy, http, clock):
    proxy = make_proxy(rate_limit="2/minute")
    first = await http.get(proxy + "/api/tags")
    clock[0] += 15.75
    second = await http.get(proxy + "/api/tags")
    clock[0] += 44  # a quarter of a second before the first leaves the window
    refused = await http.get(proxy + "/api/tags")
    clock[0] += 0.75  # the first has left it
    again = await http.get(proxy + "/api/tags")
    assert [answer.status_code for answer in (first, second, refused, again)] == [200, 200, 429, 200]
    assert told(first) == window("1", "60", "1m0s")
    assert told(second) == window("0", "45", "45s")  # 44.25 s, in whole seconds as RateLimit-Reset
    assert told(refused) == {"retry-after": "1", **window("0", "1", "250ms")}  # below a second, to the millisecond
    assert told(again) == window("0", "16", "16s")  # when the second leaves the window


async def test_openai_clients_see_both_trios_on_a_stream_and_the_requests_one_on_a_refusal(
    make_proxy, nginx, fake, clock
):
    key = "a" * 43
    quota = parse_entries([{"name": "alice", "key": key, "tokens_per_minute": 1000}])
    front = nginx(make_proxy(api_keys=quota, rate_limit="2/minute"), as_get=True)
    hello = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}
    async with openai.AsyncOpenAI(base_url=front + "/v1", api_key=key, max_retries=0) as chat:
        async with chat.chat.completions.with_streaming_response.create(**hello, stream=True) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            assert [line async for line in streamed.iter_lines() if line][-1] == "data: [DONE]"
        clock[0] += 30
        whole = await chat.chat.completions.with_raw_response.create(**hello)
        with pytest.raises(openai.RateLimitError) as refused:
            await chat.chat.completions.create(**hello)
    assert told(streamed) == {
        **window("1", "60", "1m0s"),
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "965",  # 25 for the prompt, 10 for the output
        "x-ratelimit-reset-tokens": "1m0s",
    }
    assert told(whole).items() >= {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"}.items()
    # Refused before any quota is asked: no tokens trio.
    assert told(refused.value.response) == {"retry-after": "30", **window("0", "30", "30s")}
    message = refused.value.body["message"]
    assert message == "rate limit exceeded: 2 per 1 minute for /v1/chat/completions; retry in 30 s"
    assert [seen.path for seen in fake.seen] == ["/v1/chat/completions"] * 2  # not the refused one


async def test_an_allowed_stream_is_untouched(make_proxy, fake, http):
    proxy = make_proxy(rate_limit="100/minute")
    limited = await http.request("GET", proxy + "/api/chat", json=CHAT)
    plain = await http.request("GET", make_proxy() + "/api/chat", json=CHAT)
    assert limited.content == plain.content
    assert limited.headers["x-ratelimit-remaining-requests"] == "99"
    assert told(plain) == {}


async def test_per_route_limits_override_the_default(make_proxy, http, clock):
    proxy = make_proxy(rate_limit="100/minute", rate_limit_routes={"/api/pull": "1/hour"})
    assert (await http.request("GET", proxy + "/api/pull", json={"model": "x"})).status_code == 200
    refused = await http.request("GET", proxy + "/api/pull", json={"model": "x"})
    assert refused.status_code == 429
    assert "1 per 1 hour for /api/pull" in refused.json()["error"]
    assert (refused.headers["x-ratelimit-limit-requests"], refused.headers["x-ratelimit-reset-requests"]) == (
        "1",
        "1h0m0s",
    )
    assert (await http.get(proxy + "/api/tags")).headers["x-ratelimit-limit-requests"] == "100"


@pytest.mark.parametrize("limits", ["10/second; 3/minute", "3/minute; 10/second"])
async def test_several_limits_report_the_tightest(make_proxy, http, clock, limits):
    proxy = make_proxy(rate_limit=limits)
    response = await http.get(proxy + "/api/tags")
    assert told(response) == {
        "ratelimit-limit": "3",
        "ratelimit-remaining": "2",
        "ratelimit-reset": "60",
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "1m0s",
    }


async def test_slots_are_counted_per_client_and_released_once():
    limiter = LimitsRateLimiter(Settings(concurrency_per_client=2))
    first = await limiter.admit("a", "/api/chat")
    second = await limiter.admit("a", "/api/chat")
    with pytest.raises(RateLimited):
        await limiter.admit("a", "/api/chat")
    first.release()
    first.release()
    assert limiter.in_flight == {"a": 1}
    second.release()
    assert limiter.in_flight == {}


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window-counter"])
async def test_other_strategies(make_proxy, http, strategy):
    proxy = make_proxy(rate_limit="1/minute", rate_limit_strategy=strategy)
    assert [(await http.get(proxy + "/api/tags")).status_code for _ in range(2)] == [200, 429]


async def test_clients_are_told_apart_by_trusted_forwarding_headers(make_proxy, http):
    proxy = make_proxy(rate_limit="1/minute", trusted_proxies=("127.0.0.1",))
    one = {"CF-Connecting-IP": "203.0.113.1"}
    two = {"X-Forwarded-For": "203.0.113.2"}
    assert (await http.get(proxy + "/api/tags", headers=one)).status_code == 200
    assert (await http.get(proxy + "/api/tags", headers=two)).status_code == 200
    assert (await http.get(proxy + "/api/tags", headers=one)).status_code == 429


async def test_untrusted_forwarding_headers_do_not_make_new_clients(make_proxy, http):
    proxy = make_proxy(rate_limit="1/minute")
    assert (await http.get(proxy + "/api/tags", headers={"X-Forwarded-For": "1.1.1.1"})).status_code == 200
    assert (await http.get(proxy + "/api/tags", headers={"X-Forwarded-For": "2.2.2.2"})).status_code == 429


async def test_an_api_key_header_can_be_the_client(make_proxy, http):
    proxy = make_proxy(rate_limit="1/minute", client_key_header="X-API-Key")
    assert (await http.get(proxy + "/api/tags", headers={"X-API-Key": "a"})).status_code == 200
    assert (await http.get(proxy + "/api/tags", headers={"X-API-Key": "b"})).status_code == 200
    assert (await http.get(proxy + "/api/tags", headers={"X-API-Key": "a"})).status_code == 429
    assert (await http.get(proxy + "/api/tags")).status_code == 200  # no key: the address


async def test_exempt_networks_and_the_proxys_own_endpoints_are_never_limited(make_proxy, http):
    exempt = make_proxy(rate_limit="1/minute", rate_limit_exempt=("127.0.0.0/8",))
    assert {(await http.get(exempt + "/api/tags")).status_code for _ in range(3)} == {200}
    limited = make_proxy(rate_limit="1/minute")
    assert {(await http.get(limited + "/_proxy/health")).status_code for _ in range(3)} == {200}


async def chat_held_open(url):
    reader, writer = await open_raw(url)
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SILENT) + SILENT)
    return reader, writer


async def test_concurrency_per_client_holds_a_slot_until_the_stream_ends(make_proxy, fake, http):
    proxy = make_proxy(concurrency_per_client=1)
    _, writer = await chat_held_open(proxy)
    await asyncio.wait_for(fake.arrived.get(), 5)
    busy = await http.request("GET", proxy + "/api/chat", json=CHAT)
    assert busy.status_code == 429
    assert busy.json()["error"] == "too many requests in flight for this client: at most 1 at once"
    assert busy.headers["retry-after"] == "1"
    writer.close()
    await asyncio.wait_for(fake.disconnected.get(), 2)
    assert (await http.request("GET", proxy + "/api/chat", json=CHAT)).status_code == 200


async def test_the_global_cap_answers_503(make_proxy, fake, http):
    proxy = make_proxy(concurrency_total=1)
    _, writer = await chat_held_open(proxy)
    await asyncio.wait_for(fake.arrived.get(), 5)
    full = await http.get(proxy + "/api/tags", headers={"X-Forwarded-For": "9.9.9.9"})
    assert full.status_code == 503
    assert "limit of 1 requests at once" in full.json()["error"]
    writer.close()


async def test_no_slot_leaks_after_a_thousand_aborted_streams(make_proxy, servers, fake, http, upstream_url, tmp_path):
    app = make_app(
        Settings(host="127.0.0.1", upstream=upstream_url, plugins_dir=str(tmp_path), concurrency_per_client=1)
    )
    proxy = servers.start(app)
    for _ in range(1000):
        reader, writer = await chat_held_open(proxy)
        await asyncio.wait_for(fake.arrived.get(), 5)
        writer.close()
        await asyncio.wait_for(fake.disconnected.get(), 5)
    assert app.settings["proxy"].limiter.in_flight == {}
    assert (await http.get(proxy + "/api/tags")).status_code == 200


async def test_slots_are_released_on_errors_and_timeouts(make_proxy, fake, http):
    proxy = make_proxy(concurrency_per_client=1, idle_timeout=0.2)
    assert (await http.request("GET", proxy + "/api/chat", json={**CHAT, "model": "silent"})).status_code == 504
    assert (await http.get(proxy + "/api/chat")).status_code == 400
    assert (await http.get(proxy + "/api/tags")).status_code == 200


async def test_a_rate_refusal_does_not_hold_a_slot(make_proxy, http):
    proxy = make_proxy(rate_limit="1/minute", concurrency_per_client=1)
    await http.get(proxy + "/api/tags")
    assert (await http.get(proxy + "/api/tags")).status_code == 429
    assert (await http.get(proxy + "/api/ps")).status_code == 200


# -- Redis -------------------------------------------------------------------------


async def test_two_proxies_share_one_limit_through_redis(make_proxy, redis_server, fake, http):
    settings = {"rate_limit": "3/minute", "rate_limit_storage": redis_server.url}
    first, second = make_proxy(**settings), make_proxy(**settings)
    codes = [(await http.get(proxy + "/api/tags")).status_code for proxy in (first, second, first, second)]
    assert codes == [200, 200, 200, 429]


async def test_redis_down_fails_open_by_default(make_proxy, redis_server, http):
    proxy = make_proxy(rate_limit="1/minute", rate_limit_storage=redis_server.url)
    redis_server.stop()
    responses = [await http.get(proxy + "/api/tags") for _ in range(3)]
    assert {response.status_code for response in responses} == {200}
    assert "ratelimit-limit" not in responses[0].headers


async def test_redis_down_can_fail_closed(make_proxy, redis_server, fake, http):
    proxy = make_proxy(rate_limit="1/minute", rate_limit_storage=redis_server.url, rate_limit_fail="closed")
    redis_server.stop()
    response = await http.get(proxy + "/api/tags")
    assert response.status_code == 503
    assert response.json()["error"].startswith("rate limit storage unavailable: ")
    assert fake.seen == []


async def test_a_hung_storage_is_bounded_by_the_storage_timeout(make_proxy, http):
    from .helpers import BlackHole

    hole = BlackHole()
    proxy = make_proxy(
        rate_limit="1/minute",
        rate_limit_storage=hole.url.replace("http", "redis"),
        rate_limit_storage_timeout=0.2,
        rate_limit_fail="closed",
    )
    response = await asyncio.wait_for(http.get(proxy + "/api/tags"), 5)
    hole.close()
    assert response.status_code == 503
    assert "TimeoutError" in response.json()["error"]


async def test_a_storage_hung_from_the_start_delays_each_request_by_the_timeout_only(make_proxy, http):
    from .helpers import BlackHole

    hole = BlackHole()
    proxy = make_proxy(
        rate_limit="100/minute", rate_limit_storage=hole.url.replace("http", "redis"), rate_limit_storage_timeout=0.5
    )
    # One at a time while cold would take 40 x 0.5 s; each waits its own timeout at most.
    answers = await asyncio.wait_for(asyncio.gather(*(http.get(proxy + "/api/version") for _ in range(40))), 8)
    hole.close()
    assert {answer.status_code for answer in answers} == {200}  # failing open


# -- exact limits under bursts ----------------------------------------------------------


STRATEGIES = ["moving-window", "fixed-window", "sliding-window-counter"]


@pytest.fixture(params=["memory", "redis"])
def storage(request):
    if request.param == "memory":
        yield "memory://"
        return
    server = RedisServer()
    yield server.url
    server.stop()


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_burst_admits_exactly_what_the_window_has_left(storage, strategy):
    limiter = LimitsRateLimiter(
        Settings(rate_limit="5/minute", rate_limit_strategy=strategy, rate_limit_storage=storage)
    )
    for _ in range(4):  # one left
        await limiter.admit("client", "/api/tags")
    burst = await asyncio.gather(*(limiter.admit("client", "/api/tags") for _ in range(20)), return_exceptions=True)
    admitted = [outcome for outcome in burst if isinstance(outcome, Admission)]
    assert len(admitted) == 1
    assert {outcome.status for outcome in burst if not isinstance(outcome, Admission)} == {429}


async def test_a_first_burst_on_a_cold_redis_is_counted_once(redis_server):
    """Scripts not yet in Redis: coredis drops the connection the burst shares and sends
    its commands again. Until one call has succeeded they go one at a time."""
    host, port = redis_server.url.rsplit("/", 1)[1].split(":")
    for round_ in range(10):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"SCRIPT FLUSH\r\n")
        assert await reader.readline() == b"+OK\r\n"
        writer.close()
        limiter = LimitsRateLimiter(Settings(rate_limit="10/minute", rate_limit_storage=redis_server.url))
        burst = await asyncio.gather(*(limiter.admit(f"c{round_}", "/r") for _ in range(40)), return_exceptions=True)
        assert sum(isinstance(outcome, Admission) for outcome in burst) == 10
        assert limiter.shared.outage.failures == 0


async def test_two_proxy_processes_admit_exactly_the_shared_limit(launch, upstream_url, redis_server):
    env = {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "OLLAMA_PROXY_RATE_LIMIT": "10/minute",
        "OLLAMA_PROXY_RATE_LIMIT_STORAGE": redis_server.url,
        # Atomicity is what is tested: on a loaded machine a storage call slower than the
        # default 0.5 s would fail open (admit, by design) and blur it.
        "OLLAMA_PROXY_RATE_LIMIT_STORAGE_TIMEOUT": "10",
    }
    addresses = [(await read_log(launch(env), "listening"))["address"] for _ in range(2)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100)) as http:
        answers = await asyncio.gather(*(http.get(addresses[i % 2] + "/api/tags") for i in range(60)))
    assert sorted(response.status_code for response in answers) == [200] * 10 + [429] * 50


def test_with_several_limits_a_refusal_leaves_the_earlier_ones_charged():
    async def run():
        limiter = LimitsRateLimiter(Settings(rate_limit="10/minute; 1/minute"))
        await limiter.admit("client", "/r")
        with pytest.raises(RateLimited, match="1 per 1 minute"):
            await limiter.admit("client", "/r")
        window = await limiter.strategy.get_window_stats(limiter.default[0], "/r", "client")
        return window.remaining

    assert asyncio.run(run()) == 8  # charged twice, as the README says


# -- the storage going away and coming back -----------------------------------------------


async def test_an_outage_is_logged_when_it_begins_and_when_it_ends_not_per_request(make_proxy, http, log_lines):
    redis = RedisServer()
    proxy = make_proxy(rate_limit="100/minute", rate_limit_storage=redis.url)
    assert (await http.get(proxy + "/api/tags")).status_code == 200
    redis.stop()
    for _ in range(30):
        assert (await http.get(proxy + "/api/tags")).status_code == 200  # fails open
    back = RedisServer(port=redis.port)
    assert (await http.get(proxy + "/api/tags")).headers["ratelimit-limit"] == "100"
    back.stop()
    lines = [(line["level"], line["message"]) for line in log_lines() if line["name"] == "tornado_ollama_proxy.storage"]
    assert lines == [
        ("WARNING", "rate limit storage unavailable: limits not enforced"),
        ("WARNING", "rate limit storage available again"),
    ]
    assert (
        next(line for line in log_lines() if line["message"] == "rate limit storage available again")["failures"] == 30
    )


def test_a_long_outage_is_recalled_once_a_period(caplog):
    outage = OutageLog("requests refused (503)", period=0.0)
    with caplog.at_level(logging.INFO, "tornado_ollama_proxy.storage"):
        for _ in range(3):
            outage.failed("down")
        outage.over()
        outage.over()  # nothing to end twice
    assert [record.getMessage() for record in caplog.records] == [
        "rate limit storage unavailable: requests refused (503)",
        "rate limit storage still unavailable: requests refused (503)",
        "rate limit storage still unavailable: requests refused (503)",
        "rate limit storage available again",
    ]


# -- a replacement limiter -------------------------------------------------------


async def test_a_plugin_can_replace_the_limiter(servers, upstream_url, tmp_path, http):
    released = []

    class OnlyOllama3:
        async def admit(self, client, route):
            if route == "/api/ps":
                raise RateLimited(429, "no ps for you", {"Retry-After": "5"}, "custom")
            return Admission({"X-Quota": "plenty"}, lambda: released.append(route))

    class Plugin:
        @hookimpl
        def rate_limiter(self, settings):
            return OnlyOllama3()

    settings = Settings(host="127.0.0.1", upstream=upstream_url, plugins_dir=str(tmp_path))
    pm = make_plugin_manager(settings)
    pm.register(Plugin(), name="quota")
    proxy = servers.start(make_app(settings, pm))
    ok = await http.get(proxy + "/api/tags")
    assert ok.headers["x-quota"] == "plenty" and released == ["/api/tags"]
    refused = await http.get(proxy + "/api/ps")
    assert (refused.status_code, refused.json(), refused.headers["retry-after"]) == (
        429,
        {"error": "no ps for you"},
        "5",
    )


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(SILENT), SILENT),
    ],
)
@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_client_that_leaves_while_admission_waits_sends_nothing_and_keeps_no_slot(
    servers, upstream_url, fake, tmp_path, http, log_lines, request_bytes, reset
):
    asked, gate, released = asyncio.Event(), asyncio.Event(), []

    class Slow:  # a limiter whose storage takes its time (a remote Redis)
        async def admit(self, client, route):
            asked.set()
            await gate.wait()
            return Admission({}, lambda: released.append(route))

    class Plugin:
        @hookimpl
        def rate_limiter(self, settings):
            return Slow()

    settings = Settings(host="127.0.0.1", upstream=upstream_url, plugins_dir=str(tmp_path))
    pm = make_plugin_manager(settings)
    pm.register(Plugin(), name="slow")
    proxy = servers.start(make_app(settings, pm))
    reader, writer = await open_raw(proxy)
    writer.write(request_bytes)
    await asked.wait()
    if reset:
        hang_up_at_once(writer)
    else:
        writer.close()
    await writer.wait_closed()  # gone (on loopback its end is there at once) before the limiter answers
    gate.set()
    await until(lambda: [line for line in log_lines() if line["message"] == "request"])  # it ended
    assert len(released) == 1  # given back, once
    [record] = [line for line in log_lines() if line["message"] == "request"]
    assert (record["outcome"], record["method_out"]) == ("client_gone", None)
    assert (await http.get(proxy + "/api/version")).status_code == 200
    assert [seen.path for seen in fake.seen] == ["/api/version"]  # nothing went upstream for nobody
