from tornado.httputil import HTTPHeaders

from tornado_ollama_proxy.headers import end_to_end, upstream_request_headers


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
