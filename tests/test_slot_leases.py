"""`slots` as one limit for every proxy sharing Redis: leases taken atomically there, a
wake-up when one is given back, lapsed leases of a process that died, and an outage."""

import asyncio
import json
import signal
import time

import coredis
import ollama
import pytest

from tornado_ollama_proxy import fair_queue, slot_leases
from tornado_ollama_proxy.slot_leases import CHANNEL, Leases

from .conftest import RedisServer
from .helpers import address as host_port
from .helpers import read_log, read_response, ready, send_json, until


def chat(who, **more):
    return {"model": "llama3.2", "messages": [{"role": "user", "content": who}], **more}


async def hold(proxy):
    """A generation that keeps its slot at the pod until its connection is closed."""
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", chat("holder", model="stall"))
    await reader.readuntil(b"\r\n\r\n")
    return writer


async def queued(proxy, count):
    await until(lambda: proxy.proxy.queue.size == count)


@pytest.fixture
def redis(redis_server):
    return coredis.Redis.from_url(redis_server.url, decode_responses=True)


async def leases_held(redis, pod="a"):
    return list(await redis.zrange(Leases.key(pod), 0, -1))


async def until_given_back(redis):
    """Leases go back in the background, as their generations end."""
    for _ in range(200):
        if not await leases_held(redis):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(await leases_held(redis))


@pytest.fixture
def no_second_looks(monkeypatch):
    """Neither the queue's own look nor the leases' renewal comes within a test: a request
    that goes was woken by a lease given back, as it was published."""
    monkeypatch.setattr(fair_queue, "TICK", 60.0)
    monkeypatch.setattr(slot_leases, "EVERY", 60.0)


async def proxies_sharing(count, pod, redis_url, make_proxy, slots=1, **more):
    started = [
        make_proxy(upstreams=[{"name": "a", "url": pod.url, "slots": slots}], rate_limit_storage=redis_url, **more)
        for _ in range(count)
    ]
    for proxy in started:
        await ready(proxy)
    return started


async def test_a_slot_one_proxy_holds_is_not_given_by_another_and_its_release_wakes_the_other(
    pods, make_proxy, redis_server, redis, no_second_looks
):
    [pod] = pods(1)
    one, other = await proxies_sharing(2, pod, redis_server.url, make_proxy)
    holder = await hold(one)
    assert len(await leases_held(redis)) == 1
    reader, writer = await send_json(other, b"POST", b"/api/chat", chat("waiter", stream=False))
    await queued(other, 1)  # its own count said the slot was free; the lease said not
    holder.close()
    status, _, body = await read_response(reader)  # woken by the release, not a second look
    assert status == 200 and json.loads(body)["done"] is True
    assert pod.state.most_running == 1
    await until_given_back(redis)
    writer.close()


async def test_two_proxies_flooding_one_pod_never_run_more_than_its_slots(pods, make_proxy, redis_server, nginx):
    [pod] = pods(1, token_delay=0.01)
    proxies = await proxies_sharing(2, pod, redis_server.url, make_proxy, slots=2)
    clients = [ollama.AsyncClient(host=nginx(proxy, as_get=True)) for proxy in proxies]
    answers = await asyncio.gather(
        *(clients[n % 2].chat(**chat(f"user {n}"), options={"num_predict": 3}) for n in range(16))
    )
    assert [answer.message.content for answer in answers] == ["tok0 tok1 tok2 "] * 16
    assert pod.state.most_running == 2  # one limit for both proxies: each alone would send 2
    for client in clients:
        await client.close()


async def test_a_slot_freed_to_two_waiting_proxies_goes_to_one_and_the_other_waits_on(
    pods, make_proxy, redis_server, redis, no_second_looks
):
    [pod] = pods(1, token_delay=0.05)
    holder_proxy, *waiting = await proxies_sharing(3, pod, redis_server.url, make_proxy)
    holder = await hold(holder_proxy)
    connections = []
    for proxy in waiting:
        connections.append(await send_json(proxy, b"POST", b"/api/chat", chat("waiter", stream=False)))
        await queued(proxy, 1)
    holder.close()  # both are woken; one lease is granted, the other refused: it waits on
    statuses = [(await read_response(reader))[0] for reader, _ in connections]
    assert statuses == [200, 200] and pod.state.most_running == 1
    for _, writer in connections:
        writer.close()


async def test_the_leases_of_a_process_that_died_lapse(pods, make_proxy, redis_server, redis, monkeypatch):
    monkeypatch.setattr(fair_queue, "TICK", 60.0)  # found by the leases' renewal, each second
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, redis_server.url, make_proxy)
    now = (await redis.time()).timestamp()
    await redis.zadd(Leases.key("a"), {"gone:1": now + 1.5})  # renewed no more
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", chat("after", stream=False))
    await queued(proxy, 1)
    status, _, _ = await read_response(reader)
    assert status == 200
    await until_given_back(redis)  # the lapsed lease is gone, and the request's given back
    writer.close()


async def a_turn_leased_slowly(proxy, gate, who):
    """A request whose turn comes (a generation of its pod's one slot ends) while its lease
    waits at `gate`: its connection."""
    loop = asyncio.get_running_loop()
    gate.open = loop.create_future()
    gate.open.set_result(None)  # the holder's lease comes at once
    holder = await hold(proxy)
    gate.open = loop.create_future()
    asked = gate.asked
    connection = await send_json(proxy, b"POST", b"/api/chat", chat(who, stream=False))
    await queued(proxy, 1)
    holder.close()
    await until(lambda: gate.asked > asked)
    return connection


async def test_a_client_that_leaves_while_its_lease_is_asked_for_gives_it_back(
    pods, make_proxy, redis_server, redis, monkeypatch
):
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, redis_server.url, make_proxy, queue_timeout=0.5)
    queue, [member] = proxy.proxy.queue, proxy.proxy.pool.members
    gate = Gate(monkeypatch)
    _, writer = await a_turn_leased_slowly(proxy, gate, "leaving")
    writer.close()
    await queued(proxy, 0)
    gate.open.set_result(None)
    await until(lambda: not queue._tasks and member.busy == 0)
    await until_given_back(redis)  # granted after it left, and given back
    # One that waits past queue_timeout while its lease is asked for: the same.
    reader, writer = await a_turn_leased_slowly(proxy, gate, "late")
    status, _, _ = await read_response(reader)
    assert status == 503
    gate.open.set_result(None)
    await until(lambda: not queue._tasks and member.busy == 0)
    await until_given_back(redis)
    writer.close()
    # One whose proxy stops while its lease is asked for: the asking ends with the proxy.
    _, writer = await a_turn_leased_slowly(proxy, gate, "stopped")
    await proxy.proxy.queue.close()
    assert not queue._tasks
    writer.close()


async def test_with_redis_down_each_proxy_counts_its_own_and_says_so_once(pods, make_proxy, log_lines, no_second_looks):
    server = RedisServer()
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, server.url, make_proxy)
    holder = await hold(proxy)  # a lease, taken while Redis is up
    server.stop()
    holder.close()  # given back to nobody: it would lapse
    await until(lambda: pod.state.running == 0)
    for n in range(2):  # the first finds Redis gone; the second does not ask
        reader, writer = await send_json(proxy, b"POST", b"/api/chat", chat(f"down {n}", stream=False))
        assert (await read_response(reader))[0] == 200  # its own count: the slot is free
        writer.close()
    assert proxy.proxy.queue.leases.failing
    said = [line["message"] for line in log_lines() if line["message"].startswith("slot leases")]
    assert said == ["slot leases unavailable: each process counts its own generations at each pod"]


async def test_leases_and_wake_ups_come_back_with_redis(redis_server, log_lines, monkeypatch):
    monkeypatch.setattr(slot_leases, "EVERY", 0.1)
    freed = []
    port = redis_server.port
    redis_server.stop()  # down before the first look: neither renewal nor subscription can start
    leases = Leases(f"redis://127.0.0.1:{port}", ["a"], lambda: freed.append(time.monotonic()))
    leases.start()
    try:
        await until(lambda: leases.failing)
        back = RedisServer(port=port)
        try:
            await until(lambda: not leases.failing)
            said = [line["message"] for line in log_lines() if line["message"].startswith("slot leases")]
            assert said[-1] == "slot leases available again"
            redis = coredis.Redis.from_url(back.url, decode_responses=True)
            await until_subscribed(redis)
            await redis.publish(CHANNEL, "a 3")  # heard by the subscription made once Redis was back
            await until(lambda: leases.others["a"] == 3)
        finally:
            back.stop()
    finally:
        await leases.close()


async def test_messages_that_are_no_release_of_a_known_pod_are_ignored(redis_server, redis):
    freed = []
    leases = Leases(redis_server.url, ["a"], lambda: freed.append(time.monotonic()))
    leases.start()
    try:
        await until(lambda: freed)  # the first renewal
        renewed = len(freed)
        for message in ("nonsense", "b 0", "a many", "a 1"):
            await until_subscribed(redis)
            await redis.publish(CHANNEL, message)
        await until(lambda: len(freed) > renewed)  # "a 1" only
        assert leases.others["a"] == 1 and "b" not in leases.others
    finally:
        await leases.close()


async def test_a_refusal_older_than_a_release_heard_meanwhile_leaves_the_slot_free(redis_server, no_second_looks):
    """Another process's release, published after Redis refused this one's lease but heard
    before that refusal's answer, is the newer news: the pod is not taken for full until
    the next renewal (a second), and the queue sends its next waiter there at once."""
    other = Leases(redis_server.url, ["a"], list)
    held = await other.acquire("a", 1)
    leases = Leases(redis_server.url, ["a"], list)
    leases.start()
    try:
        await until_subscribed(coredis.Redis.from_url(redis_server.url, decode_responses=True))
        await until(lambda: leases.others["a"] == 1)  # the first renewal: the other's lease
        ask = leases._acquire

        async def refused_then_released(**arguments):
            answer = await ask(**arguments)  # refused: the other process holds the only slot
            assert held is not None
            other.release(held)
            await until(lambda: leases.others["a"] == 0)  # its release, heard
            return answer

        leases._acquire = refused_then_released
        assert await leases.acquire("a", 1) is None
        assert leases.others["a"] == 0
        leases._acquire = ask
        assert await leases.acquire("a", 1)  # and it is free indeed
    finally:
        await leases.close()
        await other.close()


async def until_subscribed(redis):
    async def subscribers():
        return (await redis.pubsub_numsub(CHANNEL))[CHANNEL]

    for _ in range(100):
        if await subscribers():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no subscriber")


async def test_two_workers_on_one_pod_never_run_more_than_its_slots(pods, launch, redis_server):
    [pod] = pods(1, token_delay=0.01)
    upstreams = json.dumps([{"name": "a", "url": pod.url, "slots": 1}])
    env = {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAMS": upstreams,
        "OLLAMA_PROXY_RATE_LIMIT_STORAGE": redis_server.url,
        "OLLAMA_PROXY_WORKERS": "2",
    }
    parent = launch(env)
    address = (await read_log(parent, "starting workers"))["address"]
    workers = {(await read_log(parent, "listening"))["pid"] for _ in range(2)}
    connections = await asyncio.gather(*(asyncio.open_connection(*host_port(address)) for _ in range(12)))
    held_by = []
    for reader, writer in connections:  # which worker holds each connection
        writer.write(b"GET /_proxy/status HTTP/1.1\r\nHost: x\r\n\r\n")
        held_by.append(json.loads((await read_response(reader))[2])["worker"]["pid"])
    assert set(held_by) == workers  # both workers send generations
    body = json.dumps(chat("one of twelve", stream=False, options={"num_predict": 5})).encode()
    for _, writer in connections:
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    answers = await asyncio.gather(*(read_response(reader) for reader, _ in connections))
    assert [status for status, _, _ in answers] == [200] * 12
    assert pod.state.most_running == 1  # one slot for both workers: each alone would send one
    for _, writer in connections:
        writer.close()
    parent.send_signal(signal.SIGTERM)
    await read_log(parent, "workers stopped")


# -- a key's max_concurrent with leases, and the moments a client may leave ------------------

ALICE_KEY = "a" * 43
ALICE = f"Authorization: Bearer {ALICE_KEY}\r\n".encode()


class Gate:
    """Leases asked for wait until the test opens the gate; `asked` counts them."""

    def __init__(self, monkeypatch):
        self.asked = 0
        self.open = asyncio.get_running_loop().create_future()
        acquire = Leases.acquire

        async def gated(leases, pod_name, slots):
            self.asked += 1
            await self.open
            return await acquire(leases, pod_name, slots)

        monkeypatch.setattr(Leases, "acquire", gated)


def alice_limited(max_concurrent):
    from tornado_ollama_proxy.auth import parse_entries

    entries = [{"name": "alice", "key": ALICE_KEY, "max_concurrent": max_concurrent}, {"name": "bob", "key": "b" * 43}]
    return parse_entries(entries)


async def test_a_client_that_leaves_while_a_free_slot_is_leased_for_it_leaks_nothing(
    pods, make_proxy, redis_server, redis, monkeypatch
):
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, redis_server.url, make_proxy, api_keys=alice_limited(1))
    gate = Gate(monkeypatch)
    _, writer = await send_json(proxy, b"POST", b"/api/chat", chat("leaving", stream=False), ALICE)
    await until(lambda: gate.asked == 1)  # a slot was free: no line, its lease is being asked for
    writer.close()
    await until(lambda: not proxy.proxy.exchanges)  # the request has ended
    gate.open.set_result(None)  # then the lease comes
    queue, [member] = proxy.proxy.queue, proxy.proxy.pool.members
    await until(lambda: not queue.leases.held and member.busy == 0)
    await until_given_back(redis)
    assert queue.keys_running == {} and queue.running == {}
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", chat("next", stream=False), ALICE)
    assert (await read_response(reader))[0] == 200  # alice is not locked out, the slot not lost
    writer.close()


async def test_a_keys_generations_at_once_hold_while_their_leases_are_asked_for(
    pods, make_proxy, redis_server, monkeypatch
):
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, redis_server.url, make_proxy, slots=8, api_keys=alice_limited(1))
    gate = Gate(monkeypatch)
    held = [await send_json(proxy, b"POST", b"/api/chat", chat(f"alice {n}", model="stall"), ALICE) for n in range(3)]
    await queued(proxy, 2)  # the first counts for alice from the moment its slot was taken
    gate.open.set_result(None)
    await held[0][0].readuntil(b"\r\n\r\n")
    assert gate.asked == 1 and proxy.proxy.queue.size == 2 and pod.state.running == 1
    for _, writer in held:
        writer.close()


async def test_a_keys_waiters_are_not_sent_past_its_limit_while_a_lease_is_asked_for(
    pods, make_proxy, redis_server, monkeypatch
):
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, redis_server.url, make_proxy, slots=2, api_keys=alice_limited(1))
    bob = f"Authorization: Bearer {'b' * 43}\r\n".encode()
    bobs = [await send_json(proxy, b"POST", b"/api/chat", chat(f"bob {n}", model="stall"), bob) for n in range(2)]
    for reader, _ in bobs:
        await reader.readuntil(b"\r\n\r\n")
    alices = [await send_json(proxy, b"POST", b"/api/chat", chat(f"alice {n}", model="stall"), ALICE) for n in range(2)]
    await queued(proxy, 2)
    gate = Gate(monkeypatch)
    for _, writer in bobs:
        writer.close()  # two slots free at once
    await until(lambda: gate.asked == 1)
    await until(lambda: pod.state.running == 0)
    assert gate.asked == 1 and proxy.proxy.queue.size == 2  # alice's second waits for her first
    gate.open.set_result(None)
    await alices[0][0].readuntil(b"\r\n\r\n")
    assert proxy.proxy.queue.size == 1 and pod.state.running == 1
    for _, writer in alices:
        writer.close()


async def test_leases_of_generations_cut_at_shutdown_are_given_back(pods, make_proxy, redis_server, redis, servers):
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, redis_server.url, make_proxy, slots=2)
    holders = [await hold(proxy) for _ in range(2)]
    assert len(await leases_held(redis)) == 2
    [server] = [
        server for server, app in servers.running if app is not None and app.settings.get("proxy") is proxy.proxy
    ]
    await server.close_all_connections()  # as a shutdown's grace ends
    await proxy.proxy.close()
    assert await leases_held(redis) == []  # no other process waits for them to lapse
    for writer in holders:
        writer.close()


async def test_slots_counted_by_each_process_are_said_to_be(log_lines):
    from tornado_ollama_proxy.app import make_app
    from tornado_ollama_proxy.settings import SCHEMA, Settings

    validate, _ = SCHEMA["upstreams"]
    upstreams = validate([{"name": "a", "url": "http://127.0.0.1:9", "slots": 1}])
    for more in ({"workers": 2}, {"rate_limit_storage": "redis+sentinel://127.0.0.1:26379/main"}, {}):
        proxy = make_app(Settings(host="127.0.0.1", upstreams=upstreams, **more)).settings["proxy"]
        proxy.queue.start()
        await proxy.close()
    said = [line["message"] for line in log_lines() if line["message"].startswith("slots are")]
    assert said == ["slots are each process's own count: every process may send a pod that many generations"] * 2


def three_keys():
    from tornado_ollama_proxy.auth import parse_entries

    return parse_entries([{"name": name, "key": name[0] * 43} for name in ("alice", "bob", "carol")])


def bearer(name):
    return f"Authorization: Bearer {name[0] * 43}\r\n".encode()


async def test_slots_freed_together_are_shared_by_turns_while_their_leases_are_asked_for(
    pods, make_proxy, redis_server
):
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, redis_server.url, make_proxy, slots=4, api_keys=three_keys())
    holders = []
    for _ in range(4):
        reader, writer = await send_json(proxy, b"POST", b"/api/chat", chat("holder", model="stall"), bearer("carol"))
        await reader.readuntil(b"\r\n\r\n")
        holders.append(writer)
    waiting = [
        await send_json(proxy, b"POST", b"/api/chat", chat(f"{name} {n}", stream=False), bearer(name))
        for name in ("alice", "bob")
        for n in range(30)
    ]
    await queued(proxy, 60)
    for writer in holders:
        writer.close()  # four slots free at once: each lease takes a round trip to Redis
    assert [(await read_response(reader))[0] for reader, _ in waiting] == [200] * 60
    bodies = [json.loads(seen.body) for seen in pod.state.seen if seen.path == "/api/chat"]
    went = [body["messages"][0]["content"].split()[0] for body in bodies][4:]  # after carol's four
    # Turn by turn (a lease refused while another is given back gives its turn back), not
    # alice's thirty first: equal shares within 10 %.
    assert 18 <= went[:40].count("alice") <= 22, went
    for _, writer in waiting:
        writer.close()


async def test_a_generation_sent_again_gives_its_first_lease_back_and_goes_only_to_a_free_slot(
    pods, make_proxy, redis_server, redis
):
    a, b = pods(2)
    a.state.busy = True  # "server busy" to every generation: each is sent again, to b
    a.state.loaded = {"stall"}  # the pool tries a first
    upstreams = [{"name": "a", "url": a.url, "slots": 1}, {"name": "b", "url": b.url, "slots": 1}]
    proxy = make_proxy(upstreams=upstreams, rate_limit_storage=redis_server.url)
    await ready(proxy)
    first = await hold(proxy)  # at b, after a's 503
    assert b.state.running == 1
    await until_given_back(redis)  # a's lease went back as the request moved: a's slot is free
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", chat("second", model="stall"))
    status, _, body = await read_response(reader)
    assert status == 503 and json.loads(body)["error"].startswith("server busy")  # a's: b has no free slot
    assert b.state.most_running == 1
    first.close()
    writer.close()


async def test_a_client_that_left_while_its_slot_was_refused_never_waits_in_line(
    pods, make_proxy, redis_server, redis, monkeypatch, no_second_looks
):
    [pod] = pods(1)
    [proxy] = await proxies_sharing(1, pod, redis_server.url, make_proxy)
    now = (await redis.time()).timestamp()
    await redis.zadd(Leases.key("a"), {"another:1": now + 60})  # another process's generation
    gate = Gate(monkeypatch)
    _, writer = await send_json(proxy, b"POST", b"/api/chat", chat("leaving", stream=False))
    await until(lambda: gate.asked == 1)  # the slot looks free here: its lease is asked for
    writer.close()
    await until(lambda: not proxy.proxy.exchanges)
    gate.open.set_result(None)  # refused: the slot is the other process's
    queue = proxy.proxy.queue
    await until(lambda: not queue._tasks and queue.leases.others["a"] == 1)
    assert queue.size == 0 and queue.lines == {} and queue.running == {}
