"""Answers the proxy gives itself, in Ollama's error shape so clients show them."""

import json
from collections.abc import Mapping


class Rejection(Exception):
    """A request the proxy answers itself with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
