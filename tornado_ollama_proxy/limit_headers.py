"""OpenAI's rate-limit headers, which clients already read: a trio per kind of limit
(`requests` for the rate limits, `tokens` for the quotas), its reset written as OpenAI
writes a wait; and the names of every rate-limit header the proxy sends."""

import math

KINDS = ("requests", "tokens")
# Every rate-limit header the proxy sends: what a browser app on another origin is let
# read of an answer (CORS), besides the few headers every answer shows it.
NAMES = (
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    *(f"x-ratelimit-{field}-{kind}" for kind in KINDS for field in ("limit", "remaining", "reset")),
)


def duration(seconds: float) -> str:
    """OpenAI's form of a wait in its rate-limit headers (Go's): `1m30s`, `6s`, `250ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, minutes, rest = whole // 3600, whole % 3600 // 60, whole % 60
    if hours:
        return f"{hours}h{minutes}m{rest}s"
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def openai_headers(kind: str, limit: int, remaining: int, reset: float) -> dict[str, str]:
    """`x-ratelimit-limit-<kind>`, `x-ratelimit-remaining-<kind>` and
    `x-ratelimit-reset-<kind>` (`reset`: seconds until the window is whole again)."""
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": duration(reset),
    }
