"""Cross-origin requests from browser apps, when the operator hands CORS to the proxy.

Ollama answers 403 to an ``Origin`` outside ``OLLAMA_ORIGINS``. With
``cors_origins`` set, the proxy answers preflights itself (also those the
platform turned into GET: only a preflight carries
``Access-Control-Request-Method``), forwards the actual request without its
``Origin``, and marks the answer as readable by that origin, its rate-limit
headers included. Without ``cors_origins``, a preflight goes to Ollama as
``OPTIONS``, without a key (browsers never send one with it): Ollama's CORS
middleware answers it, and no handler of Ollama's runs for ``OPTIONS``.
"""

from collections.abc import Iterable, Mapping

from .limit_headers import NAMES
from .routes import METHODS

PREFLIGHT_MAX_AGE = "600"
EXPOSED = ", ".join(NAMES)  # a browser reads only a few headers of an answer unless told


def allowed_origin(origin: str | None, allowed: Iterable[str]) -> str | None:
    """The origin to grant, or None when CORS stays with the upstream."""
    if origin is None:
        return None
    allowed = tuple(allowed)
    if "*" in allowed or origin.lower() in allowed:
        return origin
    return None


def is_preflight(headers: Mapping[str, str]) -> bool:
    """A browser's preflight (also one the platform turned into GET): it names the
    method it asks for, and has an Origin and never a body."""
    return "Access-Control-Request-Method" in headers and "Origin" in headers


def preflight_headers(origin: str, headers: Mapping[str, str]) -> dict[str, str]:
    answer = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ", ".join(METHODS),
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        "Vary": "Origin",
    }
    requested = headers.get("Access-Control-Request-Headers")
    if requested:
        answer["Access-Control-Allow-Headers"] = requested
    return answer


def response_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED, "Vary": "Origin"}
