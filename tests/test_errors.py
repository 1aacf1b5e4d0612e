"""The table of error shapes: every error the proxy writes, as its client reads it."""

import json

import ollama
import openai
import pytest

from tornado_ollama_proxy.errors import error_answer, error_message, in_band_error, shape_for

from .helpers import unused_url


@pytest.mark.parametrize(
    "path, shape",
    [("/api/chat", "ollama"), ("/v1/chat/completions", "openai"), ("/%761/models", "openai"), ("/v1", "ollama")],
)
def test_the_shape_follows_the_path(path, shape):
    assert shape_for(path) == shape


def test_with_a_status_api_errors_are_ollamas_and_v1_errors_openais():
    assert json.loads(error_answer("/api/chat", 502, "down")) == {"error": "down"}
    assert json.loads(error_answer("/_proxy/nothing", 404, "no")) == {"error": "no"}
    assert json.loads(error_answer("/v1/chat/completions", 429, "slow down")) == {
        "error": {"message": "slow down", "type": "invalid_request_error", "param": None, "code": 429}
    }
    assert json.loads(error_answer("/v1/models", 503, "busy"))["error"]["type"] == "api_error"


@pytest.mark.parametrize(
    "answer_format, path, expected",
    [
        ("ndjson", "/api/chat", b'{"error": "gone"}\n'),
        ("json", "/api/chat", b'{"error": "gone"}\n'),
        ("ndjson", "/api/pull", b'{"error": "gone"}\n'),
        ("json", "/api/pull", b'{"status": "error: gone", "error": "gone"}\n'),
        ("json", "/api/create", b'{"status": "error: gone", "error": "gone"}\n'),
        ("json", "/api/push", b'{"status": "error: gone", "error": "gone"}\n'),
        (
            "sse",
            "/v1/chat/completions",
            b'data: {"error": {"message": "gone", "type": "api_error", "param": null, "code": 504}}\n\n',
        ),
        (
            "json",
            "/v1/chat/completions",
            b'{"error": {"message": "gone", "type": "api_error", "param": null, "code": 504}}\n',
        ),
    ],
)
def test_in_band_errors_take_the_format_the_client_reads(answer_format, path, expected):
    assert in_band_error(answer_format, path, 504, "gone") == expected


def test_an_upstream_error_answer_is_told_by_its_message():
    assert error_message(b'{"error": "model \'x\' not found"}', 404) == "model 'x' not found"
    assert error_message(b'{"error": {"message": "bad", "type": "x"}}', 400) == "bad"
    assert error_message(b"404 page not found", 404) == "404 page not found"
    assert error_message(b"", 500) == "the upstream answered 500"
    assert error_message(b'{"detail": 1}', 500) == '{"detail": 1}'
    assert error_message(json.dumps({"error": "x" * 5000}).encode(), 500) == "x" * 1000


async def test_the_proxys_own_errors_reach_both_sdks_as_their_errors(make_proxy):
    down = unused_url()
    proxy = make_proxy(upstream=down)
    message = "upstream 'default' refused the connection"
    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0) as sdk:
        with pytest.raises(openai.InternalServerError) as raised:
            await sdk.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 502
    assert raised.value.body == {"message": message, "type": "api_error", "param": None, "code": 502}
    client = ollama.AsyncClient(host=proxy)
    with pytest.raises(ollama.ResponseError) as refused:
        await client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert (refused.value.status_code, refused.value.error) == (502, message)
    await client.close()
