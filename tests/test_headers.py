from tornado.httputil import HTTPHeaders

from tornado_ollama_proxy.headers import end_to_end, upstream_request_headers, value_of


def headers(*pairs):
    result = HTTPHeaders()
    for name, value in pairs:
        result.add(name, value)
    return result


def test_hop_by_hop_and_connection_named_headers_are_dropped():
    incoming = headers(
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Connection", "Foo"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Anything", "y"),
        ("X-Secret-Hop", "1"),
        ("Foo", "2"),
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    )
    assert end_to_end(incoming.get_all()) == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def test_the_upstream_gets_the_forwarding_trio_and_not_the_clients_host():
    incoming = headers(
        ("Host", "abc-8000.proxy.runpod.net"),
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Authorization", "Bearer t"),
        ("Expect", "100-continue"),
        ("X-HTTP-Method-Override", "POST"),
        ("Connection", "close"),
    )
    out = upstream_request_headers(incoming, client_ip="10.1.2.3", scheme="http", trusted_peer=False)
    assert sorted(out.get_all()) == sorted(  # Host is each pod's own, set as a request goes to it
        [
            ("Content-Type", "application/json"),
            ("Content-Length", "12"),
            ("Authorization", "Bearer t"),
            ("X-Forwarded-For", "10.1.2.3"),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "abc-8000.proxy.runpod.net"),
        ]
    )


FORWARDED = (
    ("Host", "pod"),
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-For", "198.51.100.2"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "public.example"),
)


def test_forwarding_headers_from_a_trusted_proxy_are_extended_not_replaced():
    out = upstream_request_headers(headers(*FORWARDED), client_ip="10.0.0.1", scheme="http", trusted_peer=True)
    assert out.get_list("X-Forwarded-For") == ["203.0.113.7, 198.51.100.2, 10.0.0.1"]
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "public.example"


def test_forwarding_headers_from_anyone_else_are_the_proxys_own_view():
    out = upstream_request_headers(headers(*FORWARDED), client_ip="10.0.0.1", scheme="http", trusted_peer=False)
    # The chain says who sent what (the last hop is the proxy's own word);
    # the scheme and host the client used are what the proxy saw.
    assert out.get_list("X-Forwarded-For") == ["203.0.113.7, 198.51.100.2, 10.0.0.1"]
    assert out.get_list("X-Forwarded-Proto") == ["http"]
    assert out.get_list("X-Forwarded-Host") == ["pod"]


def test_headers_the_proxy_consumed_are_not_forwarded():
    incoming = headers(("Authorization", "Bearer k"), ("X-API-Key", "k"), ("Accept", "*/*"))
    out = upstream_request_headers(
        incoming,
        client_ip="10.0.0.1",
        scheme="http",
        trusted_peer=False,
        removed=("Authorization", "x-api-key"),
    )
    assert "Authorization" not in out and "X-API-Key" not in out and out["Accept"] == "*/*"


def test_a_request_without_host_or_peer_address_still_gets_sane_headers():
    out = upstream_request_headers(HTTPHeaders(), client_ip=None, scheme="https", trusted_peer=False)
    assert dict(out) == {"X-Forwarded-For": "unknown", "X-Forwarded-Proto": "https"}


def test_repeated_headers_go_upstream_each_as_it_came():
    incoming = headers(("Cookie", "a=1"), ("Accept", "*/*"), ("Cookie", "b=2"), ("X-Tag", "1"), ("x-tag", "2"))
    out = upstream_request_headers(incoming, client_ip="10.0.0.1", scheme="http", trusted_peer=False)
    assert out.get_list("Cookie") == ["a=1", "b=2"]
    assert out.get_list("X-Tag") == ["1", "2"]
    assert out["Accept"] == "*/*"


class Counted(dict):
    """A mapping that counts the lookups of its values."""

    looked_up = 0

    def __getitem__(self, name):
        self.looked_up += 1
        return super().__getitem__(name)


def test_value_of_is_get_without_looking_up_an_absent_header():
    incoming = headers(("X-Request-ID", "abc"), ("Cookie", "a=1"), ("Cookie", "b=2"))
    assert value_of(incoming, "x-request-id") == "abc"
    assert value_of(incoming, "Cookie") == incoming.get("Cookie") == "a=1,b=2"
    assert value_of(incoming, "Origin") is None
    counted = Counted({"Origin": "x"})
    assert value_of(counted, "Host") is None
    assert counted.looked_up == 0
    assert value_of(counted, "Origin") == "x"
    assert counted.looked_up == 1
