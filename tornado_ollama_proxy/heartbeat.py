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

from .peer_json import json_object

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


# -- an answer another instance of this proxy started with heartbeats -------------------------


def strip_beats(data: bytes) -> tuple[bytes, bytes]:
    """What follows the heartbeats at the start of `data` (spaces and newlines, SSE comment
    lines), and an unfinished comment line to wait for: (content, pending)."""
    while True:
        data = data.lstrip(b" \r\n")
        if not data.startswith(b":"):
            return data, b""
        end = data.find(b"\n")
        if end < 0:
            return b"", data
        data = data[end + 1 :]


def told_error(content: bytes) -> tuple[int, str] | None:
    """An error told in-band where the content should begin (a line `{"error": …}`, or an
    event `data: {"error": …}`): the status it stands for, and its message; None for
    content. The status is OpenAI's `code` when it has one, else what its message says:
    busy is 503, not found 404, anything else 502 (the pod failed)."""
    line = content.split(b"\n", 1)[0].strip()
    data = json_object(line.removeprefix(b"data:"))
    error = data.get("error") if data is not None else None
    if isinstance(error, dict):
        code, message = error.get("code"), str(error.get("message", ""))
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
            return code, message
    elif isinstance(error, str):
        message = error
    else:
        return None
    lowered = message.lower()
    return (503 if "busy" in lowered else 404 if "not found" in lowered else 502), message
