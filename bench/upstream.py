"""A fast stand-in Ollama for benchmarks: raw asyncio HTTP/1.1, keep-alive, no framework.

Each streamed line carries the monotonic time it was sent (``"t"``, ns), so a
client on the same machine measures every chunk's latency.

    POST /api/chat       {"n": lines, "rate": lines per second}  -> NDJSON stream
    POST /api/generate   {"stream": false, "options": {"num_predict": tokens}}
                         -> Ollama's answer after SECONDS: one JSON, or NDJSON lines (stream
                            true or absent), ending with Ollama's counts
    GET  /api/tags, /api/ps, /api/version                        -> small JSON
    POST /api/show       any body                                -> small JSON
    POST /api/pull       {"size": bytes}                         -> that many bytes, chunked
    POST /api/blobs/...  any body                                -> 201, body discarded
    GET  /bench/stats                                            -> generations counted (below)

    python bench/upstream.py PORT [SECONDS]

A generation takes SECONDS (0.2 by default; 0 answers at once) and runs one at a
time, the others waiting in turn, as Ollama with OLLAMA_NUM_PARALLEL=1 runs them: a
one-slot pod whose throughput is fixed, so that a pool's is what its balancing makes
of it. Its answer has `num_predict` tokens (TOKENS when not asked), all at once.
/bench/stats counts them, and the most generating and waiting at once (each
since the last time it was read), to show that the pod served one at a time.
"""

import asyncio
import functools
import json
import sys
import time

MODELS = json.dumps({"models": [{"name": "llama3.2:latest", "size": 2019393189}]}).encode()
VERSION = b'{"version": "0.12.0"}'
SHOW = json.dumps({"modelfile": "FROM llama3.2", "parameters": "stop <|eot_id|>"}).encode()
PAD = "x" * 60  # lines about the size of Ollama's token lines
TOKENS = 10  # a generation's tokens, unless its options.num_predict says
CREATED = b'"created_at":"2025-01-01T00:00:00.000000000Z"'


async def read_body(reader, headers) -> bytes:
    if headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()
    length = int(headers.get("content-length", "0"))
    if length > 1 << 20:  # a bulk upload: count it, keep nothing
        while length:
            length -= len(await reader.read(min(length, 1 << 20)))
        return b""
    return await reader.readexactly(length)


def generated(writer, body: bytes) -> None:
    """Ollama's answer to /api/generate: one JSON document, or (stream true, its default)
    a line per token and a last line; either way ending with the counts it reports."""
    request = json.loads(body or b"{}")
    options = request.get("options") or {}
    tokens = options.get("num_predict") or TOKENS
    model = json.dumps(request.get("model", "llama3.2")).encode()
    counts = (
        b'"done":true,"done_reason":"stop","context":[1,2,3],"total_duration":%d,"load_duration":1000000,'
        b'"prompt_eval_count":%d,"prompt_eval_duration":2000000,"eval_count":%d,"eval_duration":%d}'
        % (tokens * 20_000_000, len(request.get("prompt", "")) // 4 + 1, tokens, tokens * 20_000_000)
    )
    if request.get("stream", True) is False:
        head = b'{"model":%s,%s,"response":"%s",' % (model, CREATED, b" tok" * tokens)
        answer(writer, "200 OK", head + counts)
        return
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
    lines = [b'{"model":%s,%s,"response":" tok","done":false}\n' % (model, CREATED)] * tokens
    lines.append(b'{"model":%s,%s,"response":"",%s\n' % (model, CREATED, counts))
    for line in lines:  # a chunk each, as Ollama flushes each
        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
    writer.write(b"0\r\n\r\n")


def answer(writer, status: str, body: bytes, content_type: str = "application/json; charset=utf-8"):
    writer.write(
        b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (status.encode(), content_type.encode(), len(body))
        + body
    )


async def stream_lines(writer, n: int, rate: float):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        line = b'{"t":%d,"i":%d,"message":{"content":"%s"},"done":false}\n' % (time.monotonic_ns(), i, PAD.encode())
        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
        await writer.drain()
    writer.write(b"0\r\n\r\n")


async def stream_bytes(writer, size: int):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    block = b"b" * (256 * 1024)
    while size > 0:
        piece = block[: min(size, len(block))]
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        size -= len(piece)
    writer.write(b"0\r\n\r\n")


class Slot:
    """One generation at a time; the others wait their turn (asyncio's lock is first come, first served)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.lock = asyncio.Lock()
        self.generating = self.waiting = 0
        self.served = self.most_generating = self.most_waiting = 0

    async def generate(self) -> None:
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        async with self.lock:
            self.waiting -= 1
            self.generating += 1
            self.most_generating = max(self.most_generating, self.generating)
            if self.seconds:  # without a sleep the lock is never contended: at once
                await asyncio.sleep(self.seconds)
            self.generating -= 1
            self.served += 1

    def stats(self) -> bytes:
        figures = {"served": self.served, "most_generating": self.most_generating, "most_waiting": self.most_waiting}
        self.most_generating, self.most_waiting = self.generating, self.waiting
        return json.dumps(figures).encode()


async def serve(slot: Slot, reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            method, path, _ = line.decode().split(" ", 2)
            headers = {}
            while (header := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = header.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await read_body(reader, headers)
            if path == "/api/chat" and method == "POST":
                options = json.loads(body)
                await stream_lines(writer, options["n"], options["rate"])
            elif path == "/api/generate" and method == "POST":
                await slot.generate()
                generated(writer, body)
            elif path == "/api/pull" and method == "POST":
                await stream_bytes(writer, json.loads(body)["size"])
            elif path in ("/api/tags", "/api/ps") and method in ("GET", "HEAD"):
                answer(writer, "200 OK", MODELS)
            elif path == "/api/version" and method == "GET":
                answer(writer, "200 OK", VERSION)
            elif path == "/bench/stats" and method == "GET":
                answer(writer, "200 OK", slot.stats())
            elif path == "/api/show" and method == "POST":
                answer(writer, "200 OK", SHOW)
            elif path.startswith("/api/blobs/") and method == "POST":
                answer(writer, "201 Created", b"", "text/plain")
            else:
                answer(writer, "405 Method Not Allowed", b"405 method not allowed", "text/plain")
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def main(port: int, seconds: float):
    server = await asyncio.start_server(functools.partial(serve, Slot(seconds)), "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.2))
