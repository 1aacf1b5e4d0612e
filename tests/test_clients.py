import ipaddress

import pytest
from tornado.httputil import HTTPHeaders

from tornado_ollama_proxy.clients import client_address, in_networks, parse_address

RUNPOD_LB = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


def headers(**values):
    result = HTTPHeaders()
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            result.add(name.replace("_", "-"), item)
    return result


def test_without_trusted_proxies_the_peer_is_the_client():
    assert client_address("10.1.1.1", headers(X_Forwarded_For="203.0.113.7"), ()) == "10.1.1.1"


def test_a_spoofed_header_from_an_untrusted_peer_is_ignored():
    spoofed = headers(X_Forwarded_For="1.2.3.4", CF_Connecting_IP="1.2.3.4")
    assert client_address("198.51.100.9", spoofed, RUNPOD_LB) == "198.51.100.9"


def test_cloudflare_connecting_ip_wins_behind_a_trusted_peer():
    forwarded = headers(X_Forwarded_For="203.0.113.7, 172.70.1.1", CF_Connecting_IP="203.0.113.7")
    assert client_address("10.2.3.4", forwarded, RUNPOD_LB) == "203.0.113.7"


def test_forwarded_for_is_read_from_the_right_skipping_trusted_hops():
    forwarded = headers(X_Forwarded_For=["6.6.6.6, 203.0.113.7", "10.9.9.9"])
    assert client_address("10.2.3.4", forwarded, RUNPOD_LB) == "203.0.113.7"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client():
    assert client_address("10.2.3.4", headers(X_Forwarded_For="10.5.5.5, 10.6.6.6"), RUNPOD_LB) == "10.5.5.5"


@pytest.mark.parametrize("value", ["not-an-ip", "-", "1.2.3.4.5", "unknown"])
def test_a_malformed_hop_ends_what_can_be_believed(value):
    forwarded = headers(X_Forwarded_For=f"203.0.113.7, {value}", CF_Connecting_IP="garbage")
    assert client_address("10.2.3.4", forwarded, RUNPOD_LB) == "10.2.3.4"


def test_ipv6_peers_and_hops():
    assert client_address("::1", headers(X_Forwarded_For="2001:db8::7"), RUNPOD_LB) == "2001:db8::7"
    assert client_address("2001:db8::1", headers(), RUNPOD_LB) == "2001:db8::1"
    assert client_address("::ffff:10.1.2.3", headers(X_Forwarded_For="[2001:db8::8]"), RUNPOD_LB) == "2001:db8::8"


def test_an_unparseable_peer_is_kept_as_text():
    assert client_address("unix-socket", headers(), RUNPOD_LB) == "unix-socket"
    assert client_address(None, headers(), RUNPOD_LB) == "unknown"


def test_parse_address_unmaps_ipv4_in_ipv6():
    assert str(parse_address("::ffff:192.0.2.1")) == "192.0.2.1"
    assert parse_address(None) is None
    assert in_networks(parse_address("10.0.0.1"), RUNPOD_LB)
    assert not in_networks(None, RUNPOD_LB)
