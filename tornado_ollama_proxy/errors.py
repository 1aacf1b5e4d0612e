"""Errors the proxy tells a client itself, in the shape that client reads.

One table (the README's) for every error the proxy writes, so that existing
clients show it: the official ollama clients read Ollama's ``{"error": "…"}``,
the OpenAI SDKs read ``{"error": {"message", "type", "code"}}`` (which
Ollama's own ``/v1`` routes answer too).

| answer   | with a status            | in-band (after the proxy's own head)                        |
|----------|--------------------------|-------------------------------------------------------------|
| `/api/*` | `{"error": "…"}`         | NDJSON: a line `{"error": "…"}`; whole JSON: `{"error": "…"}`, |
|          |                          | on pull/push/create `{"status": "error: …", "error": "…"}`  |
| `/v1/*`  | `{"error": {…}}`         | SSE: `data: {"error": {…}}`; whole JSON: `{"error": {…}}`   |
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from .peer_json import json_object

OLLAMA, OPENAI = "ollama", "openai"
# Progress answers: a client reading one whole (`"stream": false`, the Python
# client's default for pull) looks at its `status`, and would take an error
# without one for a success.
PROGRESS_PATHS = frozenset({"/api/pull", "/api/push", "/api/create"})
MESSAGE_LIMIT = 1000  # characters of an upstream's error text that are told on


class Rejection(Exception):
    """A request the proxy answers itself, with `status` and an error in the client's shape."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def shape_for(path: str) -> str:
    """Which error shape the client of `path` (a request path, raw or decoded) reads."""
    return OPENAI if unquote(path).startswith("/v1/") else OLLAMA


def error_object(shape: str, status: int, message: str) -> dict[str, Any]:
    if shape == OPENAI:
        kind = "invalid_request_error" if status < 500 else "api_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return {"error": message}


def error_answer(path: str, status: int, message: str) -> bytes:
    """The body of an error answered with `status`."""
    return json.dumps(error_object(shape_for(path), status, message)).encode()


def in_band_error(answer_format: str, path: str, status: int, message: str) -> bytes:
    """An error told after the proxy's own `200` went out, in the format the client
    is reading: an SSE data event (which the OpenAI SDKs raise), else a JSON object
    and a newline (Ollama's own way to fail a stream, which its clients raise).
    `path` is the route's path; `status` the one the error would have had."""
    if answer_format == "sse":
        return b"data: " + json.dumps(error_object(OPENAI, status, message)).encode() + b"\n\n"
    shape = shape_for(path)
    error = error_object(shape, status, message)
    if answer_format == "json" and shape == OLLAMA and path in PROGRESS_PATHS:
        error = {"status": f"error: {message}", **error}
    return json.dumps(error).encode() + b"\n"


def error_message(body: bytes, code: int) -> str:
    """The message of an upstream's error answer: Ollama's {"error": "…"}, OpenAI's
    {"error": {"message": "…"}}, else its text, else its status."""
    data = json_object(body)
    error = data.get("error") if data is not None else None
    if isinstance(error, dict):
        error = error.get("message")
    if isinstance(error, str) and error:
        return error[:MESSAGE_LIMIT]
    text = body.decode("utf-8", "replace").strip()
    return text[:MESSAGE_LIMIT] if text else f"the upstream answered {code}"
