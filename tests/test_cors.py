import pytest

from tornado_ollama_proxy.cors import (
    allowed_origin,
    is_preflight,
    preflight_headers,
    response_headers,
)

APP = "https://chat.example.com"


@pytest.mark.parametrize(
    "origin, allowed, granted",
    [
        (None, ["*"], None),
        (APP, [], None),
        (APP, ["*"], APP),
        (APP, [APP], APP),
        ("HTTPS://CHAT.example.com", [APP], "HTTPS://CHAT.example.com"),
        ("https://evil.example", [APP], None),
    ],
)
def test_only_configured_origins_are_granted(origin, allowed, granted):
    assert allowed_origin(origin, allowed) == granted


def test_a_preflight_is_known_by_its_origin_and_request_method_headers_whatever_its_method():
    assert is_preflight({"Origin": APP, "Access-Control-Request-Method": "POST"})
    assert not is_preflight({"Access-Control-Request-Method": "POST"})
    assert not is_preflight({"Origin": APP})


def test_preflight_answer_grants_the_methods_and_the_requested_headers():
    assert preflight_headers(APP, {"Access-Control-Request-Headers": "content-type, authorization"}) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "content-type, authorization",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }
    assert "Access-Control-Allow-Headers" not in preflight_headers(APP, {})


def test_actual_answers_name_the_origin_and_let_it_read_the_rate_limits():
    assert response_headers(APP) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Expose-Headers": "Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset,"
        " x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests,"
        " x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens",
        "Vary": "Origin",
    }
