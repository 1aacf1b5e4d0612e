"""Content codings (gzip, deflate) on answers that may follow a heartbeat.

A heartbeat's own head announces no coding, so an upstream answer that
arrives compressed after it is decoded on its way (`Decoder`). Requests that
may get heartbeats therefore offer the upstream only codings the proxy can
undo (`decodable`): a remote pod behind Cloudflare would otherwise answer
Brotli. Once an answer's own encoded head went out, nothing is ever written
into its body (see `relay`).
"""

from __future__ import annotations

import zlib

from .framing import MalformedAnswer

DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})
EXPANSION_LIMIT = 8 * 1024 * 1024  # bytes one piece may decode to: no decompression bomb fills memory


def coding_of(headers: list[tuple[str, str]]) -> str | None:
    """An answer's content coding, lower-cased; None for none (or identity)."""
    codings = [value.strip().lower() for name, value in headers if name.lower() == "content-encoding"]
    coding = ", ".join(coding for coding in codings if coding)
    return None if coding in ("", "identity") else coding


def decodable(accept_encoding: str) -> str | None:
    """`Accept-Encoding` reduced to the codings the proxy can undo (None: identity only)."""
    kept = [item.strip() for item in accept_encoding.split(",") if item.split(";")[0].strip().lower() in DECODABLE]
    return ", ".join(kept) or None


class Decoder:
    """Undoes gzip (one member or several, as gzip allows) or zlib-wrapped deflate as
    the pieces come; `MalformedAnswer` for anything else, a broken stream, or a piece
    that would expand past the limit. `complete` once the coding's own end was read: an
    answer that ends before it was cut short."""

    def __init__(self, coding: str):
        if coding not in DECODABLE:
            raise MalformedAnswer(f"the upstream's answer is encoded ({coding[:40]}), which cannot follow a heartbeat")
        self._stream = _decompressor()

    def decode(self, data: bytes) -> bytes:
        decoded = b""
        while True:
            room = EXPANSION_LIMIT - len(decoded)
            try:
                decoded += self._stream.decompress(data, room)
            except zlib.error as error:
                raise MalformedAnswer(f"the upstream's encoded answer is broken: {error}") from None
            if self._stream.unconsumed_tail or len(decoded) >= EXPANSION_LIMIT:
                raise MalformedAnswer(f"the upstream's encoded answer expands past {EXPANSION_LIMIT} bytes a piece")
            if not (self._stream.eof and self._stream.unused_data):
                return decoded
            data = self._stream.unused_data  # the next gzip member
            self._stream = _decompressor()

    @property
    def complete(self) -> bool:
        return self._stream.eof


def _decompressor() -> zlib._Decompress:
    return zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by its header
