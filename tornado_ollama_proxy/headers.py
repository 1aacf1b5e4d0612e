"""Which headers cross the proxy, in each direction (RFC 9110 §7.6.1)."""

from collections.abc import Iterable, Mapping

from tornado.httputil import HTTPHeaders

OVERRIDE_HEADER = "X-HTTP-Method-Override"

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

Pairs = Iterable[tuple[str, str]]


def value_of(headers: Mapping[str, str], name: str) -> str | None:
    """`headers.get(name)` without the KeyError that `Mapping.get` raises and catches
    inside Tornado's `HTTPHeaders` for an absent header: most of those a request's
    way reads are absent."""
    return headers[name] if name in headers else None  # noqa: SIM401 (the point)


def end_to_end(pairs: Pairs) -> list[tuple[str, str]]:
    """The headers a proxy passes on: all but hop-by-hop ones and those Connection names."""
    pairs = list(pairs)
    named = {
        token.strip().lower() for name, value in pairs if name.lower() == "connection" for token in value.split(",")
    }
    kept = []
    for name, value in pairs:
        lowered = name.lower()
        if lowered not in HOP_BY_HOP and lowered not in named and not lowered.startswith("proxy-"):
            kept.append((name, value))
    return kept


# Consumed by the proxy: Host is the upstream's own, Expect is answered here,
# the override has been applied.
_NOT_FORWARDED = frozenset({"host", "expect", OVERRIDE_HEADER.lower()})
_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})


def upstream_request_headers(
    incoming: HTTPHeaders,
    *,
    client_ip: str | None,
    scheme: str,
    trusted_peer: bool,
    removed: Iterable[str] = (),
) -> HTTPHeaders:
    """Headers for the upstream request, but for Host, which each pod sets to its own
    host:port (Ollama on loopback answers 403 to any other).

    The X-Forwarded-* trio records what the proxy replaced. What a
    trusted proxy in front said is kept (the chain is extended); from anyone
    else, X-Forwarded-Proto and X-Forwarded-Host are the proxy's own view.
    `removed` names more headers the proxy consumed (access keys).
    """
    dropped = _NOT_FORWARDED | {name.lower() for name in removed}
    if not trusted_peer:
        dropped |= _FORWARDED - {"x-forwarded-for"}
    headers = HTTPHeaders()
    for name, value in end_to_end(incoming.get_all()):
        if name.lower() in dropped:
            continue
        if name in headers:
            headers.add(name, value)
        else:  # valid, as Tornado parsed it: without `add`'s checks again
            headers[name] = value
    headers["X-Forwarded-For"] = ", ".join([*incoming.get_list("X-Forwarded-For"), client_ip or "unknown"])
    headers.setdefault("X-Forwarded-Proto", scheme)
    if "Host" in incoming:
        headers.setdefault("X-Forwarded-Host", incoming["Host"])
    return headers
