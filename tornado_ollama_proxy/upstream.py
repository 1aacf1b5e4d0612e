"""One Ollama server of the pool: where it is, how a request to it is built, and what
to tell a client when it cannot be reached.

Requests go through the pool's `PooledHTTPClient` (see `upstream_client`):
kept-alive connections, no concurrency ceiling, no body cap, no total timeout
(the journey's idle watch guards silence), and abortable when the client leaves.
Errors name the pod by its name, never its URL, which may hold a secret.
"""

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError

from .errors import Rejection
from .framing import Head, IncompleteAnswer, MalformedAnswer
from .settings import PodConfig, Settings
from .upstream_client import AbortableRequest, ConnectTimeout


class IdleTimeout(Exception):
    """The upstream sent nothing (or took none of the body) for longer than the idle timeout."""


class Abandoned(Exception):
    """The proxy let the exchange go: its client left, or was answered already (a 408,
    a 413 mid-body). Not the upstream's failure: it counts against nobody."""


BodyProducer = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


class Pod:
    """A configured Ollama server: its name, weight and slots, and how to address it."""

    def __init__(self, config: PodConfig, settings: Settings):
        self.config = config
        self.name = config.name
        self.weight = config.weight
        self.slots = config.slots
        self.base = config.base
        self.host = config.host
        self.prefix = urlsplit(self.base).path  # a path the upstream is mounted under
        self.headers = config.headers
        self.connect_timeout = settings.connect_timeout
        self.idle_timeout = settings.idle_timeout

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
        """A request for `target` (path and query as they go on the wire, never re-encoded),
        with this pod's Host and its own headers."""
        headers["Host"] = self.host
        for name, value in self.headers:
            headers[name] = value
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

    def failure(self, error: BaseException) -> tuple[str, Rejection]:
        """The kind of a failure before any response byte, and what to tell the client."""
        where = f"upstream {self.name!r}"
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
