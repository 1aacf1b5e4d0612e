"""Several pods behind one proxy: generations spread by free slots, loaded model and
conversation; failures move requests and eject pods; every route works as against one."""

import asyncio
import itertools
import json
import time

import ollama
import pytest
from tornado.web import Application

from tornado_ollama_proxy.balancer import PodView, rendezvous

from .conftest import RedisServer
from .helpers import pool_of, read_response, ready, scrape, send_json, split_response, until, value

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(n, **more):
    """A chat of its own (its opening differs from every other's), not streamed."""
    return {"model": "llama3.2", "messages": [{"role": "user", "content": f"question {n}"}], "stream": False, **more}


def served(started):
    """How many generations each stand-in pod saw."""
    return [sum(1 for seen in state.seen if seen.path in ("/api/chat", "/api/generate")) for state, _ in started]


# -- spreading generations ------------------------------------------------------------------


async def test_thirty_streams_on_three_ten_slot_pods_go_ten_ten_ten(pods, make_proxy, nginx):
    started = pods(3, slots=10, token_delay=0.2)
    proxy = make_proxy(upstreams=pool_of(started, slots=10))
    await ready(proxy)
    client = ollama.AsyncClient(host=nginx(proxy, as_get=True))  # through the GET-converting front

    async def chat():
        return [part async for part in await client.chat(model="llama3.2", messages=MESSAGES, stream=True)]

    answers = await asyncio.gather(*(chat() for _ in range(30)))
    assert all("".join(part.message.content for part in parts) == "tok0 tok1 tok2 " for parts in answers)
    assert served(started) == [10, 10, 10]
    assert [state.most_running for state, _ in started] == [10, 10, 10]
    await client.close()


async def test_a_pod_with_the_model_loaded_wins_over_one_that_would_load_it(pods, make_proxy, http):
    started = pods(2, load_delay=1.0)
    started[1][0].loaded.add("llama3.2")
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    for _ in range(5):
        answer = await http.post(proxy + "/api/chat", json={"model": "llama3.2", "messages": MESSAGES, "stream": False})
        assert answer.headers["x-ollama-upstream"] == "b"
    assert served(started) == [0, 5]


async def test_a_conversation_returns_to_its_pod_while_it_has_room_and_moves_when_full(pods, make_proxy, http):
    started = pods(3, slots=1)
    proxy = make_proxy(upstreams=pool_of(started, slots=1))
    await ready(proxy)
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    turns = []
    for turn in range(4):
        messages = (
            conversation + [{"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another."}] * turn
        )
        answer = await http.post(proxy + "/api/chat", json={"model": "llama3.2", "messages": messages, "stream": False})
        turns.append(answer.headers["x-ollama-upstream"])
    assert len(set(turns)) == 1  # the pod that holds its prompt cache
    home = turns[0]
    # Another conversation, whose own key hashes to the same pod, fills its one slot.
    views = [PodView(name, 1.0, 1, 0, 0, True, False) for name in "abc"]
    session = next(f"s{n}" for n in itertools.count() if rendezvous(views, f"session\0s{n}").name == home)
    other = {"model": "stall", "messages": [{"role": "user", "content": "x"}], "stream": True}
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", other, f"X-Ollama-Session: {session}\r\n".encode())
    status, headers, _ = split_response(await reader.readuntil(b"\r\n\r\n"))
    assert headers["x-ollama-upstream"] == [home]
    # The conversation's next turn moves: its pod has no free slot.
    answer = await http.post(proxy + "/api/chat", json={"model": "llama3.2", "messages": conversation, "stream": False})
    assert answer.headers["x-ollama-upstream"] != home
    writer.close()


# -- failures -------------------------------------------------------------------------------


async def test_a_pod_killed_amid_two_hundred_requests_costs_no_client_an_error(pods, make_proxy, http):
    started = pods(3, token_delay=0.02)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    answers = []

    async def batch():
        return await asyncio.gather(*(http.post(proxy + "/api/chat", json=chat(len(answers) + n)) for n in range(50)))

    answers += await batch()
    killing = asyncio.ensure_future(started[1].kill())
    answers += await batch()  # amid it: answers held by the dying pod go to another
    await killing
    answers += await batch()
    answers += await batch()
    budget = [tuple(e) for e in proxy.proxy.pool.budget.seconds]
    assert [answer.status_code for answer in answers] == [200] * 200, (
        [a.text for a in answers if a.status_code != 200],
        budget,
    )
    assert {answer.headers["x-ollama-upstream"] for answer in answers[150:]} == {"a", "c"}
    samples = await scrape(http, proxy)
    assert value(samples, "ollama_proxy_upstream_healthy", upstream="b") == 0
    assert value(samples, "ollama_proxy_upstream_ejections_total", upstream="b") == 1


async def test_a_pod_answering_503_gets_no_work_until_it_recovers(pods, make_proxy, http, log_lines):
    started = pods(2)
    busy, _ = started[1]
    busy.busy = True
    proxy = make_proxy(upstreams=pool_of(started), pool_eject_seconds=0.5, pool_max_fails=3)
    await ready(proxy)
    for n in range(20):
        answer = await http.post(proxy + "/api/chat", json=chat(n))
        assert (answer.status_code, answer.headers["x-ollama-upstream"]) == (200, "a")  # moved, never seen as 503
    assert served(started)[1] == 3  # ejected after three: no more work
    records = [line for line in log_lines() if line["message"] == "request"]
    assert sorted((r["upstream"], r["attempts"]) for r in records) == [("a", 1)] * 17 + [("a", 2)] * 3
    busy.busy = False
    await asyncio.sleep(0.6)  # the ejection runs out
    answers = [await http.post(proxy + "/api/chat", json=chat(n)) for n in range(6)]
    assert {answer.headers["x-ollama-upstream"] for answer in answers} == {"a", "b"}  # back in the pool
    samples = await scrape(http, proxy)
    assert value(samples, "ollama_proxy_retries_total", upstream="b", cause="busy") == 3


async def test_with_every_pod_down_the_answer_is_a_502_at_once_naming_each(pods, make_proxy, http):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started), pool_max_fails=1, pool_eject_seconds=60)
    await ready(proxy)
    for pod in started:
        await pod.kill()
    first = await http.post(proxy + "/api/chat", json={"model": "llama3.2", "messages": MESSAGES, "stream": False})
    assert first.status_code == 502
    answer = await asyncio.wait_for(http.post(proxy + "/api/show", json={"model": "llama3.2"}), 1)
    assert answer.status_code == 502
    message = answer.json()["error"]
    assert message.startswith("no upstream can take the request: 'a': upstream 'a' refused the connection (")
    assert "; 'b': upstream 'b' refused the connection (" in message
    health = await http.get(proxy + "/_proxy/health")
    assert health.status_code == 503 and [pod["state"] for pod in health.json()["upstreams"]] == ["ejected"] * 2


async def test_a_model_goes_to_the_pods_that_have_it_and_one_none_has_is_ollamas_404(pods, make_proxy, http):
    started = pods(2)
    started[1][0].models.add("only-b")
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    for _ in range(3):
        answer = await http.post(proxy + "/api/chat", json={"model": "only-b", "messages": MESSAGES, "stream": False})
        assert (answer.status_code, answer.headers["x-ollama-upstream"]) == (200, "b")

    def tags_reads():
        return [sum(1 for seen in state.seen if seen.path == "/api/tags") for state, _ in started]

    before = tags_reads()
    missing = await http.post(proxy + "/api/chat", json={"model": "nowhere", "messages": MESSAGES, "stream": False})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nowhere' not found"})
    assert tags_reads() == [reads + 1 for reads in before]  # read once more before saying so
    # A model pulled onto a pod behind the proxy's back is found by that second look.
    started[0][0].models.add("new-on-a")
    found = await http.post(proxy + "/api/chat", json={"model": "new-on-a", "messages": MESSAGES, "stream": False})
    assert (found.status_code, found.headers["x-ollama-upstream"]) == (200, "a")


async def test_a_pod_that_says_not_found_while_another_lists_the_model_sends_it_there(pods, make_proxy, http):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    started[0][0].models.discard("llama3.2")  # deleted on a behind the proxy's back
    for _ in range(4):
        answer = await http.post(proxy + "/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
        assert (answer.status_code, answer.headers["x-ollama-upstream"]) == (200, "b")
    await until(lambda: proxy.proxy.pool.by_name["a"].models.has("llama3.2:latest") is False)  # a's list read again


async def test_x_ollama_upstream_names_the_pods_a_request_may_go_to(pods, make_proxy, http):
    from tornado_ollama_proxy.auth import parse_entries

    started = pods(3)
    keys = [{"name": "ops", "key": "o" * 43}, {"name": "chat", "key": "c" * 43, "scopes": ["inference"]}]
    proxy = make_proxy(upstreams=pool_of(started), api_keys=parse_entries(keys))
    await ready(proxy)
    ops = {"Authorization": "Bearer " + "o" * 43}
    for _ in range(3):
        pinned = await http.post(
            proxy + "/api/show", json={"model": "llama3.2"}, headers={**ops, "X-Ollama-Upstream": "c"}
        )
        assert pinned.headers["x-ollama-upstream"] == "c"
    assert "X-Ollama-Upstream" not in started[2][0].seen[-1].headers  # the proxy's, not Ollama's
    unknown = await http.get(proxy + "/api/version", headers={**ops, "X-Ollama-Upstream": "z"})
    assert (unknown.status_code, unknown.json()["error"]) == (
        400,
        "X-Ollama-Upstream: 'z' names no pod of this proxy; they are: all, a, b, c",
    )
    forbidden = await http.get(
        proxy + "/api/version", headers={"Authorization": "Bearer " + "c" * 43, "X-Ollama-Upstream": "a"}
    )
    assert forbidden.status_code == 403


async def test_a_large_body_is_held_to_choose_by_its_model_and_a_larger_one_streams_anywhere(pods, make_proxy, http):
    started = pods(2)
    started[1][0].models.add("only-b")
    proxy = make_proxy(upstreams=pool_of(started), hold_body_max=200_000, pool_max_fails=1, pool_eject_seconds=60)
    await ready(proxy)
    image = "A" * 150_000  # a vision request's base64 image: past the small-body bound, held
    held = {"model": "only-b", "messages": [{"role": "user", "content": "x", "images": [image]}], "stream": False}
    for _ in range(3):
        answer = await http.post(proxy + "/api/chat", json=held)
        assert (answer.status_code, answer.headers["x-ollama-upstream"]) == (200, "b")
    assert json.loads(started[1][0].seen[-1].body) == held
    # Past hold_body_max: streamed as it comes to the pod with fewest in flight, model unread.
    larger = {**chat(1), "messages": [{"role": "user", "content": "y", "images": ["B" * 250_000]}]}
    answer = await http.post(proxy + "/api/chat", json=larger)
    assert answer.status_code == 200 and answer.headers["x-ollama-upstream"] in ("a", "b")
    for pod in started:
        await pod.kill()
    await http.get(proxy + "/api/tags")  # each pod refuses it: both ejected
    down = await http.post(proxy + "/api/chat", json=larger)
    assert down.status_code == 502 and down.json()["error"].startswith("no upstream can take the request")


async def test_a_pull_goes_to_the_pods_x_ollama_upstream_names(pods, make_proxy, http):
    started = pods(3)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    one = await http.post(
        proxy + "/api/pull", json={"model": "m1", "stream": False}, headers={"X-Ollama-Upstream": "b"}
    )
    assert one.json() == {"status": "success"}
    assert ["m1" in state.models for state, _ in started] == [False, True, False]
    every = await http.post(
        proxy + "/api/pull", json={"model": "m2", "stream": False}, headers={"X-Ollama-Upstream": "all"}
    )
    assert every.json() == {"status": "success"}
    assert ["m2" in state.models for state, _ in started] == [True, True, True]


async def test_a_probing_request_whose_client_leaves_leaves_the_probe_to_the_next(pods, make_proxy, http):
    started = pods(2)
    (_, _), (b, _) = started
    b.busy = True
    proxy = make_proxy(upstreams=pool_of(started), pool_max_fails=1, pool_eject_seconds=0.2)
    await ready(proxy)
    pinned = {"X-Ollama-Upstream": "b"}
    first = await http.post(proxy + "/api/chat", json=chat(1), headers=pinned)
    assert first.status_code == 503  # pinned there: nowhere else to go
    health = proxy.proxy.pool.by_name["b"].health
    assert health.state == "ejected"
    b.busy = False
    await until(lambda: health.available(time.monotonic()))
    reader, writer = await send_json(
        proxy, b"POST", b"/api/chat", {"model": "stall", "messages": MESSAGES}, b"X-Ollama-Upstream: b\r\n"
    )
    await reader.readuntil(b"\r\n\r\n")
    assert health.state == "probing"
    writer.close()
    await until(lambda: health.state != "probing")
    assert health.state == "ejected"  # its client left: the pod told nothing, the next request probes
    second = await http.post(proxy + "/api/chat", json=chat(2), headers=pinned)
    assert second.status_code == 200 and health.state == "healthy"


async def test_the_watch_probes_often_reads_lists_seldom_and_ejects_a_silent_pod(pods, make_proxy):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started), pool_health_seconds=0.05, pool_max_fails=2)
    proxy.proxy.pool.start()

    def reads(state, path):
        return sum(1 for seen in state.seen if seen.path == path)

    a, b = (state for state, _ in started)
    await until(lambda: reads(a, "/api/version") >= 4)
    assert reads(a, "/api/ps") >= 3 and reads(a, "/api/tags") == 1  # the list every 30 s
    await started[1].kill()
    health = proxy.proxy.pool.by_name["b"].health
    await until(lambda: health.state == "ejected")
    assert health.last_failure.reason.startswith("upstream 'b' refused the connection")


async def test_a_probe_answered_while_ejected_does_not_bring_a_pod_back(pods, make_proxy, http):
    started = pods(2)
    (_, _), (b, _) = started
    b.busy = True  # 503 to work, 200 to probes
    proxy = make_proxy(upstreams=pool_of(started), pool_max_fails=1, pool_eject_seconds=60, pool_health_seconds=0.05)
    await ready(proxy)
    await http.post(proxy + "/api/chat", json=chat(1), headers={"X-Ollama-Upstream": "b"})
    health = proxy.proxy.pool.by_name["b"].health
    assert health.state == "ejected"
    proxy.proxy.pool.start()
    probes = sum(1 for seen in b.seen if seen.path == "/api/version")
    await until(lambda: sum(1 for seen in b.seen if seen.path == "/api/version") >= probes + 3)
    assert health.state == "ejected"


async def test_a_pod_that_lists_unlike_ollama_is_taken_as_having_listed_nothing_yet(servers, make_proxy, pods):
    from tornado.web import Application, RequestHandler

    class NotQuiteOllama(RequestHandler):
        def get(self, path):
            self.write({"version": "0.9.0"} if path == "version" else {"models": "none"})

    url = servers.start(Application([(r"/api/(\w+)", NotQuiteOllama)]))
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "odd", "url": url}, {"name": "a", "url": pod.url}])
    await ready(proxy)
    odd = proxy.proxy.pool.by_name["odd"]
    assert (odd.models.version, odd.models.listed, odd.models.loaded) == ("0.9.0", None, {})
    assert odd.health.state == "healthy"


async def test_a_pods_own_headers_go_with_every_request_and_probe_to_it(pods, make_proxy, http):
    started = pods(2)
    upstreams = pool_of(started)
    upstreams[1]["headers"] = {"Authorization": "Bearer remote-key", "X-Team": "ml"}
    proxy = make_proxy(upstreams=upstreams)
    await ready(proxy)
    answer = await http.post(proxy + "/api/show", json={"model": "llama3.2"}, headers={"X-Ollama-Upstream": "b"})
    assert answer.status_code == 200
    (a, _), (b, _) = started
    assert {seen.path for seen in b.seen} >= {"/api/tags", "/api/ps", "/api/show"}
    assert all(
        (seen.headers["Authorization"], seen.headers["X-Team"]) == ("Bearer remote-key", "ml") for seen in b.seen
    )
    assert not any("Authorization" in seen.headers or "X-Team" in seen.headers for seen in a.seen)


# -- one API: lists merged, management calls to every pod they concern ------------------------


async def test_lists_are_every_pods_merged_in_ollamas_schema(pods, make_proxy, nginx):
    import openai

    started = pods(3)
    (a, _), (b, _), (c, _) = started
    a.models.add("only-a")
    b.digests["llama3.2"], b.modified["llama3.2"] = "newer", "2026-11-30T00:00:00Z"
    a.loaded.add("llama3.2")
    c.loaded.add("llama3.2")  # loaded on two pods: listed once
    a.version, b.version, c.version = "0.32.0", "0.9.10", "0.12.1"
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    front = nginx(proxy, as_get=True)
    client = ollama.AsyncClient(host=front)
    listed = (await client.list()).models
    names = [model.model for model in listed]
    assert len(names) == len(set(names)) and "only-a" in names and "llama3.2" in names
    [llama] = [model for model in listed if model.model == "llama3.2"]
    assert llama.digest == "newer"  # the newest of two digests, which requests go to
    assert [model.model for model in (await client.ps()).models] == ["llama3.2"]
    async with openai.AsyncOpenAI(base_url=front + "/v1", api_key="unused") as sdk:
        ids = [model.id async for model in sdk.models.list()]
    assert sorted(ids) == sorted(set(ids)) and "only-a" in ids
    assert (await client._request_raw("GET", "/api/version")).json() == {"version": "0.9.10"}
    await client.close()


async def test_a_pull_shows_one_progress_to_the_end_and_every_pod_then_has_the_model(pods, make_proxy, nginx):
    started = pods(3)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    client = ollama.AsyncClient(host=nginx(proxy, as_get=True))
    parts = [part async for part in await client.pull("newmodel", stream=True)]
    layer = [part for part in parts if part.digest]
    assert layer[-1].completed == layer[-1].total == 3 * 10  # one bar, every pod's bytes
    assert [part.status for part in parts].count("pulling manifest") == 1
    assert parts[-1].status == "success" and [part.status for part in parts].count("success") == 1
    assert all("newmodel" in state.models for state, _ in started)
    await until(lambda: proxy.proxy.pool.owners("newmodel:latest") == {"a": True, "b": True, "c": True})
    whole = await client.pull("another")  # "stream": false, the client's default
    assert whole.status == "success" and all("another" in state.models for state, _ in started)
    await client.close()


async def test_a_pull_that_fails_on_one_pod_says_which(pods, make_proxy, http):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    await started[1].kill()
    reader, writer = await send_json(proxy, b"POST", b"/api/pull", {"model": "newmodel"})
    status, headers, body = await read_response(reader)
    lines = [json.loads(line) for line in body.splitlines()]
    assert (status, headers["content-type"]) == (200, ["application/x-ndjson"])
    assert lines[-1] == {"error": "b: upstream 'b' refused the connection"}
    whole = await http.post(proxy + "/api/pull", json={"model": "other", "stream": False})
    assert (whole.status_code, whole.json()) == (502, {"error": "b: upstream 'b' refused the connection"})
    writer.close()


async def test_a_delete_removes_the_model_from_every_pod_that_has_it(pods, make_proxy, nginx):
    started = pods(3)
    started[2][0].models.discard("llama3.2")
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    client = ollama.AsyncClient(host=nginx(proxy, as_get=True))
    assert (await client.delete("llama3.2")).status == "success"
    assert not any("llama3.2" in state.models for state, _ in started)
    deletes = [[seen.method for seen in state.seen if seen.path == "/api/delete"] for state, _ in started]
    assert deletes == [["DELETE"], ["DELETE"], []]  # only where it was
    with pytest.raises(ollama.ResponseError) as missing:
        await client.delete("llama3.2")
    assert (missing.value.status_code, missing.value.error) == (404, "model 'llama3.2' not found")
    assert (await client.copy("gap", "gap-copy")).status == "success"
    assert all("gap-copy" in state.models for state, _ in started)
    await client.close()


async def test_a_blob_goes_to_every_pod_and_a_create_then_works_on_each(pods, make_proxy, nginx, tmp_path):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    client = ollama.AsyncClient(host=nginx(proxy, as_get=True))
    content = b"GGUF" + bytes(range(256)) * 4096
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    digest = await client.create_blob(path)
    assert all(digest.replace(":", "-") in state.blobs or digest in state.blobs for state, _ in started)
    assert all(state.blob_received == len(content) for state, _ in started)
    response = await client.create(model="mine", files={"model.gguf": digest})
    assert response.status == "success" and all("mine" in state.models for state, _ in started)
    await client.close()


async def test_a_blob_is_there_only_if_every_pod_has_it(pods, make_proxy, http):
    started = pods(2)
    digest = "sha256:" + "7" * 64
    started[0][0].blobs.add(digest)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    assert (await http.head(proxy + "/api/blobs/" + digest)).status_code == 404
    started[1][0].blobs.add(digest)
    assert (await http.head(proxy + "/api/blobs/" + digest)).status_code == 200


async def test_show_and_a_models_details_come_from_a_pod_that_has_the_model(pods, make_proxy, http):
    started = pods(2)
    started[1][0].models.add("only-b")
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    for _ in range(3):
        shown = await http.post(proxy + "/api/show", json={"model": "only-b"})
        assert (shown.status_code, shown.headers["x-ollama-upstream"]) == (200, "b")


async def test_a_models_details_come_from_a_pod_that_has_it_and_a_missing_one_is_404(pods, make_proxy, http):
    started = pods(2)
    started[1][0].models.add("only-b")
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    for path in ("/v1/models/only-b", "/v1/models/library%2Fonly-b"):
        detail = await http.get(proxy + path)
        assert detail.headers["x-ollama-upstream"] == "b"
    missing = await http.get(proxy + "/v1/models/nowhere")
    assert (missing.status_code, missing.json()["error"]["message"]) == (404, "model 'nowhere' not found")
    assert missing.json()["error"]["type"] == "invalid_request_error"  # the OpenAI shape on /v1


# -- beyond one proxy -------------------------------------------------------------------------


async def test_proxies_sharing_redis_see_each_others_load_on_the_pods(pods, make_proxy, redis_server, http, log_lines):
    started = pods(2, slots=2)
    upstreams = pool_of(started, slots=2)
    one = make_proxy(upstreams=upstreams, rate_limit_storage=redis_server.url)
    other = make_proxy(upstreams=upstreams, rate_limit_storage=redis_server.url)
    for proxy in (one, other):
        await ready(proxy)
    # Through the first proxy, a conversation keyed to pod a fills a's two slots.
    views = [PodView(name, 1.0, 2, 0, 0, True, False) for name in "ab"]
    session = next(f"s{n}" for n in itertools.count() if rendezvous(views, f"session\0s{n}").name == "a")
    writers = []
    for _ in range(2):
        reader, writer = await send_json(
            one,
            b"POST",
            b"/api/chat",
            {"model": "stall", "messages": MESSAGES},
            f"X-Ollama-Session: {session}\r\n".encode(),
        )
        assert split_response(await reader.readuntil(b"\r\n\r\n"))[1]["x-ollama-upstream"] == ["a"]
        writers.append(writer)
    # The second proxy learns of it (within a second) and sends the same conversation to b.
    await until(lambda: other.proxy.pool.by_name["a"].others_busy == 2)
    answer = await http.post(
        other + "/api/chat",
        json={"model": "llama3.2", "messages": MESSAGES, "stream": False},
        headers={"X-Ollama-Session": session},
    )
    assert answer.headers["x-ollama-upstream"] == "b"
    for writer in writers:
        writer.close()
    await until(lambda: other.proxy.pool.by_name["a"].others_busy == 0)  # and of their end
    redis_server.stop()  # an outage: each balances on its own counts, and says so once
    await until(lambda: any(line["message"].startswith("shared load unavailable") for line in log_lines()))
    assert other.proxy.pool.by_name["a"].others_busy == 0
    back = RedisServer(port=redis_server.port)
    await until(lambda: any(line["message"] == "shared load available again" for line in log_lines()))
    back.stop()


# -- a pod that is this proxy too -------------------------------------------------------------


async def remote_pool(pods, make_proxy, inner_state_knobs):
    """A pod behind another instance of this proxy (which heartbeats while its own pod is
    silent), and a plain pod b; the outer proxy's session key that prefers the remote."""
    [inner_pod, pod_b] = pods(2)
    for name, knob in inner_state_knobs.items():
        setattr(inner_pod.state, name, knob)
    remote = make_proxy(upstream=inner_pod.url, heartbeat_seconds=0.2)
    outer = make_proxy(upstreams=[{"name": "remote", "url": remote}, {"name": "b", "url": pod_b.url}])
    await ready(outer)
    views = [PodView(name, 1.0, None, 0, 0, True, False) for name in ("remote", "b")]
    session = next(f"s{n}" for n in itertools.count() if rendezvous(views, f"session\0s{n}").name == "remote")
    return outer, session, inner_pod, pod_b


async def test_a_remote_proxys_heartbeats_are_not_content_and_its_in_band_busy_moves_the_request(
    pods, make_proxy, http, log_lines
):
    outer, session, inner_pod, pod_b = await remote_pool(pods, make_proxy, {"busy": True, "silence": 1.0})
    answer = await http.post(outer + "/api/chat", json=chat(1), headers={"X-Ollama-Session": session})
    assert (answer.status_code, answer.headers["x-ollama-upstream"]) == (200, "b")
    assert answer.json()["message"]["content"] == "tok0 tok1 tok2 "
    moved = [line for line in log_lines() if line["message"] == "request" and line["attempts"] == 2]
    assert [(record["upstream"], record["status"]) for record in moved] == [("b", 200)]
    assert outer.proxy.pool.by_name["remote"].health.last_failure.reason == "answered 503"  # its in-band status


async def test_content_after_a_remote_proxys_heartbeats_comes_without_them(pods, make_proxy, http):
    outer, session, inner_pod, pod_b = await remote_pool(pods, make_proxy, {"silence": 1.0})
    answer = await http.post(
        outer + "/api/chat", json={**chat(1), "model": "slow"}, headers={"X-Ollama-Session": session}
    )
    assert (answer.status_code, answer.headers["x-ollama-upstream"]) == (200, "remote")
    assert answer.headers["x-ollama-proxy-heartbeat"] == "1"  # its head was the remote proxy's own
    assert answer.content.startswith(b"{")  # the remote's heartbeats were not content
    assert answer.json()["done"] is True


async def test_a_busy_answer_too_long_to_be_ollamas_is_the_pods_own_and_goes_whole(pods, make_proxy, http):
    started = pods(2)
    busy, _ = started[1]
    busy.busy, busy.busy_message = True, "server busy " + "x" * 1_000_000  # past ERROR_BODY_LIMIT
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    views = [PodView(name, 1.0, None, 0, 0, True, False) for name in "ab"]
    session = next(f"s{n}" for n in itertools.count() if rendezvous(views, f"session\0s{n}").name == "b")
    answer = await http.post(proxy + "/api/chat", json=chat(1), headers={"X-Ollama-Session": session})
    assert (answer.status_code, answer.headers["x-ollama-upstream"]) == (503, "b")
    assert answer.json()["error"] == busy.busy_message  # not cut, not moved: no "server busy" is that long


async def test_a_pod_is_refreshed_once_at_a_time(pods, make_proxy):
    proxy = make_proxy(upstreams=pool_of(pods(2)))
    pool = proxy.proxy.pool
    member = pool.by_name["a"]
    first = pool.refresh(member)
    assert pool.refresh(member) is first
    await first
    assert pool.refresh(member) is not first  # once it has ended


async def test_a_probe_that_fails_learns_nothing_more_of_the_pod(servers, pods, make_proxy):
    (_, url_a), not_ollama = pods(1)[0], servers.start(Application([]))  # 404 to everything
    proxy = make_proxy(upstreams=pool_of([(None, url_a), (None, not_ollama)]), pool_health_seconds=60)
    member = proxy.proxy.pool.by_name["b"]
    await until(lambda: member.health.last_failure is not None)  # the watch's first look
    assert member.health.last_failure.reason == "upstream 'b' answered 404"
    assert (member.models.version, member.models.loaded, member.models.listed) == (None, {}, None)
