"""Busy pods shared fairly: generations wait in the proxy for a free slot, each requester
in its own line, served by tokens and weight; bounded lines with clear answers; a wait
that is not silence."""

import asyncio
import hashlib
import json
import logging
import time

import ollama
import pytest

from tornado_ollama_proxy.app import make_app
from tornado_ollama_proxy.auth import KeyEntryError, parse_entries, parse_key_file
from tornado_ollama_proxy.fair_queue import TICK, estimate, requester_of
from tornado_ollama_proxy.settings import Settings
from tornado_ollama_proxy.usage import read_request

from .helpers import parse_metrics, read_response, ready, scrape, send_json, until, value

KEYS = {name: name[0] * 43 for name in ("alice", "bob", "carol")}
CAROL = f"Authorization: Bearer {KEYS['carol']}\r\n".encode()


def keys(**weights):
    return parse_entries(
        [
            {"name": name, "key": key, **({"weight": weights[name]} if name in weights else {})}
            for name, key in KEYS.items()
        ]
    )


def client(front, name):
    return ollama.AsyncClient(host=front, headers={"Authorization": f"Bearer {KEYS[name]}"})


def order(state):
    """Who each generation the stand-in ran was for, in the order they arrived there."""
    bodies = [json.loads(seen.body) for seen in state.seen if seen.path == "/api/chat"]
    return [body["messages"][0]["content"].split()[0] for body in bodies if body["model"] != "stall"]


def chat(who, n, words=1, **more):
    return {"model": "llama3.2", "messages": [{"role": "user", "content": f"{who} {n} " + "x " * words}], **more}


async def queued(proxy, count):
    try:
        await until(lambda: proxy.proxy.queue.size == count)
    except AssertionError:
        raise AssertionError(proxy.proxy.queue.size, len(proxy.proxy.exchanges)) from None


# -- the estimate and the lines, alone ---------------------------------------------------------


@pytest.mark.parametrize(
    "data, openai, tokens",
    [
        (None, False, 256),
        ({"prompt": "x" * 400}, False, 100 + 256),
        ({"prompt": "x" * 400, "options": {"num_predict": 10}}, False, 110),
        ({"prompt": "x" * 400, "max_tokens": 10}, False, 100 + 256),  # not /api/*'s: Ollama ignores it
        ({"messages": [{"role": "user", "content": "x" * 40}, "odd"], "max_tokens": 5}, True, 15),
        ({"messages": [{"content": [{"type": "text", "text": "x" * 80}, {"type": "image_url"}]}]}, True, 20 + 256),
        ({"input": ["x" * 40, "y" * 40], "max_completion_tokens": 1}, True, 21),
        ({"input": [{"role": "user", "content": [{"text": "x" * 8}, "odd"]}], "max_output_tokens": 2}, True, 4),
        ({"instructions": "x" * 8, "input": "y" * 8, "max_output_tokens": 2, "options": {"num_predict": 9}}, True, 6),
        ({"system": "x" * 4, "prompt": "y" * 4, "options": {"num_predict": -1}}, False, 2 + 256),
        ({"prompt": "x", "options": {"num_predict": True}}, False, 256),
        ({"prompt": 5, "messages": "no", "options": "no", "input": [[["deep"]]]}, False, 256),
        ({"max_tokens": 10**400}, True, 1 << 20),  # no estimate past a million tokens
    ],
)
def test_a_generation_is_estimated_by_its_prompt_and_the_output_its_api_asks_for(data, openai, tokens):
    body = None if data is None else json.dumps(data).encode()
    assert estimate(read_request(body).asks, len(body or b""), 256, openai) == tokens


def test_a_body_too_large_to_read_or_not_json_is_estimated_by_its_size():
    large = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    assert estimate(read_request(large).asks, len(large), 256, False) == len(large) // 4 + 256
    assert estimate(read_request(b"not json").asks, 8, 256, False) == 2 + 256


def test_each_requester_has_its_own_line():
    assert requester_of("alice", "10.0.0.1", False) == "key:alice"
    assert requester_of("generated", "10.0.0.1", True) == "key:generated@10.0.0.1"
    assert requester_of(None, "10.0.0.1", False) == "address:10.0.0.1"
    # One machine may hold a whole IPv6 /64: it is one requester, not 2**64.
    assert requester_of(None, "2001:db8::1", False) == requester_of(None, "2001:db8::ffff:2", False)
    assert requester_of(None, "2001:db8::1", False) == "address:2001:db8::/64"
    assert requester_of("team", "2001:db8::1", True) == "key:team@2001:db8::/64"
    assert requester_of(None, "unix-socket", False) == "address:unix-socket"
    assert requester_of(None, "not:an:address", False) == "address:not:an:address"


# -- through the front, with the official client ----------------------------------------------


async def test_a_second_key_waits_for_at_most_one_of_the_firsts_twenty(pods, make_proxy, nginx):
    [pod] = pods(1, slots=1, token_delay=0.02)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}], api_keys=keys())
    await ready(proxy)
    front = nginx(proxy, as_get=True)
    alice, bob = client(front, "alice"), client(front, "bob")
    flood = [asyncio.ensure_future(alice.chat(**chat("alice", n))) for n in range(20)]
    await queued(proxy, 19)
    late = [asyncio.ensure_future(bob.chat(**chat("bob", n))) for n in range(2)]
    await asyncio.gather(*flood, *late)
    ran = order(pod.state)
    assert ran.index("bob") <= 2  # alice's first was running; at most one more of hers went first
    assert pod.state.most_running == 1  # the pod never ran two at once: the rest waited in the proxy
    await alice.close()
    await bob.close()


async def test_weights_share_a_busy_pod_by_tokens(pods, make_proxy, nginx):
    [pod] = pods(1, slots=1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}], api_keys=keys(alice=3))
    await ready(proxy)
    front = nginx(proxy, as_get=True)
    alice, bob = client(front, "alice"), client(front, "bob")
    gate = await hold_the_slot(proxy, CAROL)
    waiting = [asyncio.ensure_future(alice.chat(**chat("alice", n))) for n in range(30)]
    waiting += [asyncio.ensure_future(bob.chat(**chat("bob", n))) for n in range(30)]
    await queued(proxy, 60)
    gate.close()
    await asyncio.gather(*waiting)
    first = order(pod.state)[:40]
    assert 28 <= first.count("alice") <= 32  # 3:1, within 10 %
    await alice.close()
    await bob.close()


async def test_a_key_sending_prompts_ten_times_longer_gets_a_tenth_of_the_requests(pods, make_proxy, nginx):
    [pod] = pods(1, slots=1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}], api_keys=keys())
    await ready(proxy)
    front = nginx(proxy, as_get=True)
    alice, bob = client(front, "alice"), client(front, "bob")
    gate = await hold_the_slot(proxy, CAROL)
    options = {"num_predict": 1}
    waiting = [asyncio.ensure_future(alice.chat(**chat("alice", n, 1000), options=options)) for n in range(10)]
    waiting += [asyncio.ensure_future(bob.chat(**chat("bob", n, 100), options=options)) for n in range(30)]
    await queued(proxy, 40)
    gate.close()
    await asyncio.gather(*waiting)
    first = order(pod.state)[:22]
    assert first.count("alice") in (2, 3)  # about one in eleven
    await alice.close()
    await bob.close()


async def hold_the_slot(proxy, headers=b""):
    """A generation that takes the one slot until its connection is closed."""
    holder = {"model": "stall", "messages": [{"role": "user", "content": "holder"}]}
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", holder, headers)
    await reader.readuntil(b"\r\n\r\n")
    return writer


async def test_a_request_for_a_free_model_waits_for_no_request_for_a_busy_one(pods, make_proxy, http):
    a, b = pods(2, slots=1)
    a.state.models = {"stall", "llama3.2"}
    b.state.models = {"qwen"}
    proxy = make_proxy(upstreams=[{"name": "a", "url": a.url, "slots": 1}, {"name": "b", "url": b.url, "slots": 1}])
    await ready(proxy)
    gate = await hold_the_slot(proxy)
    waiting = [
        asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("me", n, stream=False))) for n in range(3)
    ]
    await queued(proxy, 3)
    other = await http.post(proxy + "/api/chat", json={**chat("me", 9, stream=False), "model": "qwen"})
    assert (other.status_code, other.headers["x-ollama-upstream"]) == (200, "b")  # past its own three, at once
    gate.close()
    assert [answer.status_code for answer in await asyncio.gather(*waiting)] == [200] * 3


async def test_a_request_waiting_when_its_pods_are_ejected_gets_the_pools_502_not_the_rest_of_its_wait(
    pods, make_proxy, http
):
    a, b = pods(2, slots=1)
    proxy = make_proxy(
        upstreams=[{"name": "a", "url": a.url, "slots": 1}, {"name": "b", "url": b.url, "slots": 1}],
        pool_max_fails=1,
        pool_eject_seconds=60,
        queue_timeout=30,
    )
    await ready(proxy)
    gates = [await hold_the_slot(proxy), await hold_the_slot(proxy)]  # a slot at each pod
    waiting = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("me", 1, stream=False)))
    await queued(proxy, 1)
    started = time.monotonic()
    await asyncio.gather(a.kill(), b.kill())  # the generations at both fail, and eject them
    answer = await waiting
    assert answer.status_code == 502 and answer.json()["error"].startswith("no upstream can take the request")
    assert all(member.health.state == "ejected" for member in proxy.proxy.pool.members)
    assert time.monotonic() - started < 10 * TICK  # at its next look, not after queue_timeout
    assert proxy.proxy.queue.size == 0
    for gate in gates:
        gate.close()


async def test_a_proxy_that_stops_while_requests_wait_leaves_no_look_for_slots_running(pods, make_proxy, http):
    [pod] = pods(1, slots=1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}])
    await ready(proxy)
    gate = await hold_the_slot(proxy)
    waiting = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("me", 1, stream=False)))
    await queued(proxy, 1)
    queue = proxy.proxy.queue
    looking = queue._ticking
    await queue.close()
    assert looking is not None and looking.cancelled()
    gate.close()
    waiting.cancel()


async def test_full_lines_are_answered_at_once_in_the_clients_shape(pods, make_proxy, http):
    [pod] = pods(1, slots=1)
    proxy = make_proxy(
        upstreams=[{"name": "a", "url": pod.url, "slots": 1}], api_keys=keys(), queue_max=3, queue_max_per_key=2
    )
    await ready(proxy)
    bearer = {name: {"Authorization": f"Bearer {key}"} for name, key in KEYS.items()}
    gate = await hold_the_slot(proxy, CAROL)
    alices = [
        asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("alice", n), headers=bearer["alice"]))
        for n in range(2)
    ]
    await queued(proxy, 2)
    mine = await http.post(proxy + "/api/chat", json=chat("alice", 3), headers=bearer["alice"])
    assert (mine.status_code, mine.headers["retry-after"]) == (429, "5")
    assert mine.json() == {"error": "2 of your requests wait for a free slot already (queue_max_per_key)"}
    bobs = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("bob", 1), headers=bearer["bob"]))
    await queued(proxy, 3)
    full = await http.post(
        proxy + "/v1/chat/completions",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
        headers=bearer["carol"],
    )
    assert (full.status_code, full.headers["retry-after"]) == (503, "10")
    error = full.json()["error"]
    assert (error["message"], error["type"]) == ("3 requests wait for a free slot already (queue_max)", "api_error")
    gate.close()
    assert [answer.status_code for answer in await asyncio.gather(*alices, bobs)] == [200] * 3
    samples = parse_metrics((await http.get(proxy + "/_proxy/metrics", headers=bearer["carol"])).text)
    assert value(samples, "ollama_proxy_queue_refused_total", reason="full_per_key") == 1
    assert value(samples, "ollama_proxy_queue_refused_total", reason="full") == 1
    assert value(samples, "ollama_proxy_queue_depth") == 0


async def test_a_client_that_leaves_while_queued_never_reaches_the_pod(pods, make_proxy, log_lines):
    [pod] = pods(1, slots=1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}])
    await ready(proxy)
    gate = await hold_the_slot(proxy)
    _, writer = await send_json(proxy, b"POST", b"/api/chat", chat("gone", 1))
    await queued(proxy, 1)
    writer.close()
    await queued(proxy, 0)  # out of line at once
    gate.close()
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", chat("next", 1, stream=False))
    status, _, _ = await read_response(reader)
    assert status == 200 and order(pod.state) == ["next"]  # "gone" never came
    records = [line for line in log_lines() if line["message"] == "request" and line["route"] == "/api/chat"]
    [left] = [record for record in records if record["outcome"] == "client_gone" and record["upstream"] is None]
    assert left["queued_ms"] > 0 and left["attempts"] == 0
    writer.close()


async def test_a_wait_longer_than_the_fronts_patience_is_bridged_by_heartbeats(pods, make_proxy, nginx, log_lines):
    [pod] = pods(1, slots=1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}], heartbeat_seconds=0.25)
    await ready(proxy)
    front = nginx(proxy, as_get=True, read_timeout=1)  # gives up after 1 s without a byte
    gate = await hold_the_slot(proxy)
    asker = ollama.AsyncClient(host=front)
    waiting = asyncio.ensure_future(asker.chat(**chat("patient", 1)))
    await queued(proxy, 1)
    await asyncio.sleep(2.5)  # queued for more than twice the front's patience
    gate.close()
    answer = await waiting
    assert answer.message.content == "tok0 tok1 tok2 "
    [record] = [line for line in log_lines() if line["message"] == "request" and line["model"] == "llama3.2"]
    assert record["status"] == 200 and record["heartbeats"] > 0 and record["queued_ms"] >= 2500
    await asker.close()


async def test_a_wait_past_queue_timeout_is_503_or_in_band_after_a_heartbeat(pods, make_proxy):
    [pod] = pods(1, slots=1)
    upstreams = [{"name": "a", "url": pod.url, "slots": 1}]
    quiet = make_proxy(upstreams=upstreams, queue_timeout=0.3, heartbeat_seconds=None)
    await ready(quiet)
    gate = await hold_the_slot(quiet)
    reader, writer = await send_json(quiet, b"POST", b"/api/chat", chat("late", 1))
    status, headers, body = await read_response(reader)
    assert (status, headers["retry-after"]) == (503, ["10"])
    assert json.loads(body) == {"error": "no slot came free within 0.3 s (queue_timeout): the pods are busy"}
    gate.close()
    writer.close()
    beating = make_proxy(upstreams=upstreams, queue_timeout=0.5, heartbeat_seconds=0.1)
    await ready(beating)
    gate = await hold_the_slot(beating)
    reader, writer = await send_json(beating, b"POST", b"/api/chat", chat("late", 2))
    status, _, body = await read_response(reader)
    assert status == 200  # the heartbeat's head
    message = "no slot came free within 0.5 s (queue_timeout): the pods are busy"
    assert json.loads(body.strip().splitlines()[-1]) == {"error": message}
    gate.close()
    writer.close()


async def test_the_queue_is_visible_in_the_status_and_the_metrics(pods, make_proxy, http):
    [pod] = pods(1, slots=1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}])
    await ready(proxy)
    gate = await hold_the_slot(proxy)
    waiting = [
        asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("me", n, stream=False))) for n in range(2)
    ]
    await queued(proxy, 2)
    status = (await http.get(proxy + "/_proxy/status")).json()
    [line] = status["queues"]
    assert (line["requester"], line["waiting"]) == ("address:127.0.0.1", 2) and line["longest_wait_s"] >= 0
    samples = await scrape(http, proxy)
    assert value(samples, "ollama_proxy_queue_depth") == 2
    gate.close()
    await asyncio.gather(*waiting)
    samples = await scrape(http, proxy)
    assert value(samples, "ollama_proxy_queue_wait_seconds_count") == 3  # the slot's holder too, at 0
    assert (await http.get(proxy + "/_proxy/status")).json()["queues"] == []
    assert proxy.proxy.queue.finish == {} and proxy.proxy.queue.running == {}  # nothing kept of who asked


async def test_a_request_that_fails_to_start_in_its_turn_is_answered_and_the_line_goes_on(
    pods, make_proxy, http, monkeypatch
):
    from tornado_ollama_proxy.journey import Journey

    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}])
    await ready(proxy)
    gate = await hold_the_slot(proxy)
    broken = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("broken", 1, stream=False)))
    await queued(proxy, 1)
    fine = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("fine", 1, stream=False)))
    await queued(proxy, 2)
    attempt = Journey._attempt

    def fails_once(journey, member, **body):
        monkeypatch.setattr(Journey, "_attempt", attempt)
        raise RuntimeError("a bug")

    monkeypatch.setattr(Journey, "_attempt", fails_once)
    gate.close()
    assert (await broken).status_code == 500
    assert (await fine).status_code == 200 and order(pod.state) == ["fine"]


async def test_a_shared_keys_holders_see_no_addresses_in_the_queue(pods, make_proxy, http):
    [pod] = pods(1)
    keys = parse_entries([{"name": "ops", "key": "o" * 43}, {"name": "team", "key": "t" * 43, "shared": True}])
    proxy = make_proxy(
        upstreams=[{"name": "a", "url": pod.url, "slots": 1}], api_keys=keys, trusted_proxies=("127.0.0.1",)
    )
    await ready(proxy)
    team = {"Authorization": "Bearer " + "t" * 43, "X-Forwarded-For": "203.0.113.5"}  # from elsewhere
    gate = await hold_the_slot(proxy, b"Authorization: Bearer " + b"t" * 43 + b"\r\n")
    waiting = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("me", 1, stream=False), headers=team))
    await queued(proxy, 1)
    seen_by_team = (await http.get(proxy + "/_proxy/status", headers=team)).json()
    ops = {"Authorization": "Bearer " + "o" * 43, "X-Forwarded-For": "203.0.113.9"}
    seen_by_ops = (await http.get(proxy + "/_proxy/status", headers=ops)).json()
    assert [line["requester"] for line in seen_by_team["queues"]] == ["key"]
    assert [row["client"] for row in seen_by_team["in_flight"]] == [None, None]
    assert [line["requester"] for line in seen_by_ops["queues"]] == ["key:team@203.0.113.5"]
    gate.close()
    assert (await waiting).status_code == 200


async def test_queued_bodies_are_bounded_in_bytes_per_requester_and_in_all(pods, make_proxy, http, monkeypatch):
    from tornado_ollama_proxy import fair_queue

    monkeypatch.setattr(fair_queue, "QUEUE_BYTES_PER_REQUESTER", 3000)
    monkeypatch.setattr(fair_queue, "QUEUE_BYTES", 5000)
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}], api_keys=keys())
    await ready(proxy)
    bearer = {name: {"Authorization": f"Bearer {key}"} for name, key in KEYS.items()}
    gate = await hold_the_slot(proxy, CAROL)
    body = chat("alice", 1, 1000)  # about 2 KB
    first = asyncio.ensure_future(http.post(proxy + "/api/chat", json=body, headers=bearer["alice"]))
    await queued(proxy, 1)
    second = await http.post(proxy + "/api/chat", json=body, headers=bearer["alice"])
    assert (second.status_code, second.json()) == (429, {"error": "your requests waiting for a free slot hold 0 MiB"})
    bobs = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("bob", 1, 1000), headers=bearer["bob"]))
    await queued(proxy, 2)
    third = await http.post(proxy + "/api/chat", json=chat("carol", 1, 1000), headers=bearer["carol"])
    assert third.status_code == 503 and third.json()["error"].startswith("the requests waiting for a free slot hold")
    gate.close()
    assert [answer.status_code for answer in await asyncio.gather(first, bobs)] == [200, 200]


async def test_a_slot_that_comes_free_elsewhere_is_found_without_a_generation_ending_here(pods, make_proxy, http):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}])
    await ready(proxy)
    [member] = proxy.proxy.pool.members
    member.others_busy = 1  # another process's generation, as the shared load tells it
    waiting = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("me", 1, stream=False)))
    await queued(proxy, 1)
    member.others_busy = 0  # it ended there: nothing ends here to say so
    answer = await waiting  # found within a second by the queue's own look
    assert answer.status_code == 200 and order(pod.state) == ["me"]


async def test_a_client_that_leaves_after_its_turn_came_lets_its_pod_go(pods, make_proxy):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 1}])
    await ready(proxy)
    gate = await hold_the_slot(proxy)
    waiter = {"model": "stall", "messages": [{"role": "user", "content": "second"}]}
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", waiter)
    await queued(proxy, 1)
    gate.close()
    await reader.readuntil(b"\r\n\r\n")  # its turn came: the pod is answering it
    writer.close()
    [member] = proxy.proxy.pool.members
    await until(lambda: member.busy == 0 and not proxy.proxy.exchanges)
    assert proxy.proxy.queue.running == {} and proxy.proxy.queue.size == 0


# -- a key's generations at once (max_concurrent) ------------------------------------------------

ALICE = f"Authorization: Bearer {KEYS['alice']}\r\n".encode()


def limited(max_concurrent, **more):
    """alice with `max_concurrent`, bob and carol without."""
    return parse_entries(
        [
            {"name": name, "key": key, **({"max_concurrent": max_concurrent} if name == "alice" else {}), **more}
            for name, key in KEYS.items()
        ]
    )


async def test_a_key_with_max_concurrent_runs_that_many_at_once_and_others_do_not_wait(pods, make_proxy, nginx):
    [pod] = pods(1)
    # No slots at the pod: only alice's own limit makes anything wait.
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url}], api_keys=limited(2))
    await ready(proxy)
    front = nginx(proxy, as_get=True)
    holders = [await hold_the_slot(proxy, ALICE) for _ in range(2)]
    alice, bob = client(front, "alice"), client(front, "bob")
    third = asyncio.ensure_future(alice.chat(**chat("alice", 3)))
    await queued(proxy, 1)
    answer = await bob.chat(**chat("bob", 1))  # bob has no limit: past alice's line at once
    assert answer.message.content and proxy.proxy.queue.size == 1 and not third.done()
    holders[0].close()  # one of alice's two ends: her third goes
    assert (await third).done
    assert order(pod.state) == ["bob", "alice"] and pod.state.most_running == 3
    holders[1].close()
    await until(lambda: not proxy.proxy.exchanges)
    assert proxy.proxy.queue.keys_running == {}  # nothing kept per key once its generations end
    await alice.close()
    await bob.close()


async def test_max_concurrent_holds_beside_the_pods_slots_and_its_key_keeps_its_turn(pods, make_proxy, http):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": 2}], api_keys=limited(1))
    await ready(proxy)
    bearer = {name: {"Authorization": f"Bearer {key}"} for name, key in KEYS.items()}
    holder = await hold_the_slot(proxy, ALICE)  # alice's one; a slot is left
    second = asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat("alice", 2), headers=bearer["alice"]))
    await queued(proxy, 1)
    # The free slot goes to bob, whose turn it is not, while alice may run no more.
    bobs = await http.post(proxy + "/api/chat", json=chat("bob", 1, stream=False), headers=bearer["bob"])
    assert bobs.status_code == 200 and not second.done()
    holder.close()
    assert (await second).status_code == 200 and order(pod.state) == ["bob", "alice"]


async def test_a_wait_for_a_keys_own_generations_past_queue_timeout_is_429(pods, make_proxy, http):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url}], api_keys=limited(1), queue_timeout=0.3)
    await ready(proxy)
    holder = await hold_the_slot(proxy, ALICE)
    late = await http.post(
        proxy + "/v1/chat/completions",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
    )
    assert (late.status_code, late.headers["retry-after"]) == (429, "5")
    message = "none of your key's 1 generations at once (max_concurrent) ended within 0.3 s (queue_timeout)"
    assert late.json()["error"]["message"] == message
    samples = parse_metrics((await http.get(proxy + "/_proxy/metrics", headers=bearer_of("carol"))).text)
    assert value(samples, "ollama_proxy_queue_refused_total", reason="max_concurrent") == 1
    holder.close()


async def test_a_keys_generation_too_large_to_wait_is_413_and_other_calls_stream(pods, make_proxy, http):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url}], api_keys=limited(1), hold_body_max=1000)
    await ready(proxy)
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}
    large = await http.post(proxy + "/api/chat", json=chat("alice", 1, 1000), headers=alice)
    assert large.status_code == 413
    bound = "may be at most hold_body_max (1000 bytes)"
    assert large.json() == {"error": f"a generation of a key with max_concurrent {bound}: it could not wait its turn"}
    blob = "sha256:" + hashlib.sha256(b"x" * 5000).hexdigest()
    assert (await http.post(proxy + f"/api/blobs/{blob}", content=b"x" * 5000, headers=alice)).status_code == 201
    bobs = await http.post(proxy + "/api/chat", json=chat("bob", 1, 1000, stream=False), headers=bearer_of("bob"))
    assert bobs.status_code == 200  # no limit: it streams past the queue as before
    assert order(pod.state) == ["bob"]


def bearer_of(name):
    return {"Authorization": f"Bearer {KEYS[name]}"}


def test_max_concurrent_is_a_key_entrys_and_a_key_file_lines_and_each_workers_own(caplog):
    [alice] = parse_entries([{"name": "alice", "key": KEYS["alice"], "max_concurrent": 3}])
    [bob] = parse_key_file(f"bob:{KEYS['bob']}:max_concurrent=2,weight=2", "keys.txt")
    assert (alice.max_concurrent, bob.max_concurrent, bob.weight) == (3, 2, 2.0)
    with pytest.raises(KeyEntryError, match="max_concurrent must be a whole number from 1 to 1e"):
        parse_entries([{"name": "a", "key": KEYS["alice"], "max_concurrent": 0}])
    with caplog.at_level(logging.WARNING):
        app = make_app(Settings(host="127.0.0.1", api_keys=limited(2), workers=2))
        make_app(Settings(host="127.0.0.1", api_keys=keys(), workers=2))  # no limit: nothing to say
    [warning] = [record.getMessage() for record in caplog.records if "max_concurrent" in record.getMessage()]
    assert warning == (
        "max_concurrent is counted by each worker: with 2 workers a key may run that many times as many generations"
        " at once"
    )
    assert app.settings["proxy"].queue is not None  # a key's limit needs the queue, even without slots


async def test_a_generation_sent_again_to_another_pod_still_counts_for_its_key(pods, make_proxy):
    a, b = pods(2)
    a.state.busy = True  # "server busy": the proxy sends the generation again, to b
    a.state.loaded = {"stall"}  # the pool tries a first
    proxy = make_proxy(upstreams=[{"name": "a", "url": a.url}, {"name": "b", "url": b.url}], api_keys=limited(1))
    await ready(proxy)
    first = await hold_the_slot(proxy, ALICE)  # at b, after a's 503
    assert b.state.running == 1
    reader, second = await send_json(proxy, b"POST", b"/api/chat", chat("alice", 2, stream=False), ALICE)
    await queued(proxy, 1)  # alice's one generation at once is the one that moved
    first.close()
    status, _, _ = await read_response(reader)  # her second goes as her first ends
    assert status == 200 and proxy.proxy.queue.keys_running == {}
    second.close()


async def test_a_key_with_max_concurrent_may_not_call_what_the_queue_cannot_count(pods, make_proxy, http):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "a", "url": pod.url}], api_keys=limited(1))
    await ready(proxy)
    answer = await http.post(proxy + "/v1/audio/transcriptions", content=b"x", headers=bearer_of("alice"))
    assert answer.status_code == 403
    message = (
        "key 'alice' has max_concurrent, which does not count /v1/audio/transcriptions: a key with it may not call it"
    )
    assert answer.json()["error"]["message"] == message
    bobs = await http.post(proxy + "/v1/audio/transcriptions", content=b"x", headers=bearer_of("bob"))
    assert bobs.status_code == 404  # Ollama's answer: no limit of bob's is walked around
