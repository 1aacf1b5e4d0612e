"""A forwarded request's objects are freed as it ends, none left in a reference cycle:
collecting those costs a busy proxy a fifth of its CPU or more."""

import gc
import json
import weakref

from tornado_ollama_proxy.server import YOUNG_COLLECTION, rare_collections

from .helpers import open_raw, read_response, until

CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}).encode()
SHOW = json.dumps({"model": "llama3.2"}).encode()


async def test_requests_that_ended_leave_no_cycle_of_the_proxys_objects(proxy_url, log_lines):
    requests = [
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(SHOW), SHOW),  # sent as POST
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT),  # streamed
        b"HEAD /api/tags HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    gc.collect()
    # Objects of earlier tests' proxies, torn down but not yet collected, are not these requests'.
    earlier = {id(found) for found in gc.get_objects()}
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept for a look, not freed
    try:
        reader, writer = await open_raw(proxy_url)
        for request in requests:
            writer.write(request)
            status, _, _ = await read_response(reader, head=request.startswith(b"HEAD"))
            assert status == 200
        writer.close()
        await until(lambda: len([line for line in log_lines() if line["message"] == "request"]) == len(requests))
        gc.collect()
        left = sorted({type(found).__qualname__ for found in gc.garbage if _ours(found) and id(found) not in earlier})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def _ours(found: object) -> bool:
    module = type(found).__module__ or ""
    return module.startswith(("tornado_ollama_proxy", "tornado.", "httptools"))


class Node:
    """An object that can be part of a cycle, and be watched go."""


def test_while_serving_start_up_objects_are_out_of_collections_and_young_ones_collected_rarely():
    before = gc.get_threshold()
    with rare_collections():
        assert gc.get_freeze_count() > 10_000  # what exists at start-up
        assert gc.get_threshold() == (YOUNG_COLLECTION, *before[1:])
        node = Node()
        node.itself = node  # a cycle: its count never falls to nothing
        gone = weakref.ref(node)
        del node
        assert gone() is not None
        kept = [[] for _ in range(YOUNG_COLLECTION // 2)]
        assert gone() is not None  # not every 700 objects
        kept += [[] for _ in range(YOUNG_COLLECTION)]
        assert gone() is None  # but the collector is not off
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
