"""The connection to Ollama.

Tornado's client has a 10-request concurrency ceiling, a 20 s total timeout and
a 100 MB body cap by default, and no public way to abort a fetch (tornado
issue #157). A proxy relaying 30-minute generations needs none of the first
three and must abort when its client leaves, so this module configures them
away and reaches into ``simple_httpclient``'s connection (private API: the
package pins tornado's minor version and the tests cover it).
"""

import ipaddress
import socket
from asyncio import Future
from collections.abc import Callable

from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError
from tornado.netutil import DefaultLoopResolver, Resolver
from tornado.simple_httpclient import (
    HTTPStreamClosedError,
    HTTPTimeoutError,
    SimpleAsyncHTTPClient,
    _HTTPConnection,
)

from .errors import Rejection
from .settings import Settings

UNLIMITED = 2**62


class IdleTimeout(Exception):
    """The upstream sent nothing for longer than the idle timeout."""


class ClientGone(Exception):
    """The client disconnected; nobody is left to read the answer."""


class UpstreamRequest(HTTPRequest):
    """An `HTTPRequest` that can be aborted while connecting, uploading or streaming."""

    connection: _HTTPConnection  # set when the client starts the fetch

    def abort(self, error: Exception) -> None:
        """End the fetch now with `error` and close its socket (no-op once it has ended)."""
        self.connection._handle_exception(type(error), error, None)


class _AbortableConnection(_HTTPConnection):
    def __init__(self, client, request, *args) -> None:
        # `request` is the client's _RequestProxy around our UpstreamRequest.
        request.request.connection = self
        super().__init__(client, request, *args)


class LiteralResolver(Resolver):
    """Answers IP literals (the usual upstream, 127.0.0.1) without the resolver's thread pool.

    Tornado's default resolver runs getaddrinfo in a thread for every request,
    which profiling showed to be a quarter of the proxy's CPU per request.
    Host names still go to the default resolver.
    """

    def initialize(self) -> None:
        self.names = DefaultLoopResolver()

    async def resolve(self, host: str, port: int, family: int = socket.AF_UNSPEC) -> list:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return await self.names.resolve(host, port, family)
        if address.version == 6:
            return [(socket.AF_INET6, (host, port, 0, 0))]
        return [(socket.AF_INET, (host, port))]


class UpstreamClient(SimpleAsyncHTTPClient):
    def _connection_class(self) -> type:
        return _AbortableConnection


class Upstream:
    """The configured Ollama server and how to reach and describe it."""

    def __init__(self, settings: Settings):
        self.base = settings.upstream_base
        self.host = settings.upstream_host
        self.connect_timeout = settings.connect_timeout
        self.idle_timeout = settings.idle_timeout
        self._client: UpstreamClient | None = None

    @property
    def client(self) -> UpstreamClient:
        # Created on first use, inside the running event loop.
        if self._client is None:
            self._client = UpstreamClient(
                force_instance=True,
                max_clients=UNLIMITED,
                max_body_size=UNLIMITED,
                resolver=LiteralResolver(),
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def request(
        self,
        method: str,
        target: str,
        headers: HTTPHeaders,
        *,
        body: bytes | None = None,
        body_producer: Callable | None = None,
        header_callback: Callable[[str], None] | None = None,
        streaming_callback: Callable | None = None,
    ) -> UpstreamRequest:
        return UpstreamRequest(
            self.base + target,
            method=method,
            headers=headers,
            body=body,
            body_producer=body_producer,
            header_callback=header_callback,
            streaming_callback=streaming_callback,
            connect_timeout=self.connect_timeout,
            request_timeout=0,  # no total limit: the idle timeout guards silence
            follow_redirects=False,
            decompress_response=False,
            allow_nonstandard_methods=True,  # DELETE with a body, POST without one
        )

    def fetch(self, request: HTTPRequest) -> "Future[HTTPResponse]":
        """Start `request` now (an `UpstreamRequest` is abortable from this moment)."""
        return self.client.fetch(request, raise_error=False)

    def failure(self, error: BaseException) -> tuple[str, Rejection]:
        """The kind of a failure before any response byte, and what to tell the client."""
        where = f"upstream {self.base}"
        if isinstance(error, IdleTimeout):
            return "idle_timeout", Rejection(504, f"{where} sent nothing for {self.idle_timeout:g} s")
        if isinstance(error, HTTPTimeoutError):
            return "connect_timeout", Rejection(
                504, f"{where} did not accept the connection within {self.connect_timeout:g} s"
            )
        if isinstance(error, ConnectionRefusedError):
            return "refused", Rejection(502, f"{where} refused the connection")
        if isinstance(error, HTTPStreamClosedError | StreamClosedError | ConnectionResetError):
            # Tornado reports a malformed answer this way too.
            return "closed", Rejection(502, f"{where} closed the connection without a valid HTTP response")
        return "unreachable", Rejection(502, f"{where} could not be reached: {error}")
