"""Token quotas per key: key entries that carry them, reserving and settling, refusals,
and what clients see through the proxy (one quota for several proxies)."""

import asyncio
import itertools
import json
import logging
import re
import signal
import time

import coredis
import ollama
import openai
import pytest

from tornado_ollama_proxy.app import make_app
from tornado_ollama_proxy.auth import KeyEntryError, parse_entries, parse_key_file
from tornado_ollama_proxy.errors import Rejection
from tornado_ollama_proxy.quota import QuotaExceeded, Quotas
from tornado_ollama_proxy.settings import Settings, SettingsError
from tornado_ollama_proxy.token_windows import Window, windows_of

from .helpers import (
    CannedUpstream,
    ScriptedUpstream,
    read_log,
    read_response,
    ready,
    send_json,
    tokens_reported,
    until,
    unused_url,
)
from .helpers import address as host_port

KEY = "a" * 43
OTHER = "b" * 43
MINUTE = Window("tokens_per_minute", 60, 1, 100)
DAY = Window("tokens_per_day", 86400, 60, 150)

ALICE = f"Authorization: Bearer {KEY}\r\n".encode()
BOB = f"Authorization: Bearer {OTHER}\r\n".encode()


def counted(answer):
    return answer["prompt_eval_count"], answer["eval_count"]


def keys(**quota):
    return parse_entries([{"name": "alice", "key": KEY, **quota}, {"name": "bob", "key": OTHER}])


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def chats(state):
    return [json.loads(seen.body) for seen in state.seen if seen.path in ("/api/chat", "/v1/chat/completions")]


# -- key entries ----------------------------------------------------------------------------


def test_a_key_entry_and_a_key_file_line_carry_quotas():
    [alice] = parse_entries([{"name": "alice", "key": KEY, "tokens_per_minute": 100, "tokens_per_day": 150}])
    assert windows_of(alice) == (MINUTE, DAY)
    lines = f"alice:{KEY}:inference:tokens_per_minute=100,weight=2.5\nbob:sha256:{'0' * 64}:tokens_per_day=150\n"
    alice, bob = parse_key_file(lines, "keys.txt")
    assert (alice.scopes, alice.weight, windows_of(alice)) == (frozenset({"inference"}), 2.5, (MINUTE,))
    assert (bob.weight, windows_of(bob)) == (1.0, (DAY,))
    assert windows_of(parse_key_file(f"carol:{KEY}=", "k")[0]) == ()  # an = in a key is the key's


@pytest.mark.parametrize(
    "line, error",
    [
        (f"alice:{KEY}:tokens_per_hour=5", "unknown field 'tokens_per_hour'; allowed: weight, tokens_per_minute"),
        (f"alice:{KEY}:tokens_per_minute=lots", "tokens_per_minute must be a whole number from 1 to 1e+12"),
        (f"alice:{KEY}:tokens_per_minute=1.5", "tokens_per_minute must be a whole number"),
        (f"alice:{KEY}:weight=0", "weight must be a number from 0.01 to 1000"),
        (f"alice:{KEY}:weight=inf", "weight must be a number from 0.01 to 1000"),
        (f"alice:{KEY}:max_concurrent=1_000", "max_concurrent must be a whole number from 1 to 1e+06"),
        (f"alice:{KEY}:tokens_per_day=\u0661\u0662", "tokens_per_day must be a whole number"),
        (f"alice:{KEY}:tokens_per_day={'9' * 5000}", "tokens_per_day must be a whole number"),
        (f"alice:{KEY}:inference:chat:weight=2", "too many ':'"),
    ],
)
def test_bad_key_file_fields_are_named_with_their_line(line, error):
    with pytest.raises(KeyEntryError, match=re.escape(f"keys.txt, line 1: {error}")):
        parse_key_file(line, "keys.txt")


def test_a_quota_in_a_key_entry_must_be_a_whole_number():
    with pytest.raises(KeyEntryError, match="entry 1: tokens_per_day must be a whole number from 1 to 1e"):
        parse_entries([{"name": "a", "key": KEY, "tokens_per_day": "100"}])


# -- one quota for every proxy sharing Redis ---------------------------------------------


async def test_one_quota_for_every_proxy_sharing_redis_grants_exactly_what_fits(redis_server):
    ledgers = [quotas(rate_limit_storage=redis_server.url), quotas(rate_limit_storage=redis_server.url)]
    key = alice(tokens_per_minute=1000)
    body = json.dumps({"prompt": "x" * 12, "options": {"num_predict": 40}}).encode()  # 20 tokens, 60 wanted

    async def reserve(ledger):
        try:
            return (await ledger.reserve(key, "/api/generate", body)).reservation.granted
        except QuotaExceeded:
            return 0

    granted = await asyncio.gather(*(reserve(ledgers[n % 2]) for n in range(40)))
    assert sum(granted) == 1000  # sixteen of 60, then one of the last 40: to the token
    assert sorted(granted, reverse=True)[:18] == [60] * 16 + [40, 0]


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_a_reservation_redis_answered_too_late_is_taken_back(redis_server, fail):
    ledger = quotas(rate_limit_storage=redis_server.url, rate_limit_storage_timeout=0.2, rate_limit_fail=fail)
    key = alice(tokens_per_minute=100)
    await ledger.usage([key])  # the scripts are loaded
    await coredis.Redis.from_url(redis_server.url).client_pause(600)  # Redis stalls, then runs what waited
    if fail == "closed":
        with pytest.raises(QuotaExceeded):
            await ledger.reserve(key, "/api/generate", b'{"prompt": "x"}')
    else:
        assert (await ledger.reserve(key, "/api/generate", b'{"prompt": "x"}')).reservation is None
    await asyncio.gather(*ledger.tokens.undoing)
    assert await ledger.usage([key]) == [{"key": "alice", "window": "tokens_per_minute", "used": 0, "limit": 100}]


# -- reserving, and what is refused -------------------------------------------------------


def quotas(**settings):
    return Quotas(Settings(**settings))


def alice(**quota):
    return keys(**quota)[0]


async def test_a_reservation_caps_what_does_not_fit_and_settles_to_what_was_used(io_loop):
    ledger = quotas(quota_default_output_tokens=50)
    body = json.dumps({"prompt": "x" * 30}).encode()  # 26 tokens reckoned
    grant = await ledger.reserve(alice(tokens_per_minute=100), "/api/generate", body)
    assert json.loads(grant.body) == {"prompt": "x" * 30, "options": {"num_predict": 50}}  # no limit: the default
    assert grant.headers == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "24",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    second = await ledger.reserve(alice(tokens_per_minute=100), "/api/generate", b'{"prompt": "x"}')  # 16
    assert json.loads(second.body) == {"prompt": "x", "options": {"num_predict": 8}}  # what was left
    assert (grant.reservation.granted, second.reservation.granted) == (76, 24)
    grant.reservation.settle(30)  # Ollama counted 30
    grant.reservation.settle(99)  # once only
    second.reservation.settle(24)  # all it had
    assert len(ledger.corrections) == 1  # nothing to correct for the second
    await asyncio.gather(*ledger.corrections)
    assert sum(ledger.tokens.buckets["alice:tokens_per_minute"].values()) == 30 + 24


async def test_an_output_that_fits_is_left_as_the_client_asked(io_loop):
    ledger = quotas()
    body = json.dumps({"prompt": "x", "options": {"num_predict": 10}}).encode()
    grant = await ledger.reserve(alice(tokens_per_day=1000), "/api/generate", body)
    assert (json.loads(grant.body), grant.reservation.granted) == (json.loads(body), 16 + 10)
    embedding = await ledger.reserve(alice(tokens_per_day=1000), "/api/embed", b'{"input": "xyz"}')
    assert (embedding.body, embedding.reservation.granted) == (None, 17)  # only its prompt, as it was
    with pytest.raises(Rejection, match="must send a JSON object to /api/chat") as unreadable:
        await ledger.reserve(alice(tokens_per_day=1000), "/api/chat", b'{"prompt": "\xff"}')  # Go reads it
    assert unreadable.value.status == 400
    assert (await ledger.reserve(keys()[1], "/api/generate", body)).reservation is None  # bob: no quota


async def test_a_prompt_that_does_not_fit_is_refused_with_when_to_retry(io_loop):
    ledger = quotas()
    body = json.dumps({"prompt": "x" * 150}).encode()  # 66 tokens
    await ledger.reserve(alice(tokens_per_minute=100), "/api/generate", body)
    with pytest.raises(QuotaExceeded) as refused:
        await ledger.reserve(alice(tokens_per_minute=100), "/api/generate", body)
    error = refused.value
    assert (error.status, error.reason) == (429, "tokens_per_minute")
    assert error.message == "key 'alice' has used its tokens per minute (100); retry in 61 s"
    assert error.headers == {
        "Retry-After": "61",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m1s",
    }
    with pytest.raises(Rejection) as never:  # no wait makes it fit: 400, not a 429 to retry
        await ledger.reserve(alice(tokens_per_minute=100), "/api/generate", json.dumps({"prompt": "x" * 999}).encode())
    assert (type(never.value), never.value.status, never.value.headers) == (Rejection, 400, {})
    assert (
        never.value.message
        == "this request's prompt (about 349 tokens) is larger than the tokens per minute (100) of key 'alice'"
    )


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_a_storage_that_is_down_fails_as_the_rate_limits_do(io_loop, fail, caplog):
    ledger = quotas(rate_limit_storage=unused_url().replace("http", "redis"), rate_limit_fail=fail)
    body = json.dumps({"prompt": "x"}).encode()
    if fail == "open":
        grant = await ledger.reserve(alice(tokens_per_minute=100), "/api/generate", body)
        assert (grant.reservation, grant.body, grant.headers) == (None, None, {})
    else:
        with pytest.raises(QuotaExceeded) as refused:
            await ledger.reserve(alice(tokens_per_minute=100), "/api/generate", body)
        assert (refused.value.status, refused.value.reason, refused.value.headers) == (
            503,
            "storage",
            {"Retry-After": "1"},
        )
    assert "rate limit storage unavailable: token quotas" in caplog.text


async def test_a_correction_the_storage_cannot_take_is_logged(redis_server, caplog):
    ledger = quotas(rate_limit_storage=redis_server.url)
    grant = await ledger.reserve(alice(tokens_per_minute=100), "/api/generate", b'{"prompt": "x"}')
    assert ledger.calls.outage.began is None
    redis_server.stop()
    with caplog.at_level(logging.WARNING):
        grant.reservation.settle(5)
        await asyncio.wait(ledger.corrections)
    assert ledger.calls.outage.began is not None and not ledger.corrections


# -- through the proxy ----------------------------------------------------------------------


def hello(**options):
    """25 tokens reckoned: 15 characters (role and content), one message, the template."""
    return {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}], "options": options}


async def drained(proxy):
    """Every request has ended and its quota has been corrected."""
    await until(lambda: not proxy.proxy.exchanges and not proxy.proxy.quotas.corrections)


async def spend(proxy, tokens):
    """Alice has used `tokens` of her 100 a minute this minute."""
    await proxy.proxy.quotas.tokens.take(
        "alice", windows_of(keys(tokens_per_minute=100)[0]), tokens, tokens, int(time.time())
    )


def used(proxy, name="alice"):
    return sum(proxy.proxy.quotas.tokens.buckets.get(f"{name}:tokens_per_minute", {}).values())


async def test_a_quota_caps_the_output_tells_what_is_left_and_then_refuses_in_the_clients_shape(
    make_proxy, fake, nginx, http, log_lines
):
    proxy = make_proxy(api_keys=keys(tokens_per_minute=100))
    front = nginx(proxy, as_get=True)
    answer = await http.post(front + "/api/chat", json={**hello(num_predict=500), "stream": False}, headers=auth())
    assert answer.status_code == 200
    assert chats(fake)[0]["options"] == {"num_predict": 75}  # 100 less the prompt's 25: it stops in time
    assert counted(answer.json()) == (3, 75)
    assert {name: answer.headers[name] for name in answer.headers if name.startswith("x-ratelimit")} == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    await drained(proxy)
    assert used(proxy) == 78  # what Ollama counted, not what was reserved

    client = ollama.AsyncClient(host=front, headers=auth())
    with pytest.raises(ollama.ResponseError) as refused:
        await client.chat(**hello(num_predict=3))
    await client.close()
    assert refused.value.status_code == 429
    assert refused.value.error.startswith("key 'alice' has used its tokens per minute (100); retry in ")
    chat = openai.AsyncOpenAI(base_url=front + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused_v1:
        await chat.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert refused_v1.value.body["message"].startswith("key 'alice' has used its tokens per minute")
    assert 55 <= int(refused_v1.value.response.headers["Retry-After"]) <= 61
    assert len(chats(fake)) == 1  # the pod saw neither

    show = await http.post(front + "/api/show", json={"model": "llama3.2"}, headers=auth())
    assert show.status_code == 200 and "x-ratelimit-limit-tokens" not in show.headers  # no tokens to count
    other = await http.post(front + "/api/chat", json={**hello(num_predict=3), "stream": False}, headers=auth(OTHER))
    assert other.status_code == 200 and "x-ratelimit-limit-tokens" not in other.headers  # bob has no quota
    assert chats(fake)[1]["options"] == {"num_predict": 3}
    records = [line for line in log_lines() if line["message"] == "request"]
    assert [record["outcome"] for record in records] == ["ok", "rate_limited", "rate_limited", "ok", "ok"]
    metrics = (await http.get(proxy + "/_proxy/metrics", headers=auth())).text
    assert 'ollama_proxy_rate_limited_total{reason="tokens_per_minute",route="/api/chat"} 1.0' in metrics
    await chat.close()


async def test_forty_requests_at_once_through_two_proxies_sharing_redis_stay_within_the_quota(
    make_proxy, fake, redis_server, http
):
    # Redis given longer than its 0.5 s on a loaded machine: past it, a quota is not enforced.
    shared = {"rate_limit_storage": redis_server.url, "rate_limit_storage_timeout": 5}
    proxies = [make_proxy(api_keys=keys(tokens_per_minute=1000), **shared) for _ in range(2)]
    fake.token_delay = 0.001
    body = {**hello(num_predict=40), "stream": False}  # 65 reserved, 43 used
    answers = await asyncio.gather(
        *(http.post(proxies[n % 2] + "/api/chat", json=body, headers=auth()) for n in range(40))
    )
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {200, 429}
    spent = sum(
        answer.json()["prompt_eval_count"] + answer.json()["eval_count"]
        for answer in answers
        if answer.status_code == 200
    )
    # Reserved 65 each, settled to 43: at least what fits reserved (15 of 65; the last 25
    # hold no prompt and a token), more as earlier ones settle; never more than the quota.
    assert statuses.count(200) >= 15 and spent <= 1000
    assert len(chats(fake)) == statuses.count(200)


async def test_the_responses_and_messages_apis_are_charged_what_ollama_counted(make_proxy, http):
    proxy = make_proxy(api_keys=keys(tokens_per_minute=1000))
    asked = {
        "/v1/responses": {"input": "hello there", "max_output_tokens": 40},
        "/v1/messages": {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 40},
    }
    spent = 0
    for path, stream in itertools.product(asked, (False, True)):
        body = {"model": "llama3.2", "stream": stream, **asked[path]}
        answer = await http.post(proxy + path, json=body, headers=auth())
        assert answer.status_code == 200
        spent += sum(tokens_reported(path, answer.content, stream))
    await drained(proxy)
    assert used(proxy) == spent  # not what was reserved, nor a token per piece


async def test_a_stream_whose_client_leaves_is_charged_its_prompt_and_a_token_per_line(make_proxy, fake, log_lines):
    proxy = make_proxy(api_keys=keys(tokens_per_minute=1000))
    reader, writer = await send_json(
        proxy,
        b"POST",
        b"/api/chat",
        {**hello(num_predict=50), "model": "stall"},
        ALICE,
    )
    await reader.readuntil(b"\r\n\r\n")
    await reader.readuntil(b"\n")  # the stand-in's first token, then nothing until the client leaves
    writer.close()
    await drained(proxy)
    [record] = [line for line in log_lines() if line["message"] == "request"]
    assert record["outcome"] == "client_gone"
    assert used(proxy) == 25 + 1  # its prompt and the one line relayed


async def test_a_quota_keys_body_larger_than_hold_body_max_is_refused_before_it_is_read(make_proxy, fake, http):
    proxy = make_proxy(api_keys=keys(tokens_per_day=1000), hold_body_max=1000)
    big = {**hello(), "messages": [{"role": "user", "content": "x" * 2000}]}
    answer = await http.post(proxy + "/api/chat", json=big, headers=auth())
    assert (answer.status_code, answer.json()) == (
        413,
        {
            "error": "a request that a token quota counts may be at most hold_body_max (1000 bytes):"
            " its output could not be capped"
        },
    )
    assert (await http.post(proxy + "/api/chat", json=big, headers=auth(OTHER))).status_code == 200  # no quota
    assert len(chats(fake)) == 1


async def test_what_ollama_would_read_otherwise_than_the_proxy_does_is_not_a_way_around_the_cap(make_proxy, fake, http):
    proxy = make_proxy(api_keys=keys(tokens_per_minute=100))
    sneaky = {**hello(num_predict=5), "OPTIONS": {"num_predict": 5000}, "stream": False}  # Go takes either, the last
    assert (await http.post(proxy + "/api/chat", json=sneaky, headers=auth())).status_code == 200
    assert chats(fake)[0]["options"] == {"num_predict": 5} and "OPTIONS" not in chats(fake)[0]
    encoded = await http.post(proxy + "/api/%63hat", json={**hello(num_predict=5000), "stream": False}, headers=auth())
    assert encoded.status_code == 200  # Ollama's router decodes the path: it is /api/chat, and counted
    assert chats(fake)[1]["options"] == {"num_predict": 100 - 8 - 25}  # less the first one's 8, and its prompt
    unreadable = b'{"model": "llama3.2", "prompt": "\xff", "options": {"num_predict": 5000}}'  # Go reads it
    answer = await http.post(proxy + "/api/generate", content=unreadable, headers=auth())
    assert (answer.status_code, answer.json()) == (
        400,
        {"error": "a request that a token quota counts must send a JSON object to /api/generate"},
    )
    assert len(fake.seen) == 2


async def test_a_queued_request_is_reserved_when_its_turn_comes_and_a_refusal_frees_its_slot(pods, make_proxy, http):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}], api_keys=keys(tokens_per_minute=100))
    await ready(proxy)
    holder = {"model": "stall", "messages": [{"role": "user", "content": "holder"}]}
    reader, gate = await send_json(proxy, b"POST", b"/api/chat", holder, BOB)
    await reader.readuntil(b"\r\n\r\n")
    refused = asyncio.ensure_future(http.post(proxy + "/api/chat", json=hello(num_predict=3), headers=auth()))
    await until(lambda: proxy.proxy.queue.size == 1)
    await spend(proxy, 90)
    later = asyncio.ensure_future(http.post(proxy + "/api/chat", json=hello(num_predict=3), headers=auth(OTHER)))
    await until(lambda: proxy.proxy.queue.size == 2)
    assert used(proxy) == 90  # waiting reserves nothing
    gate.close()
    assert (await refused).status_code == 429  # its turn came, and its quota had no room
    assert (await later).status_code == 200  # the slot it would have had went to the next in line
    assert [json.loads(seen.body)["messages"][0]["content"] for seen in pod.state.seen if seen.path == "/api/chat"] == [
        "holder",
        "hello there",
    ]
    [member] = proxy.proxy.pool.members
    await until(lambda: member.busy == 0 and not proxy.proxy.exchanges)
    assert proxy.proxy.queue.running == {}


async def test_a_client_that_leaves_while_its_quota_is_reserved_is_charged_nothing(pods, make_proxy, monkeypatch):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}], api_keys=keys(tokens_per_minute=100))
    await ready(proxy)
    ledger = proxy.proxy.quotas.tokens
    take, entered, go_on = ledger.take, asyncio.Event(), asyncio.Event()

    async def slow_take(*arguments):
        entered.set()
        await go_on.wait()
        return await take(*arguments)

    monkeypatch.setattr(ledger, "take", slow_take)
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", hello(num_predict=3), ALICE)
    await entered.wait()
    writer.close()
    [member] = proxy.proxy.pool.members
    await until(lambda: not proxy.proxy.exchanges)
    assert member.busy == 0  # the slot kept for it went back as it ended
    go_on.set()
    await drained(proxy)
    assert used(proxy) == 0 and pod.state.seen == [seen for seen in pod.state.seen if seen.path != "/api/chat"]


async def test_each_keys_use_of_its_quota_is_on_the_status_page_for_its_operators_and_itself(make_proxy, fake, http):
    entries = [
        {"name": "alice", "key": KEY, "tokens_per_minute": 100, "tokens_per_day": 1000},
        {"name": "team", "key": OTHER, "shared": True, "tokens_per_day": 500},
        {"name": "ops", "key": "o" * 43},
        {"name": "carol", "key": "c" * 43, "scopes": ["inference", "metrics"]},
    ]
    proxy = make_proxy(api_keys=parse_entries(entries), trusted_proxies=("127.0.0.1",))
    answer = await http.post(proxy + "/api/chat", json={**hello(num_predict=5), "stream": False}, headers=auth())
    assert answer.status_code == 200
    await drained(proxy)
    remote = {"X-Forwarded-For": "203.0.113.7"}  # not this machine
    seen_by_ops = (await http.get(proxy + "/_proxy/status", headers={**auth("o" * 43), **remote})).json()
    assert seen_by_ops["quotas"] == [
        {"key": "alice", "window": "tokens_per_minute", "used": 8, "limit": 100},
        {"key": "alice", "window": "tokens_per_day", "used": 8, "limit": 1000},
        {"key": "team", "window": "tokens_per_day", "used": 0, "limit": 500},
    ]
    seen_by_team = (await http.get(proxy + "/_proxy/status", headers={**auth(OTHER), **remote})).json()
    assert seen_by_team["quotas"] == [{"key": "team", "window": "tokens_per_day", "used": 0, "limit": 500}]
    seen_by_carol = (await http.get(proxy + "/_proxy/status", headers={**auth("c" * 43), **remote})).json()
    assert seen_by_carol["quotas"] == []  # no quota of her own, and she does not manage the pod
    metrics = (await http.get(proxy + "/_proxy/metrics", headers=auth("o" * 43))).text
    assert 'ollama_proxy_key_tokens_total{key="alice",kind="prompt"} 3.0' in metrics
    assert 'ollama_proxy_key_tokens_total{key="alice",kind="completion"} 5.0' in metrics


async def test_the_status_shows_no_quotas_while_their_storage_is_down(make_proxy, http):
    proxy = make_proxy(api_keys=keys(tokens_per_minute=100), rate_limit_storage=unused_url().replace("http", "redis"))
    status = await http.get(proxy + "/_proxy/status", headers=auth())
    assert (status.status_code, status.json()["quotas"]) == (200, [])


async def test_a_refusal_lets_go_of_the_probe_a_pod_back_from_an_ejection_gave_it(pods, make_proxy, http):
    a, b = pods(2)
    b.state.models.add("onlyb")
    pool = [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]
    proxy = make_proxy(upstreams=pool, api_keys=keys(tokens_per_minute=100), pool_max_fails=1)
    await ready(proxy)
    member = proxy.proxy.pool.by_name["b"]
    member.health.failed("a reset", time.monotonic())
    member.health.ejected_until = time.monotonic()  # its ejection is over: the next request to it probes
    await spend(proxy, 100)
    only_b = {"model": "onlyb", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    assert (await http.post(proxy + "/api/chat", json=only_b, headers=auth())).status_code == 429
    assert member.health.state == "ejected"  # its probe is free again: not claimed by a request that never went
    assert (await http.post(proxy + "/api/chat", json=only_b, headers=auth(OTHER))).status_code == 200


async def test_a_quota_key_may_not_call_what_its_quota_cannot_count(make_proxy, fake, http):
    proxy = make_proxy(api_keys=keys(tokens_per_minute=100))
    message = "key 'alice' has a token quota, which does not count {}: a key with a quota may not call it"
    answer = await http.post(proxy + "/v1/audio/transcriptions", files={"file": b"RIFF"}, headers=auth())
    assert (answer.status_code, answer.json()["error"]["message"]) == (403, message.format("/v1/audio/transcriptions"))
    answer = await http.post(proxy + "/api/some-future-call", json={"prompt": "x"}, headers=auth())
    assert (answer.status_code, answer.json()) == (403, {"error": message.format("/api/some-future-call")})
    assert (await http.get(proxy + "/api/tags", headers=auth())).status_code == 200  # reads are free
    assert (
        await http.post(proxy + "/api/pull", json={"model": "x", "stream": False}, headers=auth())
    ).status_code == 200
    assert [seen.path for seen in fake.seen] == ["/api/tags", "/api/pull"]
    bob = await http.post(proxy + "/api/some-future-call", json={}, headers=auth(OTHER))
    assert bob.status_code == 404  # no quota: forwarded, and Ollama's answer


def test_quotas_need_a_storage_they_can_use_and_say_when_each_worker_keeps_its_own(caplog):
    quota_keys = keys(tokens_per_minute=100)
    with pytest.raises(SettingsError, match=re.escape("token quotas keep their windows in memory:// or redis://")):
        make_app(Settings(api_keys=quota_keys, rate_limit_storage="redis+sentinel://127.0.0.1:26379/main"))
    with caplog.at_level(logging.WARNING):
        make_app(Settings(host="127.0.0.1", api_keys=quota_keys, workers=2))
        make_app(Settings(host="127.0.0.1", api_keys=keys(), workers=2))  # no quota: nothing to say
    [warning] = [record.getMessage() for record in caplog.records if "token quotas" in record.getMessage()]
    assert (
        warning
        == "token quotas in memory are each worker's own: with 2 workers a key may use that many times its quota"
    )


# The SDK stops reading at "data: [DONE]" and closes the response, which leaves httpx's and
# httpcore's body iterators suspended; Python 3.13 then reports their finalisation as unraisable.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object"
    " (HTTP11ConnectionByteStream|AsyncHTTP11Connection|AsyncResponseStream)"
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_a_v1_stream_is_counted_by_the_usage_the_proxy_asks_for_and_its_client_never_sees(make_proxy, fake, http):
    proxy = make_proxy(api_keys=keys(tokens_per_minute=1000))
    chat = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "hello there"}]
    async with await chat.chat.completions.create(model="llama3.2", messages=messages, stream=True) as stream:
        chunks = [chunk async for chunk in stream]
    assert [chunk.choices[0].delta.content for chunk in chunks] == ["Hel", "lo"]  # each has its choice
    assert chats(fake)[0]["stream_options"] == {"include_usage": True}
    await drained(proxy)
    assert used(proxy) == 3 + 2  # what Ollama counted
    asking = {"include_usage": True}
    async with await chat.chat.completions.create(
        model="llama3.2", messages=messages, stream=True, stream_options=asking
    ) as asked:
        chunks = [chunk async for chunk in asked]
    assert [chunk.usage.completion_tokens for chunk in chunks if chunk.usage] == [2]  # its own: it gets it
    await chat.close()
    await drained(proxy)
    assert used(proxy) == 2 * (3 + 2)


async def test_a_usage_event_that_arrives_alone_sends_the_client_nothing(make_proxy, fake):
    fake.lockstep = asyncio.Queue()  # each event goes when the test says
    proxy = make_proxy(api_keys=keys(tokens_per_minute=1000))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}], "stream": True}
    reader, writer = await send_json(proxy, b"POST", b"/v1/chat/completions", body, ALICE)
    for lines in (2, 4, 6):  # two events of content, then the usage event: each a piece of its own
        fake.lockstep.put_nowait(None)
        await until(lambda lines=lines: any(journey.relay.lines == lines for journey in proxy.proxy.exchanges))
    fake.lockstep.put_nowait(None)  # [DONE]
    status, _, answer = await read_response(reader)
    events = answer.split(b"\n\n")
    assert status == 200 and len(events) == 4 and events[-2:] == [b"data: [DONE]", b""]  # no usage event
    assert [json.loads(event[6:])["choices"][0]["delta"]["content"] for event in events[:2]] == ["Hel", "lo"]
    writer.close()


CONTENT_EVENT = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
)
USAGE_EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,'
USAGE_EVENT += b'"completion_tokens":1,"total_tokens":4}}\n\n'
DONE_EVENT = b"data: [DONE]\n\n"
STREAMED_CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}], "stream": True}


def event_stream(*pieces: bytes, pause: asyncio.Event | None = None) -> ScriptedUpstream:
    """An upstream that answers with `pieces` as chunks of an event stream, each read
    apart; at an empty piece it waits for `pause`, as the network may."""

    async def script(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(re.search(rb"(?i)content-length: (\d+)", head)[1]))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            if not piece:
                await writer.drain()
                await pause.wait()
            else:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    return ScriptedUpstream(script)


async def test_a_usage_event_split_across_two_pieces_still_never_reaches_the_client(make_proxy):
    first_half_in = asyncio.Event()  # the network split the usage event: its end comes later
    upstream = event_stream(CONTENT_EVENT, USAGE_EVENT[:40], b"", USAGE_EVENT[40:], DONE_EVENT, pause=first_half_in)
    proxy = make_proxy(upstream=await upstream.start(), api_keys=keys(tokens_per_minute=1000))
    reader, writer = await send_json(proxy, b"POST", b"/v1/chat/completions", STREAMED_CHAT, ALICE)
    await until(lambda: any(journey.record.bytes_out == len(CONTENT_EVENT) + 40 for journey in proxy.proxy.exchanges))
    first_half_in.set()
    status, _, answer = await read_response(reader)
    assert (status, answer) == (200, CONTENT_EVENT + DONE_EVENT)  # every byte but the usage event's
    await drained(proxy)
    assert used(proxy) == 4  # counted by it all the same
    writer.close()
    await upstream.stop()


@pytest.mark.parametrize(
    "last, relayed",
    [
        (DONE_EVENT[:-2], DONE_EVENT[:-2]),  # no blank line after the last event: it goes on as it came
        (DONE_EVENT[:-1], DONE_EVENT[:-1]),
        (USAGE_EVENT[:-2], b""),  # the usage event, all the same, does not
        (USAGE_EVENT[:40], b""),  # nor a line cut short, which may have been it
        (USAGE_EVENT[:-1] + DONE_EVENT[:-1], DONE_EVENT[:-1]),  # lines apart: the usage line alone is left out
    ],
)
async def test_a_stream_that_ends_inside_an_event_loses_nothing_but_the_usage_event(make_proxy, last, relayed):
    upstream = event_stream(CONTENT_EVENT, last)
    proxy = make_proxy(upstream=await upstream.start(), api_keys=keys(tokens_per_minute=1000))
    reader, writer = await send_json(proxy, b"POST", b"/v1/chat/completions", STREAMED_CHAT, ALICE)
    status, _, answer = await read_response(reader)
    assert (status, answer) == (200, CONTENT_EVENT + relayed)
    writer.close()
    await upstream.stop()


async def test_an_alias_that_generates_is_charged_what_ollama_counted(make_proxy, fake, http):
    proxy = make_proxy(api_keys=keys(tokens_per_minute=1000))
    body = {"model": "llama3.2", "prompt": "hello there", "options": {"num_predict": 9}, "stream": False}
    answer = await http.post(proxy + "/api/stop", json=body, headers=auth())  # keep_alive 0, and a generation
    assert answer.status_code == 200 and answer.json()["eval_count"] == 9
    await drained(proxy)
    assert used(proxy) == 3 + 9  # Ollama's counts, not the prompt's estimate alone


async def test_a_body_of_too_many_values_to_weigh_at_once_is_refused_before_it_is_parsed(io_loop):
    ledger = quotas()
    crowded = b'{"prompt": "x", "context": [' + b"0," * (1 << 18) + b"0]}"
    with pytest.raises(Rejection) as refused:
        await ledger.reserve(alice(tokens_per_minute=10**9), "/api/generate", crowded)
    assert (refused.value.status, refused.value.message) == (
        413,
        "a request that a token quota counts may hold at most 262144 JSON values",
    )


async def test_an_answer_the_pod_sized_or_encoded_is_relayed_as_it_came(make_proxy):
    events = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(events)
    canned = CannedUpstream(head + events, linger=True)
    proxy = make_proxy(upstream=await canned.start(), api_keys=keys(tokens_per_minute=1000))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    reader, writer = await send_json(proxy, b"POST", b"/v1/chat/completions", body, ALICE)
    status, headers, answer = await read_response(reader)
    assert (status, headers["content-length"], answer) == (200, [str(len(events))], events)  # not a byte less
    assert b"Accept-Encoding: identity\r\n" in canned.requests[0]  # nothing compressed: its counts are read
    writer.close()
    await canned.stop()


async def test_forty_requests_at_once_through_two_worker_processes_sharing_redis_stay_within_the_quota(
    launch, upstream_url, fake, redis_server
):
    fake.token_delay = 0.001
    env = {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "OLLAMA_PROXY_API_KEYS": json.dumps([{"name": "alice", "key": KEY, "tokens_per_minute": 1000}]),
        "OLLAMA_PROXY_RATE_LIMIT_STORAGE": redis_server.url,
        "OLLAMA_PROXY_RATE_LIMIT_STORAGE_TIMEOUT": "5",  # as above: not an outage on a loaded machine
        "OLLAMA_PROXY_WORKERS": "2",
    }
    parent = launch(env)
    address = (await read_log(parent, "starting workers"))["address"]
    workers = {(await read_log(parent, "listening"))["pid"] for _ in range(2)}
    connections = await asyncio.gather(*(asyncio.open_connection(*host_port(address)) for _ in range(40)))
    held_by = []
    for reader, writer in connections:  # which worker holds each connection
        writer.write(b"GET /_proxy/status HTTP/1.1\r\nHost: x\r\n" + ALICE + b"\r\n")
        held_by.append(json.loads((await read_response(reader))[2])["worker"]["pid"])
    assert set(held_by) == workers  # both workers reserve from the one quota
    body = json.dumps({**hello(num_predict=40), "stream": False}).encode()  # 65 reserved, 43 used
    head = b"POST /api/chat HTTP/1.1\r\nHost: x\r\n" + ALICE + b"Content-Length: %d\r\n\r\n" % len(body)
    for _, writer in connections:
        writer.write(head + body)
    answers = await asyncio.gather(*(read_response(reader) for reader, _ in connections))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 429}
    spent = sum(sum(counted(json.loads(body))) for status, _, body in answers if status == 200)
    assert statuses.count(200) >= 15 and spent <= 1000  # one quota for both processes
    assert len(chats(fake)) == statuses.count(200)
    for _, writer in connections:
        writer.close()
    parent.send_signal(signal.SIGTERM)
    await read_log(parent, "workers stopped")
