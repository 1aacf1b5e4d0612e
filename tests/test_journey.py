"""How a forwarded request ends: one access record that says what happened, whichever way."""

import asyncio
import json

import pytest

from tornado_ollama_proxy.heartbeat import ERROR_BODY_LIMIT

from .helpers import (
    ScriptedUpstream,
    hang_up_at_once,
    open_raw,
    read_chunked_to_end,
    read_response,
    scrape,
    send_json,
    split_response,
    until,
    value,
)

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def records(log_lines):
    return [line for line in log_lines() if line["message"] == "request"]


@pytest.mark.parametrize("repeat", range(3))
async def test_a_client_that_leaves_after_a_whole_sized_answer_is_recorded_ok(proxy_url, log_lines, repeat):
    for _ in range(20):
        reader, writer = await open_raw(proxy_url)
        writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b'{"version": "0.32.0"}')
        hang_up_at_once(writer)
    await asyncio.sleep(0)
    while len(records(log_lines)) < 20:  # each ends when the proxy notices
        await asyncio.sleep(0.01)
    assert {record["outcome"] for record in records(log_lines)} == {"ok"}


async def test_a_client_that_leaves_after_the_last_event_of_a_stream_is_recorded_ok(proxy_url, http, log_lines):
    body = json.dumps({"model": "llama3.2", "stream": True, "messages": []}).encode()
    for _ in range(20):
        reader, writer = await open_raw(proxy_url)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await reader.readuntil(b"data: [DONE]\n\n")  # what an OpenAI SDK reads before it stops
        hang_up_at_once(writer)
    while len(records(log_lines)) < 20:
        await asyncio.sleep(0.01)
    assert {record["outcome"] for record in records(log_lines)} == {"ok"}
    metrics = (await http.get(proxy_url + "/_proxy/metrics")).text
    assert "ollama_proxy_client_disconnects_total 0.0" in metrics


async def test_a_client_that_leaves_mid_stream_is_recorded_gone_not_as_an_upstream_failure(
    proxy_url, fake, log_lines, http
):
    reader, writer = await open_raw(proxy_url)
    body = json.dumps({**CHAT, "model": "stall"}).encode()
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await reader.readuntil(b'"done": false}\n')
    hang_up_at_once(writer)
    await asyncio.wait_for(fake.disconnected.get(), 2)
    while not records(log_lines):
        await asyncio.sleep(0.01)
    assert records(log_lines)[0]["outcome"] == "client_gone"
    samples = await scrape(http, proxy_url)  # a "stop generating" click pages nobody
    assert not [key for key in samples if key[0] == "ollama_proxy_upstream_errors_total"]
    assert value(samples, "ollama_proxy_client_disconnects_total") == 1
    assert (
        value(samples, "ollama_proxy_generations_total", model="stall:latest", route="/api/chat", outcome="client_gone")
        == 1
    )


@pytest.mark.parametrize("first", ["upstream", "client"])
async def test_a_stream_whose_end_arrives_as_the_client_leaves_is_recorded_ok(make_proxy, log_lines, first):
    """The client has the last event and leaves; the upstream's end of stream
    reaches the proxy in the same instant, just before or just after."""
    writers = []

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"e\r\ndata: [DONE]\n\n\r\n"
        )
        writers.append(writer)
        await reader.read()

    for round in range(10):
        upstream = ScriptedUpstream(script)
        proxy = make_proxy(upstream=await upstream.start())
        reader, writer = await open_raw(proxy)
        writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"data: [DONE]\n\n")
        # Both in one step, so that both are there when the proxy next looks.
        if first == "upstream":
            writers[-1].write(b"0\r\n\r\n")
            hang_up_at_once(writer)
        else:
            hang_up_at_once(writer)
            writers[-1].write(b"0\r\n\r\n")
        while len(records(log_lines)) < round + 1:
            await asyncio.sleep(0.01)
        await upstream.stop()
    assert [record["outcome"] for record in records(log_lines)] == ["ok"] * 10


async def test_a_reset_during_a_body_that_ends_at_close_is_relayed_as_incomplete(make_proxy, log_lines):
    dies = asyncio.Event()

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n" + b'{"a": 1}\n')
        await dies.wait()
        hang_up_at_once(writer)  # the pod dies: a reset, not the end of the body

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start())
    reader, writer = await open_raw(proxy)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = split_response(await reader.readuntil(b"\r\n\r\n"))
    assert (status, headers["transfer-encoding"]) == (200, ["chunked"])
    await reader.readuntil(b'{"a": 1}\n\r\n')
    dies.set()
    with pytest.raises(AssertionError, match="connection closed before the end of the body"):
        await read_chunked_to_end(reader)  # no terminating chunk: the client can tell
    await until(lambda: records(log_lines))
    assert records(log_lines)[0]["outcome"] == "upstream_error"
    writer.close()
    await upstream.stop()


async def test_a_client_that_takes_nothing_for_idle_timeout_is_cut(make_proxy, fake, log_lines):
    """A slow reader is not silence while it takes bytes; one that takes none for
    idle_timeout ends its exchange, as nginx's send_timeout does, and Ollama is let go."""
    proxy = make_proxy(idle_timeout=1.0)
    reader, writer = await open_raw(proxy, rcvbuf=4096)
    body = json.dumps({**CHAT, "model": "flood", "options": {"num_predict": 64 * 1024}}).encode()  # 64 MiB
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await reader.readuntil(b"\r\n\r\n")  # then read nothing more
    assert await asyncio.wait_for(fake.disconnected.get(), 10) == "/api/chat"
    await until(lambda: records(log_lines))
    [record] = records(log_lines)
    assert record["outcome"] == "timeout" and 1.0 <= record["duration_ms"] / 1000 < 5
    writer.close()


async def test_a_held_answer_too_long_to_be_busy_goes_to_the_client_whole(make_proxy):
    """A 503 is held in case it is Ollama's "server busy"; one longer than any such answer
    is the pod's own, and reaches the client byte for byte, as its Content-Length says."""
    body = b"x" * (ERROR_BODY_LIMIT * 3)

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 16384):
            writer.write(body[start : start + 16384])
            await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start())
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", {"model": "llama3.2", "messages": []})
    status, headers, answer = await asyncio.wait_for(read_response(reader), 10)
    assert (status, headers["content-length"], answer) == (503, [str(len(body))], body)
    writer.close()
