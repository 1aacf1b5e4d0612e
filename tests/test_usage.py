"""Reading what a request asks for and what its answer reports."""

import json

import pytest

from tornado_ollama_proxy.usage import (
    REQUEST_COPY_LIMIT,
    UNKNOWN,
    Counters,
    RequestInfo,
    answer_format,
    read_counters,
    read_request,
)


@pytest.mark.parametrize(
    "body, info",
    [
        (b'{"model": "llama3.2", "stream": false}', RequestInfo("llama3.2", False)),
        (b'{"model": "llama3.2"}', RequestInfo("llama3.2", None)),
        (b'{"name": "llama3.2", "stream": true}', RequestInfo("llama3.2", True)),  # /api/pull's older spelling
        (b'{"model": 5, "stream": "yes"}', RequestInfo(None, None)),
        (b"[1, 2]", UNKNOWN),
        (b"not json", UNKNOWN),
        (b"", UNKNOWN),
        (None, UNKNOWN),
        (b'{"model": "m", "pad": "' + b"x" * REQUEST_COPY_LIMIT + b'"}', UNKNOWN),
    ],
)
def test_a_request_body_names_model_and_stream(body, info):
    assert read_request(body) == info


@pytest.mark.parametrize(
    "answer, stream, expected",
    [
        ("ndjson", None, "ndjson"),  # Ollama's /api calls stream unless told not to
        ("ndjson", True, "ndjson"),
        ("ndjson", False, "json"),
        ("sse", None, "json"),  # the /v1 calls stream only when told to
        ("sse", False, "json"),
        ("sse", True, "sse"),
        ("json", None, "json"),
        ("json", True, "json"),
        (None, True, None),
    ],
)
def test_the_answer_format_follows_the_route_and_the_stream_flag(answer, stream, expected):
    assert answer_format(answer, stream) == expected


FINAL_LINE = {
    "model": "llama3.2",
    "message": {"role": "assistant", "content": ""},
    "done": True,
    "total_duration": 5_000_000_000,
    "load_duration": 1_250_000_000,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 100_000_000,
    "eval_count": 290,
    "eval_duration": 2_000_000_000,
}


def test_counters_of_an_ollama_stream_come_from_its_last_line():
    lines = [json.dumps({"message": {"content": 'say "eval_count": 9'}, "done": False}) for _ in range(3)]
    tail = ("\n".join([*lines, json.dumps(FINAL_LINE)]) + "\n").encode()
    assert read_counters(tail) == Counters(prompt_tokens=26, completion_tokens=290, tokens_per_s=145.0, load_ms=1250.0)


def test_counters_of_an_openai_answer_come_from_usage():
    whole = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}
    assert read_counters(json.dumps(whole).encode()) == Counters(prompt_tokens=12, completion_tokens=7)
    events = b'data: {"choices": []}\n\ndata: ' + json.dumps(whole).encode() + b"\n\ndata: [DONE]\n\n"
    assert read_counters(events) == Counters(prompt_tokens=12, completion_tokens=7)


def test_an_embedding_reports_prompt_tokens_only():
    answer = {"embeddings": [[0.1] * 8], "total_duration": 1, "load_duration": 2_000_000, "prompt_eval_count": 8}
    assert read_counters(json.dumps(answer).encode()) == Counters(prompt_tokens=8, load_ms=2.0)


def test_an_answer_without_counters_reports_none():
    assert read_counters(b'{"embedding": [0.1, 0.2]}') == Counters()
    assert read_counters(b'{"eval_count": 0, "eval_duration": 0}') == Counters(completion_tokens=0)
