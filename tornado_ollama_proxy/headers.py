"""Which headers cross the proxy, in each direction (RFC 9110 §7.6.1)."""

from tornado.httputil import HTTPHeaders

from .routes import OVERRIDE_HEADER

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


def end_to_end(headers: HTTPHeaders) -> list[tuple[str, str]]:
    """The headers a proxy passes on: all but hop-by-hop ones and those Connection names."""
    named = {
        token.strip().lower()
        for value in headers.get_list("Connection")
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in headers.get_all()
        if name.lower() not in HOP_BY_HOP
        and name.lower() not in named
        and not name.lower().startswith("proxy-")
    ]


# Consumed by the proxy: Host is the upstream's own, Expect is answered here,
# the override has been applied.
_NOT_FORWARDED = frozenset({"host", "expect", OVERRIDE_HEADER.lower()})


def upstream_request_headers(
    incoming: HTTPHeaders, *, upstream_host: str, client_ip: str | None, scheme: str
) -> HTTPHeaders:
    """Headers for the upstream request.

    Host is the upstream's host:port because Ollama on loopback answers 403 to
    any other; the X-Forwarded-* trio records what the proxy replaced.
    """
    headers = HTTPHeaders()
    for name, value in end_to_end(incoming):
        if name.lower() not in _NOT_FORWARDED:
            headers.add(name, value)
    headers["Host"] = upstream_host
    forwarded_for = ", ".join(incoming.get_list("X-Forwarded-For") + [client_ip or "unknown"])
    headers["X-Forwarded-For"] = forwarded_for
    headers.setdefault("X-Forwarded-Proto", scheme)
    if "Host" in incoming:
        headers.setdefault("X-Forwarded-Host", incoming["Host"])
    return headers
