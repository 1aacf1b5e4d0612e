"""The client's body on its way upstream: silence on either side ends the request
and frees what it held; an early answer never parks it."""

import asyncio
import contextlib

from tornado_ollama_proxy import handler

from .helpers import ScriptedUpstream, open_raw, raw_request, read_response, scrape, settled

VERSION = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
BLOB = b"/api/blobs/sha256:" + b"6" * 64


async def upload(writer, size: int, sent: list[int]) -> None:
    """Send `size` body bytes, counting what the kernel took."""
    block = b"x" * 65536
    while sent[0] < size:
        writer.write(block)
        await writer.drain()
        sent[0] += len(block)


async def test_a_client_that_stops_sending_its_body_is_answered_408_and_frees_its_slot(
    make_proxy, fake, http, log_lines
):
    proxy = make_proxy(idle_timeout=0.5, concurrency_total=1)
    reader, writer = await open_raw(proxy)
    writer.write(b"POST " + BLOB + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
    started = asyncio.get_running_loop().time()
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"]) == (408, ["close"])
    assert body == b'{"error": "the client sent no body bytes for 0.5 s"}'
    assert 0.4 < asyncio.get_running_loop().time() - started < 5
    assert await reader.read() == b""
    assert await asyncio.wait_for(fake.disconnected.get(), 2) == BLOB.decode()  # the upstream upload was ended
    assert (await raw_request(proxy, VERSION)).startswith(b"HTTP/1.1 200 ")  # the slot is free again
    writer.close()
    [record, _] = [line for line in log_lines() if line["message"] == "request"]
    assert (record["status"], record["outcome"]) == (408, "timeout")
    samples = await scrape(http, proxy)
    assert not [key for key in samples if key[0] == "ollama_proxy_upstream_errors_total"]


async def test_a_client_silent_before_a_held_body_is_complete_is_answered_408(make_proxy, fake):
    proxy = make_proxy(idle_timeout=0.3)
    reader, writer = await open_raw(proxy)
    writer.write(b'POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"')
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (408, ["close"])
    assert fake.seen == []
    writer.close()


async def test_an_upstream_that_stops_reading_the_body_is_a_504_and_frees_the_slot(make_proxy, fake):
    fake.blob_gate = asyncio.Event()  # the stand-in reads the head, then none of the body
    proxy = make_proxy(idle_timeout=0.5, concurrency_total=1)
    reader, writer = await open_raw(proxy)
    size = 64 * 1024 * 1024
    writer.write(b"POST " + BLOB + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    sending = asyncio.ensure_future(upload(writer, size, sent := [0]))
    status, _, body = await read_response(reader)
    assert status == 504 and body.endswith(b'sent nothing for 0.5 s"}')
    assert sent[0] < size or sending.done()
    await sending  # the rest of the body was read and dropped, not left to block the client
    writer.write(VERSION)  # and the connection carries the next request: the slot is free
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_a_client_silent_after_the_upstream_failed_gets_the_upstreams_failure(make_proxy, fake):
    fake.blob_gate = asyncio.Event()
    proxy = make_proxy(idle_timeout=0.4)
    reader, writer = await open_raw(proxy)
    size = 64 * 1024 * 1024
    writer.write(b"POST " + BLOB + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    sending = asyncio.ensure_future(upload(writer, 32 * 1024 * 1024, [0]))  # half of it, then silence
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"]) == (504, ["close"])
    assert body.endswith(b'sent nothing for 0.4 s"}')
    sending.cancel()
    writer.close()


async def test_an_early_answer_while_the_upstream_is_full_does_not_park_the_request(make_proxy):
    answer_now, done = asyncio.Event(), asyncio.Event()

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")  # the head; the body is never read
        await answer_now.wait()
        writer.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await done.wait()  # reads nothing more: the proxy's send buffer stays full

    upstream = ScriptedUpstream(script)
    proxy_url = make_proxy(upstream=await upstream.start(), concurrency_total=1)
    reader, writer = await open_raw(proxy_url)
    size = 64 * 1024 * 1024
    writer.write(b"POST " + BLOB + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    sending = asyncio.ensure_future(upload(writer, size, sent := [0]))
    await settled(lambda: sent[0])  # every buffer on the way is full
    answer_now.set()
    await asyncio.wait_for(sending, 10)  # the proxy read and dropped the rest
    assert await read_response(reader) == (
        413,
        {"x-request-id": [ANY], "x-ollama-upstream": ["default"], "content-length": ["2"]},
        b"{}",
    )
    writer.write(b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert (await read_response(reader))[0] == 413  # the slot is free, the connection usable ...
    assert upstream.connections == 2  # ... and the next request had its own upstream connection
    writer.close()
    done.set()
    await upstream.stop()


class _Any:
    def __eq__(self, other):
        return True


ANY = _Any()


async def test_a_refusal_waiting_for_a_body_that_stops_coming_is_answered_and_closed(make_proxy, fake):
    proxy = make_proxy(idle_timeout=0.3, rate_limit_routes={"/api/chat": "0/minute"})
    reader, writer = await open_raw(proxy)
    writer.write(b'POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"')
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (429, ["close"])
    assert await reader.read() == b""
    assert fake.seen == []
    writer.close()


async def test_an_answer_before_a_large_body_is_whole_at_once_and_the_body_is_read_before_closing(make_proxy):
    proxy = make_proxy(max_body_size=1024)
    reader, writer = await open_raw(proxy)
    size = 8 * 1024 * 1024
    writer.write(b"POST " + BLOB + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    sending = asyncio.ensure_future(upload(writer, size, [0]))
    status, headers, body = await read_response(reader)  # while the body is still on its way
    assert (status, headers["connection"], headers["content-length"]) == (413, ["close"], [str(len(body))])
    await sending  # all of it taken, none refused with a reset
    assert await reader.read() == b""  # then a clean close
    writer.close()


async def test_a_body_that_stops_coming_after_the_answer_is_waited_for_briefly(make_proxy, monkeypatch):
    monkeypatch.setattr(handler, "LINGER_QUIET", 0.3)
    proxy = make_proxy(max_body_size=1024)
    reader, writer = await open_raw(proxy)
    writer.write(b"POST " + BLOB + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
    status, _, _ = await read_response(reader)
    assert status == 413
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed once the body fell quiet
    assert 0.2 < asyncio.get_running_loop().time() - started < 3
    writer.close()


async def test_a_body_that_trickles_on_after_the_answer_is_waited_for_at_most_a_while(make_proxy, monkeypatch):
    monkeypatch.setattr(handler, "LINGER_TOTAL", 0.5)
    proxy = make_proxy(max_body_size=1024)
    reader, writer = await open_raw(proxy)
    writer.write(b"POST " + BLOB + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")

    async def trickle():
        while True:
            writer.write(b"x" * 1000)
            await asyncio.sleep(0.05)  # never quiet for long

    trickling = asyncio.ensure_future(trickle())
    status, _, _ = await read_response(reader)
    assert status == 413
    with contextlib.suppress(ConnectionResetError):  # closed with the trickle's last bytes unread
        assert await asyncio.wait_for(reader.read(), 5) == b""
    trickling.cancel()
    writer.close()
