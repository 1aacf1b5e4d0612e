"""Tornado's web layer on llhttp: bench/floor.py's handler, served by httptools instead of
Tornado's HTTP/1.1 server connection and IOStream.

It measures what the proxy could gain by parsing and writing its clients' HTTP/1.1
itself, as it does its upstream's (the `Application` and `RequestHandler` staying):
the floor's cost less this one's. A benchmark reference, not a server: it keeps every
connection alive, answers what it is sent in order, and frames what the handler writes
(Content-Length or chunked); nothing else of HTTP/1.1 (no 100-continue, no limits, no
HTTP/1.0, no errors).

    python bench/llhttp_floor.py PORT
"""

import asyncio
import sys

import httptools
import uvloop
from floor import Constant
from tornado import httputil
from tornado.httputil import HTTPHeaders, RequestStartLine
from tornado.web import Application


class Context:
    remote_ip, protocol = "127.0.0.1", "http"


class Answer(httputil.HTTPConnection):
    """One request's side of the connection, as `RequestHandler` writes its answer to it."""

    def __init__(self, transport: asyncio.Transport, done: asyncio.Future) -> None:
        self.transport, self.done, self.chunked = transport, done, False
        self.context = Context()

    def set_close_callback(self, callback) -> None:
        pass

    def write_headers(self, start_line, headers, chunk=None) -> asyncio.Future:
        if "Content-Length" not in headers:
            self.chunked = True
            headers["Transfer-Encoding"] = "chunked"
        lines = [f"HTTP/1.1 {start_line.code} {start_line.reason}"]
        lines.extend(f"{name}: {value}" for name, value in headers.get_all())
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.framed(chunk or b""))
        return self.done

    def write(self, chunk: bytes) -> asyncio.Future:
        self.transport.write(self.framed(chunk))
        return self.done

    def finish(self) -> None:
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")

    def framed(self, chunk: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked and chunk else chunk


class Server(asyncio.Protocol):
    """A client's connection: llhttp's callbacks drive the application's request delegate."""

    def __init__(self, app: Application) -> None:
        self.app, self.parser = app, httptools.HttpRequestParser(self)
        self.done = asyncio.get_running_loop().create_future()
        self.done.set_result(None)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", HTTPHeaders()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.delegate = self.app.start_request(self, Answer(self.transport, self.done))
        method = self.parser.get_method().decode()
        self.delegate.headers_received(RequestStartLine(method, self.url.decode("latin-1"), "HTTP/1.1"), self.headers)

    def on_body(self, body: bytes) -> None:
        self.delegate.data_received(body)

    def on_message_complete(self) -> None:
        self.delegate.finish()


async def main(port: int) -> None:
    app = Application([(r"/.*", Constant)])
    await asyncio.get_running_loop().create_server(lambda: Server(app), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
