"""OpenAI's rate-limit headers: how a wait is written, and a trio per kind of limit."""

import pytest

from tornado_ollama_proxy.limit_headers import duration, openai_headers


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0.25, "250ms"),
        (0.0004, "0ms"),
        (-0.3, "0ms"),
        (1, "1s"),
        (6.2, "7s"),
        (60, "1m0s"),
        (90, "1m30s"),
        (3661, "1h1m1s"),
        (86400, "24h0m0s"),
    ],
)
def test_waits_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_a_trio_names_its_kind_and_never_tells_less_than_nothing_left():
    assert openai_headers("requests", 60, -2, 0.25) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "250ms",
    }
