"""A fast stand-in Ollama for benchmarks: raw asyncio HTTP/1.1, keep-alive, no framework.

Each streamed line carries the monotonic time it was sent (``"t"``, ns), so a
client on the same machine measures every chunk's latency.

    POST /api/chat       {"n": lines, "rate": lines per second}  -> NDJSON stream
    GET  /api/tags                                               -> small JSON
    POST /api/show       any body                                -> small JSON
    POST /api/pull       {"size": bytes}                         -> that many bytes, chunked
    POST /api/blobs/...  any body                                -> 201, body discarded
"""

import asyncio
import json
import sys
import time

TAGS = json.dumps({"models": [{"name": "llama3.2:latest", "size": 2019393189}]}).encode()
SHOW = json.dumps({"modelfile": "FROM llama3.2", "parameters": "stop <|eot_id|>"}).encode()
PAD = "x" * 60  # lines about the size of Ollama's token lines


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


async def serve(reader, writer):
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
            elif path == "/api/pull" and method == "POST":
                await stream_bytes(writer, json.loads(body)["size"])
            elif path == "/api/tags" and method in ("GET", "HEAD"):
                answer(writer, "200 OK", TAGS)
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


async def main(port: int):
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
