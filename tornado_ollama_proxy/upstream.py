"""The connection to Ollama: where it is, how a request to it is built, and
what to tell a client when it cannot be reached.

Requests go through `PooledHTTPClient` (see `upstream_client`): kept-alive
connections, no concurrency ceiling, no body cap, no total timeout (the
handler's idle watch guards silence), and abortable when the client leaves.
"""

from asyncio import Future
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from tornado.httpclient import HTTPResponse
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError

from .errors import Rejection
from .framing import Head, IncompleteAnswer, MalformedAnswer
from .settings import Settings
from .upstream_client import AbortableRequest, ConnectTimeout, PooledHTTPClient


class IdleTimeout(Exception):
    """The upstream sent nothing (or took none of the body) for longer than the idle timeout."""


class Abandoned(Exception):
    """The proxy let the exchange go: its client left, or was answered already (a 408,
    a 413 mid-body). Not the upstream's failure: it counts against nobody."""


BodyProducer = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


class Upstream:
    """The configured Ollama server and how to reach and describe it."""

    def __init__(self, settings: Settings):
        self.base = settings.upstream_base
        self.host = settings.upstream_host
        self.prefix = urlsplit(self.base).path  # a path the upstream is mounted under
        self.connect_timeout = settings.connect_timeout
        self.idle_timeout = settings.idle_timeout
        self._client: PooledHTTPClient | None = None

    @property
    def client(self) -> PooledHTTPClient:
        # Created on first use, inside the running event loop.
        if self._client is None:
            self._client = PooledHTTPClient(force_instance=True)
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
        body_producer: BodyProducer | None = None,
        head_callback: Callable[[Head], None] | None = None,
        streaming_callback: Callable[[bytes], Awaitable[None] | None] | None = None,
    ) -> AbortableRequest:
        """A request for `target` (path and query as they go on the wire, never re-encoded)."""
        return AbortableRequest(
            self.base,
            target=self.prefix + target,
            method=method,
            headers=headers,
            body=body,
            body_producer=body_producer,
            head_callback=head_callback,
            streaming_callback=streaming_callback,
            connect_timeout=self.connect_timeout,
            request_timeout=0,  # no total limit: the idle watch guards silence
            follow_redirects=False,
            decompress_response=False,
            allow_nonstandard_methods=True,  # DELETE with a body, POST without one
        )

    def fetch(self, request: AbortableRequest) -> "Future[HTTPResponse]":
        """Start `request` now (it is abortable from this moment)."""
        return self.client.start(request)

    def failure(self, error: BaseException) -> tuple[str, Rejection]:
        """The kind of a failure before any response byte, and what to tell the client."""
        where = f"upstream {self.base}"
        if isinstance(error, IdleTimeout):
            return "idle_timeout", Rejection(504, f"{where} sent nothing for {self.idle_timeout:g} s")
        if isinstance(error, ConnectTimeout):
            return "connect_timeout", Rejection(
                504, f"{where} did not accept the connection within {self.connect_timeout:g} s"
            )
        if isinstance(error, ConnectionRefusedError):
            return "refused", Rejection(502, f"{where} refused the connection")
        if isinstance(error, MalformedAnswer):
            return "malformed", Rejection(502, f"{where} sent an answer this proxy cannot relay: {error}")
        if isinstance(error, IncompleteAnswer | StreamClosedError | ConnectionResetError):
            return "closed", Rejection(502, f"{where} closed the connection without a valid HTTP response")
        return "unreachable", Rejection(502, f"{where} could not be reached: {error}")
