"""Heartbeats: bytes every client ignores, sent while the upstream is silent.

Cloudflare (in front of Runpod's pods) ends a request with a 524 when the
origin sends nothing for 100 s, and Ollama is often silent that long: a
`"stream": false` generation, a cold model load, a long prompt. A heartbeat
keeps bytes flowing in a form the answer's format allows: whitespace before
a JSON document or an NDJSON line, an SSE comment between events. Before
the upstream's head has arrived, the first heartbeat sends the answer's head
itself (200); an error that comes later then goes in-band, in the format
the client is reading.
"""

from __future__ import annotations

# What a heartbeat is, per answer format.
BEATS = {"json": b" ", "ndjson": b" ", "sse": b": heartbeat\n\n"}
CONTENT_TYPES = {"json": "application/json", "ndjson": "application/x-ndjson", "sse": "text/event-stream"}
HEARTBEAT_HEADER = "X-Ollama-Proxy-Heartbeat"
ERROR_BODY_LIMIT = 64 * 1024  # an upstream error answer is read up to this, for its message


def may_beat(answer_format: str, body_started: bool, tail: bytes) -> bool:
    """Whether a heartbeat fits where the answer is: anywhere before a JSON document
    or NDJSON stream begins, then only after a complete line or event."""
    if not body_started:
        return True
    if answer_format == "ndjson":
        return tail.endswith(b"\n")
    if answer_format == "sse":
        return tail.endswith(b"\n\n")
    return False  # a JSON document has begun
