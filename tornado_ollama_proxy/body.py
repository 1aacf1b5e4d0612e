"""The client's request body on its way upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from tornado.iostream import StreamClosedError

from .ending import AccessRecord, Watchdog
from .errors import Rejection

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
    the answer instead of a reset. The watchdog learns whose turn it is: the
    client's while its body is awaited, the upstream's while it holds a piece.
    """

    def __init__(self, declared: int | None, limit: int | None, record: AccessRecord, watchdog: Watchdog):
        loop = asyncio.get_running_loop()
        self.declared = declared  # Content-Length, None for a chunked body
        self.limit = limit  # max_body_size
        self.record = record
        self.watchdog = watchdog
        self.held: list[bytes] | None = None
        self.held_limit = 0
        # The upstream's write function once it wants the body, None once it has gone.
        self._writer: asyncio.Future[Write | None] = loop.create_future()
        # The whole body has been passed on (or dropped): the producer returns.
        self._passed: asyncio.Future[None] = loop.create_future()
        # The client has sent its whole body, or left.
        self.received: asyncio.Future[None] = loop.create_future()
        watchdog.client_turn = declared != 0

    @property
    def present(self) -> bool:
        return self.declared != 0

    def hold(self, limit: int) -> None:
        """Keep the body whole, refusing it (413) past `limit` bytes."""
        self.held = []
        self.held_limit = limit

    async def feed(self, piece: bytes) -> None:
        """A piece from the client; `Rejection` 413 when the body outgrows a limit."""
        record = self.record
        record.bytes_in += len(piece)
        self.watchdog.touch()
        if self.limit is not None and record.bytes_in > self.limit:
            raise Rejection(413, f"request body is larger than max_body_size ({self.limit} bytes)")
        if self.held is not None:
            if record.bytes_in > self.held_limit:
                raise Rejection(413, f"a body for this route is held whole and may be at most {self.held_limit} bytes")
            self.held.append(piece)
            return
        write = await self._writer
        if write is None:
            return  # the upstream has gone: the rest is dropped
        self.watchdog.client_turn = False
        with suppress(StreamClosedError):  # the fetch reports what happened upstream
            await write(piece)
        self.watchdog.client_turn = not self.received.done()
        self.watchdog.touch()

    def whole(self) -> bytes:
        """The held body."""
        assert self.held is not None
        return b"".join(self.held)

    async def produce(self, write: Write) -> None:
        """The upstream request's `body_producer`: hands over `write`, returns once the body has passed."""
        _resolve(self._writer, write)
        await self._passed

    def arrived(self) -> None:
        """The client's whole body is in (or the client left)."""
        self.watchdog.client_turn = False
        _resolve(self.received, None)
        _resolve(self._passed, None)

    def stop(self) -> None:
        """The upstream has gone: what is still to come is dropped."""
        _resolve(self._writer, None)
        _resolve(self._passed, None)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
