"""Heartbeats: a front that gives up on a silent origin (Cloudflare's 100 s, here
nginx's proxy_read_timeout) does not end calls while Ollama is only slow."""

import asyncio
import json
import zlib

import ollama
import openai
import pytest

from tornado_ollama_proxy.heartbeat import may_beat, strip_beats, told_error

from .fake_ollama import NO_SPACE
from .helpers import (
    ScriptedUpstream,
    http_1_0_answers,
    keep_alive_1_0,
    open_raw,
    read_body,
    read_chunked_to_end,
    read_response,
    send_json,
    split_response,
    until,
)

MESSAGES = [{"role": "user", "content": "hi"}]
FRONT_TIMEOUT = 1  # seconds the front waits for a byte
SILENCE = 2.5  # seconds Ollama says nothing
BEAT = 0.25  # seconds between heartbeats


@pytest.fixture
def platform(make_proxy, nginx, fake):
    """A proxy behind nginx that turns every request into GET and gives up after
    FRONT_TIMEOUT seconds without a byte, before a stand-in silent SILENCE seconds."""
    fake.silence = SILENCE

    def start(heartbeat_seconds=BEAT, **settings):
        return nginx(
            make_proxy(heartbeat_seconds=heartbeat_seconds, **settings), as_get=True, read_timeout=FRONT_TIMEOUT
        )

    return start


@pytest.fixture
def proxy(make_proxy, fake):
    """A proxy beating every 0.3 s before a stand-in silent for 1.2 s."""
    fake.silence = 1.2
    return make_proxy(heartbeat_seconds=0.3)


def records(log_lines):
    return [line for line in log_lines() if line["message"] == "request"]


async def test_the_ollama_client_gets_slow_answers_whole_and_streamed(platform, log_lines):
    client = ollama.AsyncClient(host=platform())

    async def streamed():
        return [part async for part in await client.chat(model="slow", messages=MESSAGES, stream=True)]

    whole, parts, generated = await asyncio.gather(
        client.chat(model="slow", messages=MESSAGES), streamed(), client.generate(model="slow", prompt="x")
    )
    assert whole.message.content == "tok0 tok1 tok2 " and whole.done
    assert "".join(part.message.content for part in parts) == "tok0 tok1 tok2 " and parts[-1].done
    assert generated.response == "tok0 tok1 tok2 "
    for record in records(log_lines):
        assert (record["status"], record["upstream_status"]) == (200, 200)
        assert record["heartbeats"] >= SILENCE / BEAT - 3
    await client.close()


# The SDK stops reading at "data: [DONE]" and closes the response, which leaves httpcore's
# body iterator suspended; Python 3.13 then reports its finalisation as unraisable.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object (HTTP11ConnectionByteStream|AsyncHTTP11Connection)"
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_the_openai_sdk_gets_slow_answers_whole_and_streamed(platform):
    client = openai.AsyncOpenAI(base_url=platform() + "/v1", api_key="unused", max_retries=0)

    async def streamed():
        async with await client.chat.completions.create(model="slow", messages=MESSAGES, stream=True) as stream:
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    whole, text = await asyncio.gather(client.chat.completions.create(model="slow", messages=MESSAGES), streamed())
    assert whole.choices[0].message.content == "hi"
    assert text == "Hello"
    await client.close()


async def test_without_heartbeats_the_front_gives_up(platform):
    """The premise: the front does end such calls."""
    front = platform(heartbeat_seconds=None)
    client = ollama.AsyncClient(host=front)
    with pytest.raises(ollama.ResponseError) as refused:
        await client.chat(model="slow", messages=MESSAGES)
    assert refused.value.status_code == 504  # nginx's "Gateway Time-out"
    await client.close()
    sdk = openai.AsyncOpenAI(base_url=front + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError):
        await sdk.chat.completions.create(model="slow", messages=MESSAGES)
    await sdk.close()


async def test_a_silence_in_the_middle_of_a_stream_is_bridged(platform):
    client = ollama.AsyncClient(host=platform())
    parts = [part async for part in await client.chat(model="gap", messages=MESSAGES, stream=True)]
    assert [part.message.content for part in parts] == ["tok0 ", "tok1 ", "tok2 ", ""]
    await client.close()


async def test_an_error_after_the_heads_went_out_reaches_each_client_in_band(platform, log_lines):
    front = platform()
    client = ollama.AsyncClient(host=front)
    with pytest.raises(ollama.ResponseError) as streamed:
        async for _ in await client.chat(model="late404", messages=MESSAGES, stream=True):
            pass
    assert streamed.value.error == "model 'late404' not found"
    await client.close()
    sdk = openai.AsyncOpenAI(base_url=front + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError) as raised:
        async with await sdk.chat.completions.create(model="late404", messages=MESSAGES, stream=True) as stream:
            async for _ in stream:
                pass
    assert 'model "late404" not found' in str(raised.value)
    await sdk.close()
    # A 200 went out, but the records (and the metrics) count the failure it is.
    for record in records(log_lines):
        assert (record["status"], record["upstream_status"], record["in_band"]) == (404, 404, True)


async def test_a_pull_that_fails_after_a_heartbeat_is_a_failure_to_the_ollama_client(platform, log_lines):
    # The client as most scripts use it, in a thread. (The async client raises out of its
    # stream's generators and leaves them open for the event loop to close later.)
    client = ollama.Client(host=platform())
    whole = await asyncio.to_thread(client.pull, "nospace")  # "stream": false, the client's default
    assert whole.status == f"error: {NO_SPACE}"  # not a silent None that looks done

    def pull_streamed():
        with pytest.raises(ollama.ResponseError) as streamed:
            for _ in client.pull("nospace", stream=True):
                pass
        return streamed.value.error

    assert await asyncio.to_thread(pull_streamed) == NO_SPACE
    client.close()
    first = records(log_lines)[0]
    assert (first["status"], first["upstream_status"], first["in_band"]) == (500, 500, True)


async def test_a_whole_answer_gets_the_error_in_a_200_as_documented(proxy):
    reader, writer = await send_json(
        proxy, b"POST", b"/api/chat", {"model": "late404", "messages": MESSAGES, "stream": False}
    )
    status, headers, answer = await read_response(reader)
    assert (status, headers["content-type"], headers["x-ollama-proxy-heartbeat"]) == (200, ["application/json"], ["1"])
    assert answer.lstrip(b" ") == b'{"error": "model \'late404\' not found"}\n' and answer.startswith(b" ")
    assert json.loads(answer) == {"error": "model 'late404' not found"}
    writer.close()


# -- the bytes themselves -------------------------------------------------------------------


async def test_the_first_heartbeat_sends_the_head_then_spaces_then_the_answer(proxy, log_lines):
    reader, writer = await open_raw(proxy)
    body = json.dumps({"model": "slow", "messages": MESSAGES}).encode()
    writer.write(
        b"GET /api/chat HTTP/1.1\r\nHost: x\r\nX-Request-ID: beat-1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    status, headers, answer = await read_response(reader)
    assert status == 200
    assert headers["content-type"] == ["application/x-ndjson"]
    assert (headers["cache-control"], headers["x-accel-buffering"]) == (["no-cache"], ["no"])
    assert (headers["x-request-id"], headers["transfer-encoding"]) == (["beat-1"], ["chunked"])
    spaces = len(answer) - len(answer.lstrip(b" "))
    assert spaces >= 2
    assert [json.loads(line)["done"] for line in answer.splitlines()] == [False, False, False, True]
    [record] = records(log_lines)
    assert (record["heartbeats"], record["status"], record["upstream_status"]) == (spaces, 200, 200)
    writer.close()


async def test_an_http_1_0_client_keeping_alive_gets_the_heartbeats_head_and_the_close(proxy):
    chat = keep_alive_1_0(b"GET", b"/api/chat", json.dumps({"model": "slow", "messages": MESSAGES}).encode())
    received, end = await http_1_0_answers(proxy, chat, keep_alive_1_0(b"GET", b"/api/tags"))
    status, headers, answer = split_response(received)
    assert (status, headers["x-ollama-proxy-heartbeat"], headers["connection"], end) == (
        200,
        ["1"],
        ["close"],
        b"closed",
    )
    assert answer.startswith(b"  ") and "transfer-encoding" not in headers
    assert [json.loads(line)["done"] for line in answer.splitlines()] == [False, False, False, True]


async def test_event_streams_get_comment_lines(proxy):
    reader, writer = await send_json(
        proxy, b"POST", b"/v1/chat/completions", {"model": "slow", "messages": MESSAGES, "stream": True}
    )
    status, headers, answer = await read_response(reader)
    assert (status, headers["content-type"]) == (200, ["text/event-stream"])
    assert answer.startswith(b": heartbeat\n\n: heartbeat\n\n")
    assert answer.endswith(b"data: [DONE]\n\n")
    writer.close()


async def test_after_the_upstreams_head_heartbeats_only_fall_between_lines(make_proxy):
    pause = asyncio.Event()

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b'{"a": 1}\n', b'{"b": ', b"2}\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await asyncio.sleep(1.0)  # a silence worth three heartbeats after each
        writer.write(b"0\r\n\r\n")
        await pause.wait()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start(), heartbeat_seconds=0.3)
    reader, writer = await open_raw(proxy)
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, answer = await read_response(reader)
    assert "x-ollama-proxy-heartbeat" not in headers  # Ollama's own head went out
    first, rest = answer.split(b"\n", 1)
    assert first == b'{"a": 1}'
    assert rest.startswith(b"  ") and rest.lstrip(b" ").startswith(b'{"b": 2}\n')  # none inside the line
    assert [json.loads(line) for line in answer.split(b"\n") if line.strip()] == [{"a": 1}, {"b": 2}]
    pause.set()
    writer.close()
    await upstream.stop()


async def test_an_answer_sized_by_the_upstream_gets_no_heartbeat(make_proxy):
    body = b'{"model": "m", "done": true}\n'

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        await asyncio.sleep(1.0)  # a silence worth five heartbeats between head and body
        writer.write(body)
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start(), heartbeat_seconds=0.2)
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", {"stream": False})
    status, headers, answer = await read_response(reader)
    assert (status, headers["content-length"], answer) == (200, [str(len(body))], body)
    writer.close()
    await upstream.stop()


async def test_answers_that_are_not_json_never_get_heartbeats(make_proxy):
    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nOllama is running")
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start(), heartbeat_seconds=0.2)
    reader, writer = await open_raw(proxy)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await read_response(reader) == (
        200,
        {"x-request-id": [ANY], "x-ollama-upstream": ["default"], "content-length": ["17"]},
        b"Ollama is running",
    )
    writer.close()
    await upstream.stop()


async def test_heartbeats_stop_when_the_client_leaves(make_proxy, fake, log_lines):
    proxy = make_proxy(heartbeat_seconds=0.2)
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", {"model": "silent", "messages": MESSAGES})
    await reader.readuntil(b"\r\n\r\n1\r\n \r\n1\r\n \r\n")  # the head and two heartbeats
    writer.close()
    assert await asyncio.wait_for(fake.disconnected.get(), 2) == "/api/chat"  # the upstream is let go
    await until(lambda: records(log_lines))
    [record] = records(log_lines)
    beats = record["heartbeats"]
    await asyncio.sleep(0.6)  # three periods more: nothing is sent to nobody
    assert record["outcome"] == "client_gone" and beats >= 2


async def test_a_failing_upstream_after_the_head_is_told_in_band(make_proxy, fake):
    proxy = make_proxy(heartbeat_seconds=0.2, idle_timeout=1.0)
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", {"model": "silent", "messages": MESSAGES})
    status, _, answer = await read_response(reader)  # heartbeats do not count as the upstream's activity
    assert status == 200
    assert json.loads(answer) == {"error": json.loads(answer)["error"]}
    assert json.loads(answer)["error"].endswith("sent nothing for 1 s")
    writer.close()


async def test_a_body_too_large_to_read_gets_the_routes_defaults(proxy):
    reader, writer = await send_json(
        proxy, b"POST", b"/api/chat", {"model": "slow", "messages": MESSAGES, "stream": False, "pad": "x" * 1_100_000}
    )
    status, headers, answer = await read_response(reader)
    # Ollama's default for /api/chat is a stream, so the proxy's head said so; spaces still fit.
    assert (status, headers["content-type"]) == (200, ["application/x-ndjson"])
    assert json.loads(answer)["message"]["content"] == "tok0 tok1 tok2 "
    writer.close()


async def test_a_long_error_answer_is_told_by_its_beginning(make_proxy):
    text = b"out of memory: " + b"x" * 1_000_000

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        await asyncio.sleep(0.8)
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(text), 5000):  # in pieces: only the first 64 KiB are kept
            piece = text[start : start + 5000]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start(), heartbeat_seconds=0.2)
    reader, writer = await open_raw(proxy)
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    status, _, answer = await read_response(reader)
    assert status == 200
    assert json.loads(answer) == {"error": text[:1000].decode()}
    writer.close()
    await upstream.stop()


async def test_a_heartbeat_before_the_body_is_whole_goes_by_the_routes_defaults(make_proxy, log_lines):
    proxy = make_proxy(heartbeat_seconds=0.2)
    reader, writer = await open_raw(proxy)
    first, rest = b'{"model": "llama3.2"', b', "messages": [], "stream": false}'
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%s\r\n" % (len(first), first))
    status, headers, _ = split_response(await reader.readuntil(b"\r\n\r\n"))  # before the body is whole
    assert (status, headers["content-type"]) == (200, ["application/x-ndjson"])  # /api/chat streams by default
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
    answer = await read_body(reader, headers)
    assert json.loads(answer)["done_reason"] == "load"  # the whole answer it asked for, after spaces
    writer.close()
    await until(lambda: records(log_lines))
    [record] = records(log_lines)
    assert (record["model"], record["stream"]) == ("llama3.2", False)  # read again once whole


async def test_no_heartbeat_queues_behind_a_client_slow_to_read(make_proxy, log_lines):
    line = json.dumps({"response": "x" * 1000, "done": False}).encode() + b"\n"
    lines = 16 * 1024  # 16 MiB: more than the sockets between hold

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(lines):
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start(), heartbeat_seconds=0.2)
    reader, writer = await open_raw(proxy)
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await asyncio.sleep(1.0)  # not reading: the upstream waits for this client, silent meanwhile
    status, _, answer = await read_response(reader)
    assert answer == line * lines  # not one space: the pending bytes kept the front busy already
    writer.close()
    await upstream.stop()
    await until(lambda: records(log_lines))
    assert records(log_lines)[0]["heartbeats"] == 0


class _Any:
    def __eq__(self, other):
        return True


ANY = _Any()


# -- the rules, on their own -------------------------------------------------------------


@pytest.mark.parametrize(
    "answer_format, body_started, tail, allowed",
    [
        ("json", False, b"", True),
        ("json", True, b"1}", False),
        ("ndjson", False, b"", True),
        ("ndjson", True, b"}\n", True),
        ("ndjson", True, b'":', False),
        ("sse", True, b"\n\n", True),
        ("sse", True, b"}\n", False),
    ],
)
def test_where_a_heartbeat_may_go(answer_format, body_started, tail, allowed):
    assert may_beat(answer_format, body_started, tail) is allowed


# -- content codings ----------------------------------------------------------------------


def gzipped_stream(lines: list[bytes]) -> list[bytes]:
    """Lines gzip-compressed as one stream, a flushed piece per line."""
    compressor = zlib.compressobj(wbits=31)
    pieces = [compressor.compress(line) + compressor.flush(zlib.Z_SYNC_FLUSH) for line in lines]
    pieces[-1] += compressor.flush()
    return pieces


async def test_an_encoded_answer_gets_no_heartbeat_after_its_head(make_proxy, log_lines):
    pieces = gzipped_stream([b'{"a": 1}\n', b'{"b": 2}\n'])
    seen = []

    async def script(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await asyncio.sleep(0.8)  # a silence worth four heartbeats after a complete line
        writer.write(b"0\r\n\r\n")
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start(), heartbeat_seconds=0.2)
    reader, writer = await open_raw(proxy)
    writer.write(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAccept-Encoding: br, gzip;q=0.9, zstd\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, headers, answer = await read_response(reader)
    assert (status, headers["content-encoding"]) == (200, ["gzip"])
    assert answer == b"".join(pieces)  # not one byte written into the encoded body
    assert zlib.decompress(answer, wbits=31) == b'{"a": 1}\n{"b": 2}\n'
    assert b"\r\nAccept-Encoding: gzip;q=0.9\r\n" in seen[0]  # only what a heartbeat's head could undo
    assert records(log_lines)[0]["heartbeats"] == 0
    writer.close()
    await upstream.stop()


async def test_a_request_that_offers_only_codings_the_proxy_cannot_undo_offers_none(make_proxy, fake, http):
    proxy = make_proxy(heartbeat_seconds=30)
    await http.post(proxy + "/api/show", json={"model": "llama3.2"}, headers={"Accept-Encoding": "br"})
    await http.post(proxy + "/api/blobs/sha256:" + "0" * 64, content=b"x", headers={"Accept-Encoding": "br"})
    show, blob = fake.seen
    assert "Accept-Encoding" not in show.headers  # a heartbeat may answer first: identity
    assert blob.headers["Accept-Encoding"] == "br"  # never a heartbeat: as the client asked


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_an_encoded_answer_after_a_heartbeats_head_is_decoded(make_proxy, coding):
    document = json.dumps({"model": "m", "response": "x" * 5000, "done": True}).encode()
    encoded = zlib.compress(document, wbits=31 if coding == "gzip" else 15)

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.7)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\n" % coding.encode()
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(encoded) + encoded[:2])
        await asyncio.sleep(0.3)  # a piece that decodes to nothing yet: the coding's header alone
        for start in range(2, len(encoded), 100):  # then in pieces
            writer.write(encoded[start : start + 100])
            await writer.drain()
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start(), heartbeat_seconds=0.2)
    reader, writer = await send_json(proxy, b"POST", b"/api/generate", {"model": "m", "stream": False})
    status, headers, answer = await read_response(reader)
    assert (status, headers["x-ollama-proxy-heartbeat"], "content-encoding" in headers) == (200, ["1"], False)
    assert answer.startswith(b" ") and json.loads(answer) == json.loads(document)
    writer.close()
    await upstream.stop()


async def test_a_coding_the_proxy_cannot_undo_after_a_heartbeats_head_is_an_error_in_band(make_proxy):
    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc")
        await reader.read()

    upstream = ScriptedUpstream(script)
    url = await upstream.start()
    proxy = make_proxy(upstream=url, heartbeat_seconds=0.2)
    reader, writer = await send_json(proxy, b"POST", b"/api/generate", {"model": "m", "stream": False})
    status, _, answer = await read_response(reader)
    assert status == 200
    assert json.loads(answer) == {
        "error": "upstream 'default' sent an answer this proxy cannot relay: "
        "the upstream's answer is encoded (br), which cannot follow a heartbeat"
    }
    writer.close()
    await upstream.stop()


async def encoded_after_silence(make_proxy, status: bytes, encoded: bytes):
    """A proxy before an upstream silent long enough for a heartbeat's head, which then
    answers `status` gzip-encoded with `encoded`; the client's raw connection."""

    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n" % len(encoded) + encoded)
        await reader.read()

    upstream = ScriptedUpstream(script)
    proxy = make_proxy(upstream=await upstream.start(), heartbeat_seconds=0.2)
    reader, writer = await send_json(proxy, b"POST", b"/api/generate", {"model": "m", "stream": False})
    return upstream, reader, writer


async def test_an_encoded_error_after_a_heartbeats_head_is_told_by_its_message(make_proxy):
    error = zlib.compress(b'{"error": "model \'m\' not found"}', wbits=31)
    upstream, reader, writer = await encoded_after_silence(make_proxy, b"404 Not Found", error)
    status, _, answer = await read_response(reader)
    assert (status, json.loads(answer)) == (200, {"error": "model 'm' not found"})
    writer.close()
    await upstream.stop()


async def test_an_encoded_answer_that_ends_before_its_coding_does_is_cut(make_proxy, log_lines):
    text = "".join(f"tok{n} " for n in range(5000))  # half of it encoded decodes to some of it
    whole = zlib.compress(json.dumps({"response": text, "done": True}).encode(), wbits=31)
    upstream, reader, writer = await encoded_after_silence(make_proxy, b"200 OK", whole[: len(whole) // 2])
    split_response(await reader.readuntil(b"\r\n\r\n"))
    with pytest.raises(AssertionError, match="connection closed before the end of the body"):
        await read_chunked_to_end(reader)  # no clean end: the client can tell
    await until(lambda: records(log_lines))
    assert records(log_lines)[0]["outcome"] == "upstream_error"
    writer.close()
    await upstream.stop()


# -- an event stream's first event ----------------------------------------------------------


async def test_no_head_of_the_proxys_own_while_an_event_streams_format_is_unknown(make_proxy, fake):
    fake.silence = 1.0
    proxy = make_proxy(heartbeat_seconds=0.2)
    reader, writer = await open_raw(proxy)
    first = b'{"model": "slow", "messages": [{"role": "user", "content": "hi"}]'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%s\r\n" % (len(first), first))
    with pytest.raises(TimeoutError):  # three heartbeat periods: the answer's format is not known yet
        await asyncio.wait_for(reader.read(1), 0.6)
    rest = b', "stream": true}'
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
    status, headers, answer = await read_response(reader)
    assert (status, headers["content-type"]) == (200, ["text/event-stream"])
    assert answer.startswith(b": heartbeat\n\n")
    events = [event for event in answer.split(b"\n\n") if event.startswith(b"data: {")]
    assert json.loads(events[0][len(b"data: ") :])["choices"][0]["delta"]["content"] == "Hel"
    writer.close()


@pytest.mark.parametrize(
    "data, content, pending",
    [
        (b"   ", b"", b""),
        (b'  {"a": 1}\n', b'{"a": 1}\n', b""),
        (b": heartbeat\n\n: heartbeat\n\ndata: x\n\n", b"data: x\n\n", b""),
        (b": heartbeat\n\n: heart", b"", b": heart"),
        (b"\n\n  \r\n", b"", b""),
    ],
)
def test_what_follows_another_proxys_heartbeats(data, content, pending):
    assert strip_beats(data) == (content, pending)


@pytest.mark.parametrize(
    "content, told",
    [
        (b'{"error": "server busy, please try again."}\n', (503, "server busy, please try again.")),
        (b'{"error": "model \'x\' not found"}\n', (404, "model 'x' not found")),
        (b'{"error": "upstream \'a\' refused the connection"}\n', (502, "upstream 'a' refused the connection")),
        (
            b'data: {"error": {"message": "slow down", "type": "invalid_request_error", "code": 429}}\n\n',
            (429, "slow down"),
        ),
        (b'data: {"error": {"message": "it is busy", "code": 9999}}\n\n', (503, "it is busy")),
        (b'{"model": "m", "response": "hi"}\n', None),
        (b'{"error": 5}\n', None),
        (b"data: [DONE]\n\n", None),
    ],
)
def test_an_error_told_where_content_begins(content, told):
    assert told_error(content) == told
