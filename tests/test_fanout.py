"""Management calls and lists over several pods: one answer made of every pod's, and every
way a fan-out ends (a pod failing, a pod saying nothing of success, none up, the client
leaving)."""

import asyncio
import json

from tornado_ollama_proxy.fanout import LIST_LIMIT, Share

from .fake_ollama import NO_SPACE
from .helpers import pool_of, read_response, ready, send_json, until

PULL_FAILED = f"a: {NO_SPACE}; b: {NO_SPACE}"


async def next_of(queue, path):
    """Wait for `path` in a stand-in's queue of paths (the pool's own probes go by)."""
    while await queue.get() != path:
        pass


def test_a_pods_list_is_kept_up_to_its_limit_and_no_further():
    share = Share(member=None)
    piece = b"x" * 4096
    while share.size < LIST_LIMIT:
        share.keep(piece)
    kept = share.size
    share.keep(piece)
    assert share.size == kept and share.whole == piece * (kept // len(piece))


async def test_each_pods_in_band_error_ends_one_progress_naming_them_all(pods, make_proxy):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    reader, writer = await send_json(proxy, b"POST", b"/api/pull", {"model": "nospace"})
    status, _, body = await read_response(reader)
    lines = [json.loads(line) for line in body.splitlines()]
    assert status == 200
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"error": PULL_FAILED}
    assert lines[-2] == {"status": "pulling abc", "digest": "sha256:abc", "total": 20, "completed": 20}
    assert not any(line.get("status") == "success" for line in lines)
    writer.close()


async def test_a_progress_that_ends_without_success_is_a_failure_of_that_pod(pods, make_proxy, log_lines):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    reader, writer = await send_json(proxy, b"POST", b"/api/pull", {"model": "unfinished"})
    status, _, body = await read_response(reader)
    last = json.loads(body.splitlines()[-1])
    assert (status, last) == (
        200,
        {"error": "a: its progress ended without success; b: its progress ended without success"},
    )
    [record] = [line for line in log_lines() if line["message"] == "request"]
    assert (record["outcome"], record["upstream"], record["attempts"]) == ("upstream_error", "a,b", 2)
    writer.close()


async def test_a_whole_answer_after_a_heartbeat_tells_the_pods_failure_in_band(pods, make_proxy):
    started = pods(2, silence=0.6)  # the pull fails after that long, silent meanwhile
    proxy = make_proxy(upstreams=pool_of(started), heartbeat_seconds=0.2)
    await ready(proxy)
    reader, writer = await send_json(proxy, b"POST", b"/api/pull", {"model": "nospace", "stream": False})
    status, headers, body = await read_response(reader)
    assert (status, headers["content-type"]) == (200, ["application/json"])
    message = f"a: {NO_SPACE}; b: {NO_SPACE}"
    assert json.loads(body) == {"status": f"error: {message}", "error": message}  # read by ollama's pull()
    assert body.startswith(b" ")  # the heartbeat that kept the front from cutting it
    writer.close()


async def test_a_client_that_leaves_a_fan_out_lets_every_pod_go_and_is_answered_nothing(pods, make_proxy, log_lines):
    started = pods(2, silence=30)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    for stream in (True, False):
        reader, writer = await send_json(proxy, b"POST", b"/api/pull", {"model": "nospace", "stream": stream})
        for state, _ in started:
            await asyncio.wait_for(next_of(state.arrived, "/api/pull"), 5)
        writer.close()
        for state, _ in started:
            await asyncio.wait_for(next_of(state.disconnected, "/api/pull"), 5)  # at once, not after 30 s
    await until(lambda: len([line for line in log_lines() if line["message"] == "request"]) == 2)
    records = [line for line in log_lines() if line["message"] == "request"]
    assert [record["outcome"] for record in records] == ["client_gone", "client_gone"]


async def test_with_every_pod_down_a_list_or_a_pull_is_the_pools_502(pods, make_proxy, http):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started), pool_max_fails=1, pool_eject_seconds=60)
    await ready(proxy)
    for pod in started:
        await pod.kill()
    await http.get(proxy + "/api/tags")  # each pod refuses: both ejected
    for answer in (
        await http.get(proxy + "/api/tags"),
        await http.post(proxy + "/api/pull", json={"model": "x"}),
        await http.post(proxy + "/api/pull", json={"model": "x", "stream": False}),
    ):
        assert answer.status_code == 502
        assert answer.json()["error"].startswith("no upstream can take the request: 'a': ")


async def test_a_delete_that_names_no_model_is_answered_by_one_pod(pods, make_proxy, http):
    started = pods(2)
    proxy = make_proxy(upstreams=pool_of(started))
    await ready(proxy)
    answer = await http.request("DELETE", proxy + "/api/delete", json={})
    assert (answer.status_code, answer.json()) == (400, {"error": "a: model is required"})
    assert sum(1 for state, _ in started for seen in state.seen if seen.path == "/api/delete") == 1
