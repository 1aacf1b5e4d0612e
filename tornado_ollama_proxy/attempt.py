"""One try of a forwarded request at the upstream, and what its end means."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .errors import Rejection
from .framing import Head
from .upstream import Abandoned, Upstream


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt that ended without a complete answer: its `kind` (a metric label) and
    what to tell the client."""

    kind: str
    rejection: Rejection


class Attempt:
    """Starts the exchange at once; `on_head` and `on_piece` receive the answer. Its end
    is known by `ended`: None for a complete answer, or one the proxy let go itself
    (`Abandoned`: the client left, or was answered already), else the `Failure`."""

    def __init__(
        self,
        upstream: Upstream,
        method: str,
        target: str,
        headers: Any,
        *,
        on_head: Callable[[Head], None],
        on_piece: Callable[[bytes], Awaitable[None] | None],
        body: bytes | None = None,
        body_producer: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]] | None = None,
    ):
        self.upstream = upstream
        self.request = upstream.request(
            method,
            target,
            headers,
            body=body,
            body_producer=body_producer,
            head_callback=on_head,
            streaming_callback=on_piece,
        )
        self.fetching: asyncio.Future[Any] = upstream.fetch(self.request)

    def abort(self, error: Exception) -> None:
        """End the exchange now (a no-op once it has ended)."""
        self.request.abort(error)

    def ended(self) -> Failure | None:
        """What the finished exchange means to the client."""
        error = self.fetching.exception()
        if error is None or isinstance(error, Abandoned):
            return None
        kind, rejection = self.upstream.failure(error)
        return Failure(kind, rejection)
