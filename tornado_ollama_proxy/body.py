"""The client's request body on its way upstream."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from tornado.iostream import StreamClosedError

from .errors import Rejection
from .record import AccessRecord
from .usage import REQUEST_COPY_LIMIT, RequestInfo, read_request

Write = Callable[[bytes], Awaitable[None]]

# A sized body up to this is held whole and goes upstream in the same write as
# the request head: no producer task, one write instead of several.
SMALL_BODY = 64 * 1024
# Alias bodies are held whole to merge their defaults in, up to this size.
ALIAS_BODY_LIMIT = 1024 * 1024


class BodyPump:
    """Takes the client's body as Tornado delivers it and passes it on.

    Held whole (`held`) when small or when an alias rewrites it, else streamed
    through the upstream connection's write function, each piece waiting for
    the upstream to take the one before (flow control). Once the upstream has
    gone (`stop`) the rest is read and dropped, so that the client can read
    the answer instead of a reset. `client_turn` says whether the exchange
    waits for the client (its body is expected and the upstream is not
    holding it back); `written` counts pieces the upstream took. A held body,
    or a streamed one asked to keep a copy (up to 1 MiB), tells its `model` and
    `stream` (`info`).
    """

    def __init__(self, declared: int | None, limit: int | None, record: AccessRecord):
        self.declared = declared  # Content-Length, None for a chunked body
        self.limit = limit  # max_body_size
        self.record = record
        self.held: list[bytes] | None = None
        self.held_limit = 0
        self.copy: list[bytes] | None = None
        self._info: RequestInfo | None = None
        self.client_turn = declared != 0
        self.written = 0
        loop = asyncio.get_running_loop()
        self.received = loop.create_future()  # the client sent its whole body, or left
        # Only a body needs these: the upstream's write function (None once it has
        # gone), and the whole body passed on (or dropped).
        self._writer: asyncio.Future[Write | None] | None = loop.create_future() if self.present else None
        self._passed: asyncio.Future[None] | None = loop.create_future() if self.present else None
        self._tee: list[asyncio.Future[Write | None]] | None = None  # one write function per upstream

    @property
    def present(self) -> bool:
        return self.declared != 0

    def keep_copy(self) -> None:
        """Keep a copy of a streamed body, while it is at most 1 MiB, to read it (`info`)."""
        self.copy = []

    def hold(self, limit: int) -> None:
        """Keep the body whole, refusing it (413) past `limit` bytes."""
        self.held = []
        self.held_limit = limit

    async def feed(self, piece: bytes) -> None:
        """A piece from the client; `Rejection` 413 when the body outgrows a limit."""
        record = self.record
        record.bytes_in += len(piece)
        if self.limit is not None and record.bytes_in > self.limit:
            raise Rejection(413, f"request body is larger than max_body_size ({self.limit} bytes)")
        if self.held is not None:
            if record.bytes_in > self.held_limit:
                raise Rejection(413, f"a body for this route is held whole and may be at most {self.held_limit} bytes")
            self.held.append(piece)
            return
        if self.copy is not None:
            self.copy.append(piece)
            if record.bytes_in > REQUEST_COPY_LIMIT:
                self.copy = None  # too large to be read: the route's defaults apply
        if self._tee is not None:
            writes = [write for write in [await slot for slot in self._tee] if write is not None]
        else:
            assert self._writer is not None
            write = await self._writer
            writes = [write] if write is not None else []
        if not writes:
            return  # every upstream has gone: the rest is dropped
        self.client_turn = False
        if len(writes) == 1:
            await _write(writes[0], piece)
        else:
            await asyncio.gather(*(_write(write, piece) for write in writes))  # as fast as the slowest
        self.written += 1
        self.client_turn = not self.received.done()

    @property
    def readable(self) -> bool:
        """Whether `info` reads the whole body: it is all in, and held or copied."""
        return self.received.done() and (self.held is not None or self.copy is not None)

    def whole(self) -> bytes:
        """The held body."""
        assert self.held is not None
        return b"".join(self.held)

    def replace(self, content: bytes) -> None:
        """Hold `content` instead of what arrived (an alias's defaults merged in)."""
        self.held = [content]
        self._info = None

    def info(self) -> RequestInfo:
        """The `model` and `stream` the body names (once the whole body is in)."""
        if self._info is not None:
            return self._info
        body = self.whole() if self.held is not None else b"".join(self.copy) if self.copy is not None else None
        info = read_request(body)
        if self.received.done():
            self._info = info  # what a body still arriving says may change
        return info

    async def produce(self, write: Write) -> None:
        """The upstream request's `body_producer`: hands over `write`, returns once the body has passed."""
        assert self._writer is not None and self._passed is not None
        _resolve(self._writer, write)
        await self._passed

    def tee(self, count: int) -> list[Callable[[Write], Awaitable[None]]]:
        """Producers for `count` upstreams that each take the whole body; one whose
        upstream ends is let go (`let_go`) and the others go on."""
        loop = asyncio.get_running_loop()
        self._tee = [loop.create_future() for _ in range(count)]
        return [functools.partial(self._produce_into, slot) for slot in self._tee]

    async def _produce_into(self, slot: asyncio.Future[Write | None], write: Write) -> None:
        assert self._passed is not None
        _resolve(slot, write)
        await self._passed

    def let_go(self, index: int) -> None:
        """The `index`th upstream of a tee has ended: it takes no more."""
        assert self._tee is not None
        _resolve(self._tee[index], None)
        gone: asyncio.Future[Write | None] = asyncio.get_running_loop().create_future()
        gone.set_result(None)
        self._tee[index] = gone

    def arrived(self) -> None:
        """The client's whole body is in (or the client left)."""
        self.client_turn = False
        _resolve(self.received, None)
        if self._passed is not None:
            _resolve(self._passed, None)

    def stop(self) -> None:
        """The upstream has gone (every one of a tee): what is still to come is dropped."""
        if self._writer is not None:
            assert self._passed is not None
            for slot in [self._writer, *(self._tee or ())]:
                _resolve(slot, None)
            _resolve(self._passed, None)


async def _write(write: Write, piece: bytes) -> None:
    with suppress(StreamClosedError):  # the fetch reports what happened upstream
        await write(piece)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
