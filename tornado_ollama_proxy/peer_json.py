"""JSON a peer sent (a client's body, an upstream's answer), read without trusting it."""

from __future__ import annotations

import json
from typing import Any


def json_object(data: bytes | str) -> dict[str, Any] | None:
    """The JSON object `data` holds; None for anything else: not JSON, not an object,
    or nested too deep for the parser (`RecursionError`, which a 10 KB body can cause)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
