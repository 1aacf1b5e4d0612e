"""A forwarded request's objects are freed as it ends, none left in a reference cycle:
collecting those costs a busy proxy a fifth of its CPU or more."""

import gc
import json
import weakref

from tornado_ollama_proxy.server import start_up_frozen

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


def test_while_serving_start_up_objects_are_out_of_collections_and_new_cycles_are_collected_as_ever():
    before = gc.get_threshold()
    with start_up_frozen():
        assert gc.get_freeze_count() > 10_000  # what exists at start-up
        assert gc.get_threshold() == before
        node = Node()
        node.itself = node  # a cycle: its count never falls to nothing
        gone = weakref.ref(node)
        del node
        kept = [[] for _ in range(2 * before[0])]
        assert gone() is None and kept  # collected with the youngest generation, as without
    assert gc.get_freeze_count() == 0
