"""Who the client is, when requests arrive through proxies.

Behind Runpod every request comes from the platform's load balancer, so the
TCP peer says nothing about the user. Forwarding headers are believed only
when the peer is one of the configured trusted proxies; a header sent by
anyone else is ignored, so it cannot be used to pose as another client.
"""

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from tornado.httputil import HTTPHeaders

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)  # the same few peers, every request
def parse_address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from header or socket text, IPv4-mapped IPv6 unmapped; None if malformed."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def in_networks(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, networks: Iterable[Network]) -> bool:
    return address is not None and any(address in network for network in networks)


def client_address(peer: str | None, headers: HTTPHeaders, trusted: tuple[Network, ...]) -> str:
    """The client's address: the TCP peer, or what trusted proxies say it is.

    From a trusted peer, ``CF-Connecting-IP`` (set by Cloudflare) wins; else
    ``X-Forwarded-For`` is read from the right, skipping trusted hops, and the
    first untrusted address is the client. Malformed values are ignored.
    """
    address = parse_address(peer)
    if not in_networks(address, trusted):
        return str(address) if address is not None else (peer or "unknown")
    cloudflare = parse_address(headers.get("CF-Connecting-IP"))
    if cloudflare is not None:
        return str(cloudflare)
    hops = [hop for value in headers.get_list("X-Forwarded-For") for hop in value.split(",")]
    for hop in reversed(hops):
        hop_address = parse_address(hop)
        if hop_address is None:
            break  # a malformed hop ends what can be believed
        if not in_networks(hop_address, trusted):
            return str(hop_address)
        address = hop_address
    return str(address)


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable only from this machine."""
    address = parse_address(host)
    return host == "localhost" or (address is not None and address.is_loopback)
