"""What a request asks of a token quota: its prompt's estimate, erring high however the
text is dressed; its output, capped in its API's own terms; a stream's usage event."""

import json

import pytest

from tornado_ollama_proxy.quota_ask import EVENT_HELD_MAX, UsageStrip, ask_for_usage, capped, read_ask


@pytest.mark.parametrize(
    "path, data, prompt, output",
    [
        ("/api/generate", {"prompt": "x" * 30}, 10 + 16, None),
        ("/api/generate", {"prompt": "x" * 30, "options": {"num_predict": 7}}, 26, 7),
        ("/api/generate", {"prompt": "x", "options": {"num_predict": -1}}, 16, None),  # Ollama's "unbounded"
        ("/api/generate", {"prompt": "x", "options": {"num_predict": True}}, 16, None),
        ("/api/generate", {"prompt": "x", "options": "odd"}, 16, None),
        ("/api/generate", {"prompt": "", "images": ["AAAA", "BBBB"]}, 16 + 2000, None),
        ("/api/generate", {"prompt": "", "context": [101, 102, 103, 104, 105]}, 5 + 16, None),  # token ids
        ("/api/generate", {"model": "m" * 300, "keep_alive": "5m", "stream": True, "prompt": "abc"}, 1 + 16, None),
        (
            "/api/chat",
            {"raw": True, "format": None, "tools": [{"function": {"name": "get_weather"}}]},
            23 // 3 + 16,
            None,
        ),
        (
            "/api/chat",
            {"messages": [{"content": "x" * 6}, {"content": "y" * 6, "images": ["A"]}, "odd"]},
            15 // 3 + 3 * 4 + 16 + 1000,
            None,
        ),
        ("/api/chat", {"messages": [{"content": "short", "CONTENT": "x" * 300}]}, 101 + 4 + 16, None),  # Go reads both
        ("/v1/chat/completions", {"messages": [{"content": "x" * 9}], "max_tokens": 5}, 3 + 4 + 16, 5),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 5, "max_completion_tokens": 3}, 16, 3),
        ("/v1/chat/completions", {"options": {"num_predict": 5}}, 16, None),  # not /v1's: Ollama ignores it
        (
            "/v1/chat/completions",
            {"messages": [{"content": [{"type": "image_url"}, {"type": "text", "text": "xyz"}]}]},
            15 // 3 + 4 + 16 + 1000,  # the text part's names and values
            None,
        ),
        ("/v1/completions", {"prompt": "x" * 3, "suffix": "y" * 3, "max_tokens": 9}, 2 + 16, 9),
        (
            "/v1/responses",
            {"input": [{"content": [{"type": "input_image"}, 5]}, "xyz"], "max_output_tokens": 4},
            1 + 1 + 16 + 1000,  # the 5 and the "xyz"
            4,
        ),
        (
            "/v1/messages",
            {"system": "x" * 3, "messages": [{"content": [{"type": "image"}]}], "max_tokens": 8},
            1 + 4 + 16 + 1000,
            8,
        ),
        ("/api/embed", {"input": ["x" * 30, "y" * 30]}, 36, None),  # nothing to cap
        # What Ollama reads as text is weighed as text, however it is dressed:
        ("/api/chat", {"messages": [{"type": "image_url", "content": "x" * 300}]}, 309 // 3 + 4 + 16, None),
        ("/api/chat", {"tools": [{"parameters": {"options": {"description": "x" * 300}}}]}, 328 // 3 + 16, None),
        ("/api/generate", {"prompt": "\U0001f600" * 30}, 120 // 3 + 16, None),  # 4 bytes each
        ("/v1/embeddings", {"input": "x" * 3, "max_tokens": 9}, 1 + 16, None),
    ],
)
def test_a_request_is_reckoned_by_its_prompt_erring_high_and_the_output_its_api_asks(path, data, prompt, output):
    ask = read_ask(path, json.dumps(data).encode(), image_tokens=1000)
    assert (ask.prompt, ask.output, ask.data) == (prompt, output, data)


def test_a_body_that_is_no_json_object_is_reckoned_by_its_size():
    assert read_ask("/api/generate", b"[" * 300, 1000) == read_ask("/api/chat", b"x" * 300, 5)
    assert (read_ask("/api/chat", b"x" * 300, 5).prompt, read_ask("/api/chat", None, 5).prompt) == (116, 16)


def test_the_output_is_capped_in_each_apis_own_terms():
    native = {"prompt": "x", "options": {"temperature": 0, "num_predict": 900}}
    assert capped("/api/generate", native, 40) == {"prompt": "x", "options": {"temperature": 0, "num_predict": 40}}
    assert capped("/api/chat", {"options": "odd"}, 40) == {"options": {"num_predict": 40}}
    assert capped("/v1/chat/completions", {"max_completion_tokens": 900}, 40) == {
        "max_tokens": 40,
        "max_completion_tokens": 40,
    }
    assert capped("/v1/responses", {}, 40) == {"max_output_tokens": 40}
    assert capped("/v1/messages", {"max_tokens": 900}, 40) == {"max_tokens": 40}
    # Ollama's decoder takes any letter case for a field, and the last one it meets.
    sneaky = {"max_tokens": 5, "MAX_TOKENS": 99999, "Max_Completion_Tokens": 7, "max_token\u017f": 9, "Model": "x"}
    assert capped("/v1/chat/completions", sneaky, 40) == {"max_tokens": 40, "Model": "x"}
    sneaky = {"options": {"num_predict": 3, "NUM_PREDICT": 9, "top_k": 1}, "OPTIONS": {}, "option\u017f": {}}
    assert capped("/api/chat", sneaky, 40) == {"options": {"num_predict": 40, "top_k": 1}}


def test_a_stream_is_asked_for_its_usage_and_that_event_alone_is_taken_out():
    assert ask_for_usage({"stream": True, "stream_options": "odd", "Stream_Options": {}}) == {
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert ask_for_usage({"stream": True, "stream_options": {"x": 1}})["stream_options"] == {
        "x": 1,
        "include_usage": True,
    }
    assert ask_for_usage({"stream": True, "stream_options": {"include_usage": True}}) is None  # its own
    assert ask_for_usage({"stream": False}) is None and ask_for_usage({}) is None


CONTENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_the_usage_event_is_taken_out_of_a_stream_as_ollama_writes_it():
    assert UsageStrip()(CONTENT + USAGE + DONE) == CONTENT + DONE
    strip = UsageStrip()
    assert [strip(piece) for piece in (CONTENT, USAGE, DONE)] == [CONTENT, b"", DONE]


def test_a_stream_split_anywhere_loses_nothing_but_the_usage_event():
    stream = CONTENT + CONTENT + USAGE + DONE
    for first in range(1, len(stream)):
        for second in range(first + 1, len(stream), 7):
            strip = UsageStrip()
            out = [strip(piece) for piece in (stream[:first], stream[first:second], stream[second:])]
            assert b"".join(out) == CONTENT + CONTENT + DONE, (first, second)
            # Nothing waits longer than it must: the events the first piece ends go at once.
            whole = stream[: stream.rfind(b"\n\n", 0, first) + 2] if b"\n\n" in stream[:first] else b""
            assert out[0] == whole.replace(USAGE, b""), (first, second)
    assert strip.held == b""


def test_what_a_stream_ends_inside_goes_on_unless_it_is_the_usage_event():
    strip = UsageStrip()
    assert strip(CONTENT + DONE[:-2]) == CONTENT and strip.rest() == DONE[:-2]
    assert strip.rest() == b""  # once
    for cut in (1, 2, 30):  # the usage event without its blank line, or cut short
        strip = UsageStrip()
        assert strip(CONTENT + USAGE[:-cut]) == CONTENT and strip.rest() == b""
    strip = UsageStrip()
    content = CONTENT.rstrip(b"\n")  # its lines, held whole: they go on, the usage line does not
    assert strip(content + b"\n" + USAGE[:-1] + DONE[:-1]) == b"" and strip.rest() == content + b"\n" + DONE[:-1]
    strip = UsageStrip()
    held = b"data: [DONE]\r\n: comment\r\n"
    assert strip(held + b'data: {"choices": [1]') == b"" and strip.rest() == held


def test_what_is_no_event_or_too_long_for_one_is_not_held():
    strip = UsageStrip()
    assert strip(b'{"error": "not found"}') == b'{"error": "not found"}'  # not an event stream
    long = b"data: " + b"x" * EVENT_HELD_MAX
    assert strip(long) == long and strip(b"\n\n" + DONE) == b"\n\n" + DONE
