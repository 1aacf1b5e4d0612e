"""The forwarding handler end to end: a real proxy before the stand-in Ollama on loopback."""

import asyncio
import contextlib
import email.utils
import gc
import hashlib
import itertools
import json
import socket
import time
import weakref

import httpx
import pytest

from tornado_ollama_proxy.handler import ProxyHandler
from tornado_ollama_proxy.routes import parse_routes

from .helpers import (
    BlackHole,
    CannedUpstream,
    http_1_0_answers,
    keep_alive_1_0,
    open_raw,
    raw_request,
    read_chunked_to_end,
    read_response,
    settled,
    split_response,
    until,
    unused_url,
)

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def lines(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.splitlines()]


# -- method correction, targets and headers ------------------------------------


async def test_get_with_body_reaches_ollama_as_post_with_the_same_bytes(proxy_url, fake, http):
    body = json.dumps({**CHAT, "stream": False}).encode()
    response = await http.request(
        "GET", proxy_url + "/api/chat?x=1", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert response.json()["message"]["content"] == "tok0 tok1 tok2 "
    [seen] = fake.seen
    assert (seen.method, seen.path, seen.body) == ("POST", "/api/chat", body)


async def test_the_upstream_sees_its_own_host_and_the_forwarding_headers(proxy_url, upstream_url, fake, http):
    await http.get(
        proxy_url + "/api/tags",
        headers={"Host": "abc-8000.proxy.runpod.net", "X-Forwarded-For": "203.0.113.7", "Authorization": "Bearer k"},
    )
    [seen] = fake.seen
    assert seen.headers["Host"] == upstream_url.removeprefix("http://")
    assert seen.headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert seen.headers["X-Forwarded-Host"] == "abc-8000.proxy.runpod.net"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["Authorization"] == "Bearer k"


async def test_query_and_path_reach_the_upstream_unchanged(make_proxy, http):
    canned = CannedUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    proxy = make_proxy(upstream=await canned.start())
    await http.get(proxy + "/v1/models/library%2Fllama3?a=1&b=%20")
    assert canned.requests[0].startswith(b"GET /v1/models/library%2Fllama3?a=1&b=%20 HTTP/1.1\r\n")
    await canned.stop()


async def test_an_upstream_named_by_host_name_is_resolved(make_proxy, upstream_url, http):
    proxy = make_proxy(upstream=upstream_url.replace("127.0.0.1", "localhost"))
    assert (await http.get(proxy + "/api/version")).json() == {"version": "0.32.0"}


async def test_an_ipv6_literal_upstream_is_reached_without_lookup(servers, fake, make_proxy, http):
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from .fake_ollama import make_fake_ollama

    [sock] = bind_sockets(0, "::1", family=socket.AF_INET6)
    server = HTTPServer(make_fake_ollama(fake))
    server.add_sockets([sock])
    servers.running.append((server, None))
    proxy = make_proxy(upstream=f"http://[::1]:{sock.getsockname()[1]}")
    assert (await http.get(proxy + "/api/version")).json() == {"version": "0.32.0"}
    assert fake.seen[0].headers["Host"] == f"[::1]:{sock.getsockname()[1]}"


async def test_head_probe_is_kept_and_answered_without_body(proxy_url, http):
    response = await http.head(proxy_url + "/")
    assert response.status_code == 200
    assert response.headers["content-length"] == "17"
    assert response.content == b""


async def test_head_on_a_get_only_route_gets_the_get_headers_and_no_body(proxy_url, fake, http):
    get = await http.get(proxy_url + "/api/ps")
    head = await http.head(proxy_url + "/api/ps")
    assert fake.seen[-1].method == "GET"
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == get.headers["content-type"]


async def test_blob_probe_without_body_becomes_head(proxy_url, fake, http):
    digest = "sha256:" + "0" * 64
    response = await http.get(proxy_url + "/api/blobs/" + digest)
    assert response.status_code == 404
    assert [(seen.method, seen.path) for seen in fake.seen] == [("HEAD", "/api/blobs/" + digest)]
    assert response.content == b""


async def test_override_header_picks_the_method_or_gets_405_with_allow(proxy_url, fake, http):
    ok = await http.request("GET", proxy_url + "/api/tags", headers={"X-HTTP-Method-Override": "HEAD"})
    assert ok.status_code == 200 and ok.content == b""
    refused = await http.request("GET", proxy_url + "/api/tags", headers={"X-HTTP-Method-Override": "POST"})
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD"
    assert refused.headers["content-type"] == "application/json; charset=utf-8"
    assert "allows only GET, HEAD" in refused.json()["error"]


async def test_lost_body_is_explained_not_forwarded(proxy_url, fake, http):
    response = await http.get(proxy_url + "/api/generate")
    assert response.status_code == 400
    assert "body was lost" in response.json()["error"]
    assert fake.seen == []


async def test_unmapped_paths_are_forwarded_and_get_with_body_becomes_post(proxy_url, fake, http):
    response = await http.request("GET", proxy_url + "/api/brand-new", content=b"{}")
    assert response.status_code == 404
    assert response.text == "404 page not found"  # Ollama's own answer, unchanged
    assert response.headers["content-type"] == "text/plain"


async def test_unmapped_paths_can_be_refused(make_proxy, fake, http):
    proxy = make_proxy(unmapped_paths="reject")
    response = await http.get(proxy + "/api/brand-new")
    assert response.status_code == 404
    assert response.json() == {"error": "/api/brand-new is not an Ollama endpoint this proxy knows"}


async def test_aliases_do_what_their_names_say(proxy_url, fake, http):
    listed = await http.get(proxy_url + "/api/ls")
    assert [m["name"] for m in listed.json()["models"]][:1] == ["die"]
    served = await http.get(proxy_url + "/api/serve")
    assert served.text == "Ollama is running"
    unloaded = await http.request("GET", proxy_url + "/api/stop", content=b'{"model": "llama3.2"}')
    assert unloaded.json()["done_reason"] == "unload"
    stop = fake.seen[-1]
    assert (stop.method, stop.path) == ("POST", "/api/generate")
    assert json.loads(stop.body) == {"keep_alive": 0, "model": "llama3.2"}
    assert stop.headers["Content-Length"] == str(len(stop.body))


async def test_alias_defaults_yield_to_the_clients_values(proxy_url, fake, http):
    await http.post(proxy_url + "/api/unload", json={"model": "llama3.2", "keep_alive": "5m"})
    assert json.loads(fake.seen[-1].body)["keep_alive"] == "5m"


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]"])
async def test_alias_with_a_body_that_is_not_an_object_is_a_400(proxy_url, fake, http, body):
    response = await http.request("GET", proxy_url + "/api/unload", content=body)
    assert response.status_code == 400
    assert "needs a JSON object body" in response.json()["error"]
    assert fake.seen == []


async def test_alias_body_arriving_chunked_is_collected(proxy_url, fake, http):
    async def body():
        yield b'{"model": '
        yield b'"llama3.2"}'

    response = await http.request("GET", proxy_url + "/api/stop", content=body())
    assert response.json()["done_reason"] == "unload"


async def test_alias_body_over_the_small_body_limit_is_a_413(proxy_url, fake, http):
    async def body():
        yield b'{"model": "' + b"x" * (1024 * 1024) + b'"}'

    response = await http.request("GET", proxy_url + "/api/stop", content=body())
    assert response.status_code == 413
    assert "at most 1048576 bytes" in response.json()["error"]


async def test_delete_with_a_chunked_body_streams_chunked(proxy_url, fake, http):
    async def body():
        yield b'{"model": '
        yield b'"llama3.2"}'

    response = await http.request("GET", proxy_url + "/api/delete", content=body())
    assert response.status_code == 200
    assert fake.seen[-1].method == "DELETE"
    assert fake.seen[-1].headers["Transfer-Encoding"] == "chunked"
    assert fake.seen[-1].body == b'{"model": "llama3.2"}'
    assert "llama3.2" not in fake.models


async def test_empty_bodied_answers_get_no_invented_headers(proxy_url, fake, http):
    response = await http.request("GET", proxy_url + "/api/copy", json={"source": "llama3.2", "destination": "b"})
    assert response.status_code == 200
    assert response.content == b""
    assert "content-type" not in response.headers
    assert "etag" not in response.headers and "server" not in response.headers
    assert response.headers["content-length"] == "0"


async def test_the_proxys_own_answers_carry_the_current_date_and_no_server(proxy_url, http):
    before = int(time.time())
    answers = [await http.get(proxy_url + path) for path in ("/_proxy/health", "/_proxy/nope", "/_proxy/health")]
    after = time.time()
    for answer in answers:
        assert "server" not in answer.headers
        assert before <= email.utils.parsedate_to_datetime(answer.headers["date"]).timestamp() <= after


async def test_upstream_errors_reach_the_client_unchanged(proxy_url, http):
    response = await http.request("GET", proxy_url + "/api/show", json={"model": "nope"})
    assert response.status_code == 404
    assert response.content == b'{"error": "model \'nope\' not found"}'
    assert response.headers["content-type"] == "application/json; charset=utf-8"


async def test_repeated_response_headers_and_reason_are_kept(make_proxy, http):
    canned = CannedUpstream(
        b"HTTP/1.1 299 Custom Reason\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Connection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 2\r\n\r\nok"
    )
    proxy = make_proxy(upstream=await canned.start())
    raw = await raw_request(proxy, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = split_response(raw)
    assert raw.startswith(b"HTTP/1.1 299 Custom Reason\r\n")
    assert headers["set-cookie"] == ["a=1", "b=2"]
    assert "x-hop" not in headers
    assert body == b"ok"
    await canned.stop()


async def test_an_answer_delimited_by_close_is_relayed_whole(make_proxy, http):
    canned = CannedUpstream(b'HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n{"a": 1}\n{"b": 2}\n')
    proxy = make_proxy(upstream=await canned.start())
    response = await http.get(proxy + "/api/tags")
    assert response.content == b'{"a": 1}\n{"b": 2}\n'
    assert response.headers["transfer-encoding"] == "chunked"  # re-framed for a keep-alive client
    await canned.stop()


async def test_interim_100_continue_from_upstream_is_not_relayed(make_proxy, http):
    canned = CannedUpstream(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    proxy = make_proxy(upstream=await canned.start())
    response = await http.get(proxy + "/api/tags")
    assert (response.status_code, response.content) == (200, b"ok")
    await canned.stop()


async def test_expect_100_continue_is_answered_and_the_body_follows(proxy_url, fake):
    body = json.dumps({**CHAT, "stream": False}).encode()
    reader, writer = await open_raw(proxy_url)
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
    writer.write(body)
    status, _, _ = split_response(await reader.readuntil(b"\r\n\r\n"))
    assert status == 200
    assert "Expect" not in fake.seen[0].headers and fake.seen[0].body == body
    writer.close()


async def test_http_1_0_clients_get_the_stream_ended_by_close(proxy_url, fake):
    body = json.dumps(CHAT).encode()
    raw = await raw_request(proxy_url, b"GET /api/chat HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    status, headers, payload = split_response(raw)
    assert status == 200 and "transfer-encoding" not in headers
    assert [part["done"] for part in lines(payload)] == [False, False, False, True]


async def test_an_http_1_0_client_keeping_alive_gets_an_unsized_stream_ended_by_the_close(proxy_url, fake):
    chat = keep_alive_1_0(b"GET", b"/api/chat", json.dumps(CHAT).encode())
    received, end = await http_1_0_answers(proxy_url, chat, keep_alive_1_0(b"GET", b"/api/tags"))
    status, headers, payload = split_response(received)
    assert (status, headers["connection"], end) == (200, ["close"], b"closed")
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert [part["done"] for part in lines(payload)] == [False, False, False, True]  # the next answer not in it


async def test_the_access_record_keeps_the_ask_to_keep_alive_that_a_stream_could_not_grant(make_proxy, fake, log_lines):
    proxy = make_proxy(log_headers=("Connection",))
    _, end = await http_1_0_answers(proxy, keep_alive_1_0(b"GET", b"/api/chat", json.dumps(CHAT).encode()))
    await until(lambda: [line for line in log_lines() if line["message"] == "request"])
    [record] = [line for line in log_lines() if line["message"] == "request"]
    assert (end, record["headers"]) == (b"closed", {"Connection": "keep-alive"})


async def test_an_http_1_0_client_keeping_alive_keeps_its_connection_after_a_sized_answer(proxy_url, fake):
    received, end = await http_1_0_answers(proxy_url, *[keep_alive_1_0(b"GET", b"/api/tags")] * 2)
    first, second = received.split(b"HTTP/1.1 ")[1:]
    for answer in (first, second):
        status, headers, payload = split_response(b"HTTP/1.1 " + answer)
        assert (status, headers["connection"], len(payload)) == (200, ["Keep-Alive"], int(headers["content-length"][0]))
    assert end == b"open"


# -- requests the proxy refuses ---------------------------------------------------


@pytest.mark.parametrize(
    "target, reason",
    [
        (b"http://elsewhere.example/api/tags", b"is not a path"),
        (b"/api/../../etc/passwd", b"'..' segment"),
        (b"/api/%2e%2e/x", b"'..' segment"),
        (b"/api%5c..%5cx", b"backslash"),
    ],
)
async def test_foreign_and_escaping_targets_are_refused_before_any_upstream(proxy_url, fake, target, reason):
    raw = await raw_request(proxy_url, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = split_response(raw)
    assert status == 400
    assert reason in body
    assert fake.seen == []


async def test_unknown_method_is_a_json_405(proxy_url):
    raw = await raw_request(proxy_url, b"PROPFIND /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = split_response(raw)
    assert status == 405
    assert json.loads(body) == {"error": "method not allowed"}


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ],
)
async def test_malformed_requests_get_a_400_and_reach_nobody(proxy_url, fake, request_bytes):
    raw = await raw_request(proxy_url, request_bytes)
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert fake.seen == []


async def test_absurd_headers_are_refused_by_closing_the_connection(proxy_url, fake):
    reader, writer = await open_raw(proxy_url)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert await reader.read() == b""
    assert fake.seen == []
    writer.close()


async def test_oversized_body_by_length_is_refused_before_upload(make_proxy, fake, http):
    proxy = make_proxy(max_body_size=10)
    response = await http.request("GET", proxy + "/api/chat", content=b"x" * 11)
    assert response.status_code == 413
    assert response.json() == {"error": "request body is larger than max_body_size (10 bytes)"}
    assert fake.seen == []


async def test_oversized_chunked_body_is_refused_when_it_crosses_the_limit(make_proxy, fake, http):
    proxy = make_proxy(max_body_size=10)

    async def body():
        for _ in range(4):
            yield b"x" * 6

    response = await http.request("GET", proxy + "/api/chat", content=body())
    assert response.status_code == 413
    assert fake.seen == []


# -- streaming -------------------------------------------------------------------


async def read_in_lockstep(http, fake, method, url, body, count):
    """Release one upstream chunk at a time and require it at the client before the next."""
    fake.lockstep = asyncio.Queue()
    fake.lockstep.put_nowait(True)  # the first chunk carries the response headers
    received = []
    async with http.stream(method, url, content=body) as response:
        lines_iter = response.aiter_lines()
        while len(received) < count:
            line = await asyncio.wait_for(anext(lines_iter), 5)
            if line:
                received.append(line)
                fake.lockstep.put_nowait(True)
        async for _ in lines_iter:  # to the end: a stream left half-read is never closed
            pass
        return response, received


async def test_ndjson_chat_is_relayed_line_by_line_as_generated(proxy_url, fake, http):
    response, received = await read_in_lockstep(http, fake, "GET", proxy_url + "/api/chat", json.dumps(CHAT), 4)
    assert response.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line)["done"] for line in received] == [False, False, False, True]


async def test_sse_is_relayed_event_by_event(proxy_url, fake, http):
    body = json.dumps({"model": "llama3.2", "stream": True, "messages": []})
    response, received = await read_in_lockstep(http, fake, "GET", proxy_url + "/v1/chat/completions", body, 3)
    assert response.headers["content-type"] == "text/event-stream"
    assert received[-1] == "data: [DONE]"


async def test_pull_progress_is_relayed_step_by_step(proxy_url, fake, http):
    _, received = await read_in_lockstep(http, fake, "GET", proxy_url + "/api/pull", '{"model": "x"}', 3)
    assert [json.loads(line)["status"] for line in received][-1] == "success"


async def test_spaced_chunks_arrive_spaced(proxy_url, fake, http):
    fake.chunk_delay = 0.25
    arrivals = []
    body = json.dumps({**CHAT, "options": {"num_predict": 3}})
    async with http.stream("GET", proxy_url + "/api/chat", content=body) as response:
        async for chunk in response.aiter_raw():
            arrivals.append((time.monotonic(), chunk))
    assert b"".join(c for _, c in arrivals) == b"".join(c for _, c in fake.sent)
    last_sent = fake.sent[-1][0]
    assert arrivals[0][0] < last_sent  # the first line was read before the upstream finished
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 4 and min(gaps) > 0.15


async def test_a_slow_reader_holds_the_upstream_back(proxy_url, fake):
    """Backpressure: while the client reads nothing the proxy reads (almost) nothing either."""
    total_kib = 512 * 1024
    fake.flood_done = asyncio.get_running_loop().create_future()
    reader, writer = await open_raw(proxy_url, rcvbuf=64 * 1024)
    body = json.dumps(
        {"model": "flood", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": total_kib}}
    ).encode()
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await reader.readuntil(b"\r\n\r\n")
    stalled_at = await settled(lambda: fake.flood_written)
    # Kernel socket buffers on three hops hold some MB; the proxy must hold ~nothing.
    assert stalled_at < 160 * 1024 * 1024
    received = await read_chunked_to_end(reader)
    assert fake.flood_done.done()
    assert received > total_kib * 1024
    writer.close()


async def test_a_large_upload_streams_with_flow_control(proxy_url, fake):
    """The client cannot run ahead of a stalled upstream: nothing piles up in the proxy."""
    size = 256 * 1024 * 1024
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = "sha256:" + hashlib.sha256(block * (size // len(block))).hexdigest()
    fake.blob_gate = asyncio.Event()
    reader, writer = await open_raw(proxy_url)
    writer.write(b"GET /api/blobs/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (digest.encode(), size))
    sent = 0

    async def upload():
        nonlocal sent
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
            sent += len(block)

    uploading = asyncio.ensure_future(upload())
    stalled_at = await settled(lambda: sent)
    assert stalled_at < 160 * 1024 * 1024
    assert stalled_at - fake.blob_received < 160 * 1024 * 1024
    fake.blob_gate.set()
    await uploading
    status, headers, body = split_response(await reader.readuntil(b"\r\n\r\n"))
    assert status == 201
    assert fake.blob_received == size
    writer.close()


async def test_two_hundred_streams_run_at_once(proxy_url, fake):
    connections = []
    body = json.dumps({**CHAT, "model": "silent"}).encode()
    for _ in range(200):
        reader, writer = await open_raw(proxy_url)
        writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        connections.append(writer)
    for _ in range(200):
        await asyncio.wait_for(fake.arrived.get(), 10)
    for writer in connections:
        writer.close()
    for _ in range(200):
        await asyncio.wait_for(fake.disconnected.get(), 10)


# -- clients that leave ----------------------------------------------------------


async def test_client_leaving_a_silent_upstream_aborts_it_at_once(proxy_url, fake):
    reader, writer = await open_raw(proxy_url)
    body = json.dumps({**CHAT, "model": "silent"}).encode()
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await asyncio.wait_for(fake.arrived.get(), 5)
    writer.close()
    assert await asyncio.wait_for(fake.disconnected.get(), 1) == "/api/chat"


async def test_client_leaving_mid_stream_aborts_the_upstream(proxy_url, fake):
    reader, writer = await open_raw(proxy_url)
    body = json.dumps({**CHAT, "model": "stall"}).encode()
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await reader.readuntil(b'"done": false}\n')
    writer.close()
    assert await asyncio.wait_for(fake.disconnected.get(), 1) == "/api/chat"


async def test_client_leaving_mid_upload_aborts_the_upstream(proxy_url, fake):
    reader, writer = await open_raw(proxy_url)
    writer.write(b"GET /api/blobs/sha256:%s HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" % (b"1" * 64))
    writer.write(b"x" * 1000)
    await asyncio.wait_for(fake.arrived.get(), 5)
    writer.close()
    assert await asyncio.wait_for(fake.disconnected.get(), 1) == "/api/blobs/sha256:" + "1" * 64


async def test_client_leaving_while_an_alias_body_is_collected_reaches_nobody(proxy_url, fake):
    reader, writer = await open_raw(proxy_url)
    writer.write(b'GET /api/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"')
    await writer.drain()
    writer.close()
    # The proxy is still answering other requests, and nothing was forwarded.
    assert (await raw_request(proxy_url, b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")).endswith(b'0.32.0"}')
    assert [seen.path for seen in fake.seen] == ["/api/version"]


async def test_client_leaving_during_a_fast_stream_stops_the_upstream(proxy_url, fake):
    reader, writer = await open_raw(proxy_url, rcvbuf=64 * 1024)
    body = json.dumps(
        {"model": "flood", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": 1024 * 1024}}
    ).encode()
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await reader.readexactly(1024 * 1024)
    writer.transport.abort()  # like a killed client: the socket goes away unread
    assert await asyncio.wait_for(fake.disconnected.get(), 2) == "/api/chat"
    assert fake.flood_written < 1024 * 1024 * 1024


# -- upstream failures -------------------------------------------------------------


async def test_upstream_refusing_while_a_body_arrives_is_a_502(make_proxy, http):
    url = unused_url()
    response = await http.request("GET", make_proxy(upstream=url) + "/api/chat", content=b"{}" * 100_000)
    assert response.status_code == 502
    assert response.json() == {"error": "upstream 'default' refused the connection"}


async def test_upstream_closing_during_an_upload_is_a_502(make_proxy, http):
    canned = CannedUpstream(b"")  # reads the head, then hangs up on the body
    url = await canned.start()

    async def body():
        for _ in range(64):
            yield b"x" * (256 * 1024)

    response = await http.request("GET", make_proxy(upstream=url) + "/api/blobs/sha256:" + "2" * 64, content=body())
    assert response.status_code == 502
    assert response.json()["error"].endswith("closed the connection without a valid HTTP response")
    await canned.stop()


async def test_an_answer_before_the_whole_body_reaches_the_client_whole(make_proxy, http):
    refusal = b'{"error":"invalid blob"}'
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    upstream = CannedUpstream(answer % (len(refusal), refusal))  # hangs up, body unread
    url = await upstream.start()

    async def body():
        for _ in range(32):
            yield b"x" * (256 * 1024)

    response = await http.request("GET", make_proxy(upstream=url) + "/api/blobs/sha256:" + "3" * 64, content=body())
    assert (response.status_code, response.content) == (400, refusal)
    await upstream.stop()


async def test_a_request_answered_before_its_body_leaves_nothing_behind(make_proxy, http, monkeypatch):
    # Nothing may keep the finished handler: not a timer armed once the body was in.
    freed, initialize = asyncio.Event(), ProxyHandler.initialize

    def tracked(handler):
        initialize(handler)
        weakref.finalize(handler, freed.set)

    monkeypatch.setattr(ProxyHandler, "initialize", tracked)

    upstream = CannedUpstream(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}", linger=True)
    proxy = make_proxy(upstream=await upstream.start(), idle_timeout=300)
    response = await http.request("GET", proxy + "/api/blobs/sha256:" + "4" * 64, content=b"x" * 4_000_000)
    assert response.status_code == 400
    for _ in range(200):  # the handler's own tasks end a few loop turns after the answer
        gc.collect()
        if freed.is_set():
            break
        await asyncio.sleep(0.01)
    assert freed.is_set()
    await upstream.stop()


async def test_a_body_outgrowing_the_limit_after_the_answer_started_cuts_the_answer(make_proxy):
    upstream = CannedUpstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", linger=True)
    proxy = make_proxy(upstream=await upstream.start(), max_body_size=100_000)
    reader, writer = await open_raw(proxy)
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert await reader.readuntil(b"hello\r\n") == b"5\r\nhello\r\n"
    writer.write(b"30d40\r\n" + b"x" * 200_000 + b"\r\n")
    with contextlib.suppress(ConnectionResetError):  # closed under unread bytes: a reset
        assert await reader.read() == b""  # cut: no last chunk, the client can tell
    writer.close()
    await upstream.stop()


async def test_refused_connection_is_a_502_naming_the_upstream(make_proxy, http):
    url = unused_url()
    proxy = make_proxy(upstream=url)
    response = await http.get(proxy + "/api/tags")
    assert response.status_code == 502
    assert response.json() == {"error": "upstream 'default' refused the connection"}


async def test_connect_timeout_is_a_504(make_proxy, http):
    hole = BlackHole()
    proxy = make_proxy(upstream=hole.url, connect_timeout=0.3)
    response = await http.get(proxy + "/api/tags")
    hole.close()
    assert response.status_code == 504
    assert response.json() == {"error": "upstream 'default' did not accept the connection within 0.3 s"}


async def test_silent_upstream_hits_the_idle_timeout_with_a_504(make_proxy, fake, http):
    proxy = make_proxy(idle_timeout=0.3)
    response = await http.request("GET", proxy + "/api/chat", json={**CHAT, "model": "silent"})
    assert response.status_code == 504
    assert response.json()["error"].endswith("sent nothing for 0.3 s")
    assert await asyncio.wait_for(fake.disconnected.get(), 1) == "/api/chat"


async def test_idle_timeout_mid_stream_cuts_the_connection(make_proxy, fake, http):
    proxy = make_proxy(idle_timeout=0.3)
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("GET", proxy + "/api/chat", json={**CHAT, "model": "stall"}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                received.append(json.loads(line))
    assert [part["done"] for part in received] == [False]  # never a fake "done"


async def test_active_streams_outlive_the_idle_timeout(make_proxy, fake, http):
    proxy = make_proxy(idle_timeout=0.3)
    fake.chunk_delay = 0.2
    response = await http.request("GET", proxy + "/api/chat", json={**CHAT, "options": {"num_predict": 4}})
    assert [part["done"] for part in lines(response.content)] == [False] * 4 + [True]


async def test_a_slow_client_is_not_mistaken_for_a_silent_upstream(make_proxy, fake):
    """A reader that keeps taking bytes, however slowly, is not silence: the upstream,
    held back by it, is not timed out."""
    proxy = make_proxy(idle_timeout=0.5)
    fake.flood_done = asyncio.get_running_loop().create_future()
    reader, writer = await open_raw(proxy, rcvbuf=16 * 1024)
    body = json.dumps(
        {"model": "flood", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": 64 * 1024}}
    ).encode()
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await reader.readuntil(b"\r\n\r\n")
    slow_until = asyncio.get_running_loop().time() + 2.0  # four idle timeouts
    while asyncio.get_running_loop().time() < slow_until:
        assert await reader.read(16 * 1024)
        await asyncio.sleep(0.05)  # a slow reader (about 300 KB/s), but a reader
    assert not fake.flood_done.done()  # held back all along
    await read_chunked_to_end(reader)  # complete, not cut
    assert fake.flood_done.done()
    writer.close()


async def test_upstream_dying_mid_stream_cuts_the_connection(proxy_url, fake, http):
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("GET", proxy_url + "/api/chat", json={**CHAT, "model": "die"}) as response:
            async for line in response.aiter_lines():
                received.append(json.loads(line))
    assert len(received) == 2 and not any(part["done"] for part in received)


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"", "closed the connection without a valid HTTP response"),
        (b"SPDY/9 banana\r\n\r\n", "sent an answer this proxy cannot relay: invalid HTTP/1.1 answer: Expected HTTP/"),
    ],
)
async def test_upstream_closing_without_a_valid_answer_is_a_502(make_proxy, http, answer, reason):
    canned = CannedUpstream(answer)
    url = await canned.start()
    response = await http.get(make_proxy(upstream=url) + "/api/tags")
    assert response.status_code == 502
    assert response.json()["error"].startswith(f"upstream 'default' {reason}")
    await canned.stop()


async def test_other_connection_failures_are_a_502_with_the_reason(make_proxy, http):
    plain = CannedUpstream(b"HTTP/1.1 400 Bad Request\r\n\r\n", read_request=False)
    tls_to_plain = (await plain.start()).replace("http://", "https://")
    response = await http.get(make_proxy(upstream=tls_to_plain) + "/api/tags")
    assert response.status_code == 502
    assert response.json()["error"].startswith("upstream 'default' could not be reached: [SSL")
    await plain.stop()


# -- browser apps ------------------------------------------------------------------

APP = "https://chat.example.com"


async def test_without_cors_origins_ollama_judges_the_origin(proxy_url, fake, http):
    response = await http.request("GET", proxy_url + "/api/chat", json=CHAT, headers={"Origin": APP})
    assert response.status_code == 403 and response.content == b""  # Ollama's own refusal


@pytest.mark.parametrize("method", ["OPTIONS", "GET"])  # the platform turns OPTIONS into GET too
async def test_preflight_is_answered_by_the_proxy(make_proxy, fake, http, method):
    proxy = make_proxy(cors_origins=(APP,))
    response = await http.request(
        method,
        proxy + "/api/chat",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == APP
    assert response.headers["access-control-allow-headers"] == "content-type"
    assert "content-type" not in response.headers
    assert fake.seen == []


async def test_granted_origin_is_removed_upstream_and_named_in_the_answer(make_proxy, fake, http):
    proxy = make_proxy(cors_origins=(APP,))
    async with http.stream("GET", proxy + "/api/chat", json=CHAT, headers={"Origin": APP}) as response:
        body = await response.aread()
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == APP
    assert response.headers["vary"] == "Origin"
    assert lines(body)[-1]["done"] is True
    assert "Origin" not in fake.seen[0].headers


async def test_errors_the_proxy_makes_are_readable_by_a_granted_origin(make_proxy, http):
    proxy = make_proxy(cors_origins=("*",), upstream=unused_url())
    response = await http.get(proxy + "/api/tags", headers={"Origin": APP})
    assert response.status_code == 502
    assert response.headers["access-control-allow-origin"] == APP


async def test_other_origins_are_left_to_ollama(make_proxy, fake, http):
    proxy = make_proxy(cors_origins=(APP,))
    response = await http.request("GET", proxy + "/api/chat", json=CHAT, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers


# -- the proxy's own endpoints ------------------------------------------------------


async def test_health_reports_the_upstream(proxy_url, upstream_url, http):
    response = await http.get(proxy_url + "/_proxy/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "upstream": "default", "upstream_version": "0.32.0"}


async def test_health_is_503_with_the_reason_when_the_upstream_is_down(make_proxy, http):
    url = unused_url()
    response = await http.get(make_proxy(upstream=url) + "/_proxy/health")
    assert response.status_code == 503
    assert response.json() == {"error": "upstream 'default' refused the connection"}


async def test_health_is_503_when_the_upstream_does_not_answer_in_time(make_proxy, http):
    hole = BlackHole()
    response = await http.get(make_proxy(upstream=hole.url, connect_timeout=0.3) + "/_proxy/health")
    hole.close()
    assert response.status_code == 503
    assert response.json() == {"error": "upstream 'default' did not answer within 0.3 s"}


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "answered 500"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "does not answer like Ollama"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "does not answer like Ollama"),
    ],
)
async def test_health_is_503_when_the_upstream_is_not_a_healthy_ollama(make_proxy, http, answer, reason):
    canned = CannedUpstream(answer)
    response = await http.get(make_proxy(upstream=await canned.start()) + "/_proxy/health")
    assert response.status_code == 503
    assert reason in response.json()["error"]
    await canned.stop()


async def test_the_reserved_prefix_is_never_forwarded(proxy_url, fake, http):
    response = await http.get(proxy_url + "/_proxy/nothing")
    assert response.status_code == 404
    assert response.json() == {"error": "/_proxy/nothing is not an endpoint of this proxy"}
    assert fake.seen == []


# -- early answers keep the connection usable, or say they close it ------------------

VERSION = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"


def request_bytes(method: bytes, target: bytes, body: bytes = b"", *headers: bytes) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: x", *headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


EARLY_ANSWERS = {
    "rate limited": (
        {"rate_limit_routes": {"/api/chat": "0/minute"}},
        request_bytes(b"POST", b"/api/chat", b'{"model": "x"}'),
        429,
    ),
    "concurrency cap": ({"concurrency_total": 1, "rate_limit_exempt": ()}, None, 503),
    "bad target": ({}, request_bytes(b"POST", b"/api/../x", b'{"a": 1}'), 400),
    "lost body": ({}, request_bytes(b"GET", b"/api/chat"), 400),
    "unmapped rejected": ({"unmapped_paths": "reject"}, request_bytes(b"POST", b"/api/new", b"{}"), 404),
    "bad override": ({}, request_bytes(b"GET", b"/api/tags", b"", b"X-HTTP-Method-Override: POST"), 405),
    "reserved, encoded": ({}, request_bytes(b"GET", b"/%5Fproxy/health"), 404),
}


@pytest.mark.parametrize("name", EARLY_ANSWERS)
async def test_an_early_answer_leaves_the_connection_usable(make_proxy, fake, name):
    overrides, request, status = EARLY_ANSWERS[name]
    if request is None:  # the cap is taken by a silent stream first
        proxy = make_proxy(**overrides)
        _, holder = await open_raw(proxy)
        body = json.dumps({**CHAT, "model": "silent"}).encode()
        holder.write(request_bytes(b"POST", b"/api/chat", body))
        await asyncio.wait_for(fake.arrived.get(), 5)
        request = request_bytes(b"POST", b"/api/show", b'{"model": "llama3.2"}')
    else:
        proxy = make_proxy(**overrides)
    reader, writer = await open_raw(proxy)
    writer.write(request)
    answered, headers, body = await read_response(reader)
    assert answered == status and "error" in json.loads(body)
    assert "connection" not in headers  # kept: its small body was read and dropped
    if name == "concurrency cap":
        holder.close()
        await asyncio.wait_for(fake.disconnected.get(), 5)
    writer.write(VERSION)  # the same connection serves the next request
    assert await read_response(reader) == (200, ANY_HEADERS, b'{"version": "0.32.0"}')
    writer.close()


class _AnyHeaders:
    def __eq__(self, other):
        return isinstance(other, dict)


ANY_HEADERS = _AnyHeaders()


async def test_an_early_answer_to_a_large_body_says_it_closes_and_does(make_proxy, fake):
    proxy = make_proxy(rate_limit_routes={"/api/blobs/{digest}": "0/minute"})
    reader, writer = await open_raw(proxy)
    size = 10 * 1024 * 1024
    writer.write(b"POST /api/blobs/sha256:%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (b"5" * 64, size))
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"]) == (429, ["close"])
    assert await reader.read() == b""  # closed, as it said: not left for a front to reuse
    assert fake.seen == []
    writer.close()


async def test_a_chunked_body_under_a_refusal_is_read_until_it_grows_too_large(make_proxy, fake):
    proxy = make_proxy(rate_limit_routes={"/api/chat": "0/minute"})
    reader, writer = await open_raw(proxy)
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
    await asyncio.sleep(0.2)  # the refusal waits for the body to end: nothing may arrive yet
    assert not reader._buffer
    writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")  # past the amount worth reading for nothing
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (429, ["close"])
    writer.close()


async def test_a_preflight_on_a_kept_connection_leaves_it_usable(make_proxy, fake):
    proxy = make_proxy(cors_origins=(APP,))
    reader, writer = await open_raw(proxy)
    writer.write(
        request_bytes(b"OPTIONS", b"/api/chat", b"", b"Origin: " + APP.encode(), b"Access-Control-Request-Method: POST")
    )
    status, headers, _ = await read_response(reader)
    assert status == 204 and "connection" not in headers
    writer.write(VERSION)
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_an_unknown_method_answer_says_it_closes(proxy_url):
    reader, writer = await open_raw(proxy_url)
    writer.write(b"BREW /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"], json.loads(body)) == (405, ["close"], {"error": "method not allowed"})
    assert await reader.read() == b""
    writer.close()


# -- framing Tornado would refuse later is checked first --------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 0\r\nTransfer-Encoding: chunked",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: gzip, chunked",
        b"Content-Length: 2\r\nContent-Length: 3",
    ],
)
async def test_framing_tornado_refuses_is_answered_once_before_anything_else(make_proxy, fake, framing):
    proxy = make_proxy(rate_limit="1/minute")
    reader, writer = await open_raw(proxy)
    writer.write(b"POST /api/version HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n0\r\n\r\n")
    raw = await reader.read()  # everything, to the close
    status, headers, body = split_response(raw)
    assert status == 400 and headers["connection"] == ["close"]
    assert body == json.dumps({"error": json.loads(body)["error"]}).encode()  # one answer, nothing after it
    assert fake.seen == []  # nothing went upstream
    writer.close()
    # ... and the client's limit was not charged for it.
    assert (await raw_request(proxy, VERSION)).startswith(b"HTTP/1.1 200 ")


# -- targets ------------------------------------------------------------------------------


async def test_a_fragment_in_the_target_is_refused(proxy_url, fake):
    status, _, body = split_response(
        await raw_request(proxy_url, b"POST /api/pull#1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    )
    assert status == 400 and b"'#'" in body
    assert fake.seen == []


@pytest.mark.parametrize("target", [b"/%5Fproxy/health", b"/_proxy%2fhealth", b"/%5f%70roxy/metrics"])
async def test_the_reserved_prefix_is_never_forwarded_however_spelled(proxy_url, fake, target):
    status, _, body = split_response(await raw_request(proxy_url, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 404 and b"is not an endpoint of this proxy" in body
    assert fake.seen == []


async def test_placeholders_reach_the_upstream_path_still_encoded(make_proxy):
    canned = CannedUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    route = {"path": "/x/{name}", "methods": ["GET"], "upstream_path": "/api/y/{name}"}
    proxy = make_proxy(upstream=await canned.start(), routes=parse_routes([route]))
    await raw_request(proxy, b"GET /x/a%20b%3Fc%2Fd?q=%2F HTTP/1.1\r\nHost: x\r\n\r\n")
    assert canned.requests[0].startswith(b"GET /api/y/a%20b%3Fc%2Fd?q=%2F HTTP/1.1\r\n")
    await canned.stop()


async def test_an_untrusted_peer_cannot_say_which_scheme_or_host_it_used(proxy_url, fake, http):
    await http.get(proxy_url + "/api/tags", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"})
    [seen] = fake.seen
    assert (seen.headers["X-Forwarded-Proto"], seen.headers["X-Forwarded-Host"]) == (
        "http",
        proxy_url.removeprefix("http://"),
    )


@pytest.mark.parametrize(
    "head",
    [
        b"HEAD /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 9223372036854775808\r\n\r\n",
        b"POST /api/blobs/sha256:"
        + b"1" * 64
        + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + b"9" * 5000
        + b"\r\n\r\n",
    ],
)
async def test_a_length_no_body_can_have_is_refused_before_anything_goes_upstream(proxy_url, fake, head):
    reader, writer = await open_raw(proxy_url)
    writer.write(head)
    status, headers, body = await read_response(reader, head=head.startswith(b"HEAD"))
    assert (status, headers["connection"]) == (400, ["close"])
    assert head.startswith(b"HEAD") or b"is larger than any body this proxy accepts" in body
    assert await reader.read() == b""
    assert fake.seen == []
    writer.close()


async def test_a_body_nested_too_deep_to_parse_is_relayed_and_keeps_no_slot(make_proxy, fake, http, log_lines):
    # 800 KB, 400,000 levels: too deep for every Python's parser (3.13 reads 5,000)
    nested = b'{"model": "llama3.2", "a": ' + b"[" * 400_000 + b"]" * 400_000 + b"}"
    proxy = make_proxy(concurrency_total=1)
    for _ in range(3):
        relayed = await http.post(proxy + "/api/chat", content=nested)
        assert relayed.status_code == 400  # Ollama's answer, as for any body it cannot read
    alias = await http.post(proxy + "/api/stop", content=nested)
    assert (alias.status_code, alias.json()) == (
        400,
        {"error": '/api/stop needs a JSON object body, such as {"model": "llama3.2"}'},
    )
    assert (await http.get(proxy + "/api/version")).status_code == 200  # the one slot is free
    assert not [line for line in log_lines() if line["level"] == "ERROR"]
    assert {line["model"] for line in log_lines() if line["message"] == "request" and line["route"] == "/api/chat"} == {
        None
    }


@pytest.mark.parametrize("with_limiter", [False, True])
async def test_a_client_that_closes_its_side_gets_no_answer_it_did_not_ask_for(make_proxy, fake, with_limiter):
    proxy = make_proxy(rate_limit="100/minute" if with_limiter else None)
    reader, writer = await open_raw(proxy)
    body = json.dumps({**CHAT, "stream": False}).encode()
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    writer.write_eof()  # half-closed, as Tornado takes leaving
    assert await asyncio.wait_for(reader.read(), 5) == b""  # no fake 200: nothing at all
    assert fake.seen == []
    writer.close()
