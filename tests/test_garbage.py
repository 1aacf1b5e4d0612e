"""A forwarded request's objects are freed as it ends, none left in a reference cycle,
however it ends: collecting those costs a busy proxy a fifth of its CPU or more, and a
cycle holds what its request held (its body among them) until a collection finds it,
later the longer it lived."""

import asyncio
import gc
import hashlib
import json
import logging
import weakref

import pytest
from _pytest.logging import LogCaptureHandler

from tornado_ollama_proxy.auth import parse_entries
from tornado_ollama_proxy.server import YOUNG_COLLECTION, start_up_frozen

from .helpers import ScriptedUpstream, open_raw, pool_of, read_response, ready, send_json, until, unused_url

CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}).encode()
SHOW = json.dumps({"model": "llama3.2"}).encode()


async def left_in_cycles(action, log_lines, servers, proxy) -> list[str]:
    """The types of the proxy's objects that `action`'s requests left in reference cycles,
    once each has its access record and the proxy has closed their connections (which
    hold a request until then: not garbage yet, in a cycle or not)."""
    [server] = [server for server, app in servers.running if app.settings.get("proxy") is proxy.proxy]
    gc.collect()
    # Objects of earlier tests' proxies, torn down but not yet collected, are not these requests'.
    earlier = {id(found) for found in gc.get_objects()}
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept for a look, not freed
    try:
        requests = await action()
        await until(lambda: len([line for line in log_lines() if line["message"] == "request"]) == requests)
        await until(lambda: not server.served)
        # pytest's log capture keeps each record, and what it names (an error, its
        # traceback): a running proxy's handler lets go of them once written.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, LogCaptureHandler):
                handler.clear()
        gc.collect()
        return sorted({type(found).__qualname__ for found in gc.garbage if _ours(found) and id(found) not in earlier})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_requests_that_ended_leave_no_cycle_of_the_proxys_objects(proxy_url, log_lines, servers):
    requests = [
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(SHOW), SHOW),  # sent as POST
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT),  # streamed
        b"HEAD /api/tags HTTP/1.1\r\nHost: x\r\n\r\n",
    ]

    async def answered():
        reader, writer = await open_raw(proxy_url)
        for request in requests:
            writer.write(request)
            status, _, _ = await read_response(reader, head=request.startswith(b"HEAD"))
            assert status == 200
        writer.close()
        return len(requests)

    assert await left_in_cycles(answered, log_lines, servers, proxy_url) == []


async def answer_of(url, request: bytes, status: int) -> int:
    reader, writer = await open_raw(url)
    writer.write(request)
    assert (await read_response(reader))[0] == status
    writer.close()
    return 1


async def left_halfway(url, request: bytes, *, answer_head: bool = False) -> int:
    """Send `request` (a body cut short, or whole) and leave: at once, or once the answer's head is in."""
    reader, writer = await open_raw(url)
    writer.write(request)
    if answer_head:
        await reader.readuntil(b"\r\n\r\n")
    else:
        await until(lambda: url.proxy.exchanges)  # the proxy is taking the body upstream
    writer.close()
    return 1


BLOB = b"y" * 300_000  # more than a body held whole: streamed upstream
BLOB_PATH = b"/api/blobs/sha256:" + hashlib.sha256(BLOB).hexdigest().encode()
KEY = "sk-" + "k" * 40


def post(path: bytes, body: bytes, length: int | None = None) -> bytes:
    """A POST of `body`, which says it is `length` bytes long (a body cut short), or its own length."""
    length = len(body) if length is None else length
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path, length, body)


ENDINGS = {
    "the pod answers 404": (dict(), lambda url: answer_of(url, post(b"/api/show", b'{"model": "nope"}'), 404)),
    "refused before its body": (dict(), lambda url: answer_of(url, b"GET /api/show HTTP/1.1\r\nHost: x\r\n\r\n", 400)),
    "without a key": (
        dict(api_keys=parse_entries([{"name": "k", "key": KEY}])),
        lambda url: answer_of(url, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    ),
    "a body too large": (dict(max_body_size=100), lambda url: answer_of(url, post(b"/api/chat", b"x" * 1000), 413)),
    "no pod to reach": (
        dict(upstream=unused_url()),
        lambda url: answer_of(url, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n", 502),
    ),
    "the pod falls silent": (
        dict(idle_timeout=0.3),
        lambda url: answer_of(url, post(b"/api/show", b'{"model": "slow"}'), 504),
    ),
    "a streamed body whole": (dict(), lambda url: answer_of(url, post(BLOB_PATH, BLOB), 201)),
    "the client leaves mid-body": (dict(), lambda url: left_halfway(url, post(b"/api/chat", CHAT[:20], len(CHAT)))),
    "the client leaves mid-stream of its body": (
        dict(),
        lambda url: left_halfway(url, post(BLOB_PATH, BLOB[:100_000], len(BLOB))),
    ),
    "the client leaves mid-way through a chunked body": (
        dict(),
        lambda url: left_halfway(
            url, b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s" % (20, CHAT[:20])
        ),
    ),
    "the client leaves mid-answer": (dict(), lambda url: left_halfway(url, post(b"/api/chat", CHAT), answer_head=True)),
}


@pytest.mark.parametrize("ending", ENDINGS)
async def test_requests_that_failed_or_were_left_leave_no_cycle(make_proxy, fake, log_lines, servers, ending):
    fake.silence = 2.0  # how long "slow" takes
    settings, action = ENDINGS[ending]
    url = make_proxy(**settings)
    assert await left_in_cycles(lambda: action(url), log_lines, servers, url) == []


async def test_fanned_out_and_queued_requests_leave_no_cycle(pods, make_proxy, log_lines, servers):
    a, b = pods(2, slots=1)
    a.state.models = b.state.models = {"stall", "llama3.2"}
    proxy = make_proxy(upstreams=pool_of([a, b], slots=1))
    await ready(proxy)
    stall = json.dumps({"model": "stall", "messages": [{"role": "user", "content": "holder"}]}).encode()
    holders = []

    async def fanned_out_and_left_in_line():
        requests = await answer_of(proxy, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n", 200)  # every pod's list
        for _ in range(2):  # a slot at each pod, held
            reader, writer = await send_json(proxy, b"POST", b"/api/chat", json.loads(stall))
            await reader.readuntil(b"\r\n\r\n")
            holders.append(writer)
        _, writer = await send_json(proxy, b"POST", b"/api/chat", json.loads(CHAT))
        await until(lambda: proxy.proxy.queue.size == 1)
        writer.close()  # it leaves the line
        await until(lambda: proxy.proxy.queue.size == 0)
        for holder in holders:
            holder.close()
        return requests + 3

    assert await left_in_cycles(fanned_out_and_left_in_line, log_lines, servers, proxy) == []


def _ours(found: object) -> bool:
    """The proxy's own objects, and its upstream parser's. Not Tornado's alone: the stand-in
    Ollama serves on Tornado in this process too, and its handlers have Tornado's cycles
    (any handler whose client leaves mid-body has); each the proxy's requests left had
    objects of the proxy's in it (its handler, its journey, its exchange)."""
    module = type(found).__module__ or ""
    return module.startswith(("tornado_ollama_proxy", "httptools"))


class Node:
    """An object that can be part of a cycle, and be watched go."""


def test_while_serving_start_up_objects_are_out_of_collections_and_the_young_collected_more_rarely():
    before = gc.get_threshold()
    with start_up_frozen():
        assert gc.get_freeze_count() > 10_000  # what exists at start-up
        assert gc.get_threshold() == (YOUNG_COLLECTION, *before[1:])
        node = Node()
        node.itself = node  # a cycle: its count never falls to nothing
        gone = weakref.ref(node)
        del node
        kept = [[] for _ in range(2 * YOUNG_COLLECTION)]
        assert gone() is None and kept  # collected with the youngest generation, if later
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


BAD_FRAMING = {  # a chunked body whose framing goes wrong after the proxy has begun to send it on
    "a bad second chunk size": b"zz\r\n",
    "a trailer": b"0\r\nX-Bad: 1\r\n\r\n",
    "a chunk longer than its size": b"5\r\nabcdeXX",
}


@pytest.mark.parametrize("rest", BAD_FRAMING.values(), ids=BAD_FRAMING)
async def test_a_body_whose_framing_goes_wrong_midway_leaves_no_cycle(proxy_url, log_lines, servers, rest):
    async def cut():
        reader, writer = await open_raw(proxy_url)
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % BLOB_PATH)
        writer.write(b"%x\r\n%s\r\n" % (100_000, BLOB[:100_000]))
        await until(lambda: proxy_url.proxy.exchanges)  # the proxy is taking the body upstream
        writer.write(rest)
        assert await reader.read() == b"HTTP/1.1 400 Bad Request\r\n\r\n"  # Tornado's, as the request ends
        writer.close()
        return 1

    assert await left_in_cycles(cut, log_lines, servers, proxy_url) == []


BAD_ANSWERS = {  # a chunked answer from the pod whose framing goes wrong
    "a bad first chunk size": (b"", b"zz\r\n"),
    "a bad second chunk size": (b'{"done": false}\n', b"zz\r\n"),
    "a chunk longer than its size": (b'{"done": false}\n', b"5\r\nabcdeXX"),
}


@pytest.mark.parametrize(("first", "rest"), BAD_ANSWERS.values(), ids=BAD_ANSWERS)
async def test_an_answer_whose_framing_goes_wrong_leaves_no_cycle(make_proxy, log_lines, servers, first, rest):
    relayed = asyncio.Event()  # the client has the first piece: the rest comes in a read of its own

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
        if first:
            writer.write(b"%x\r\n%s\r\n" % (len(first), first))
            await relayed.wait()
        writer.write(rest)
        await reader.read()  # until the proxy drops the connection

    proxy = make_proxy(upstream=await ScriptedUpstream(answer).start())

    async def cut_short():
        reader, writer = await open_raw(proxy)
        writer.write(b"GET /x/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if first:
            await reader.readuntil(first)
            relayed.set()
        await reader.read()  # cut short, or a 502
        writer.close()
        return 1

    assert await left_in_cycles(cut_short, log_lines, servers, proxy) == []
