"""Reading what a request asks for and what its answer reports."""

import asyncio
import contextlib
import hashlib
import itertools
import json
import re
from collections.abc import Callable

import ollama
import openai
import pytest

from tornado_ollama_proxy.routes import parse_routes
from tornado_ollama_proxy.usage import (
    ANSWER_TAIL,
    OTHER,
    REQUEST_COPY_LIMIT,
    START_LIMIT,
    UNKNOWN,
    AnswerEnds,
    Asks,
    Counters,
    ModelLabels,
    RequestInfo,
    answer_format,
    prompt_at_start,
    read_counters,
    read_request,
)

from .helpers import (
    ScriptedUpstream,
    open_raw,
    read_chunked_to_end,
    read_log,
    read_response,
    scrape,
    sse_events,
    tokens_reported,
    value,
)

MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]


@pytest.mark.parametrize(
    "body, info",
    [
        (b'{"model": "llama3.2", "stream": false}', RequestInfo("llama3.2", False, asks=Asks())),
        (b'{"model": "llama3.2"}', RequestInfo("llama3.2", None, asks=Asks())),
        (b'{"name": "llama3.2", "stream": true}', RequestInfo("llama3.2", True, asks=Asks())),  # /api/pull's
        (b'{"model": 5, "stream": "yes"}', RequestInfo(None, None, asks=Asks())),
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


def test_counters_of_the_responses_and_messages_apis_come_from_their_usage():
    usage = {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 19,
    }
    whole = {"output": [], "usage": usage, "max_output_tokens": 40}  # the limit asked for is no count
    assert read_counters(json.dumps(whole).encode()) == Counters(prompt_tokens=12, completion_tokens=7)
    completed = {"response": whole, "sequence_number": 9, "type": "response.completed"}
    events = b"event: response.output_item.done\ndata: {}\n\nevent: response.completed\ndata: %s\n\n"
    assert read_counters(events % json.dumps(completed).encode()) == Counters(prompt_tokens=12, completion_tokens=7)

    tool_use = {"type": "tool_use", "input": {"input_tokens": 1, "output_tokens": 2}}  # the model's, not a count
    message = {"content": [tool_use], "stop_reason": "tool_use", "usage": {"input_tokens": 12, "output_tokens": 7}}
    assert read_counters(json.dumps(message).encode()) == Counters(prompt_tokens=12, completion_tokens=7)
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": message["usage"]}
    events = b'event: message_delta\ndata: %s\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert read_counters(events % json.dumps(delta).encode()) == Counters(prompt_tokens=12, completion_tokens=7)


def test_names_a_client_put_in_an_answer_before_its_counts_count_for_nothing():
    # Ollama writes a message (and a tool call's arguments, the model's own JSON) before its counts.
    calls = [{"function": {"name": "f", "arguments": {"input_tokens": 1, "completion_tokens": 2}}}]
    final = {"message": {"role": "assistant", "content": "", "tool_calls": calls}, "prompt_eval_count": 26}
    assert read_counters(json.dumps({**final, "eval_count": 290}).encode()) == Counters(26, 290)
    # The Responses API echoes the request's tools, with their parameters as sent, before its usage.
    tools = [{"type": "function", "name": "f", "parameters": {"prompt_eval_count": 0, "eval_count": 0}}]
    response = {"tools": tools, "usage": {"input_tokens": 12, "output_tokens": 7, "total_tokens": 19}}
    completed = {"type": "response.completed", "response": response}
    events = b"event: response.completed\ndata: %s\n\n" % json.dumps(completed).encode()
    assert read_counters(events) == read_counters(json.dumps(response).encode()) == Counters(12, 7)


def test_an_embedding_reports_prompt_tokens_only():
    answer = {"embeddings": [[0.1] * 8], "total_duration": 1, "load_duration": 2_000_000, "prompt_eval_count": 8}
    assert read_counters(json.dumps(answer).encode()) == Counters(prompt_tokens=8, load_ms=2.0)


def test_an_answer_without_counters_reports_none():
    assert read_counters(b'{"embedding": [0.1, 0.2]}') == Counters()
    assert read_counters(b'{"eval_count": 0, "eval_duration": 0}') == Counters(completion_tokens=0)


def test_the_tail_of_an_answer_is_kept_without_the_rest():
    ends = AnswerEnds("json")
    pieces = [bytes([65 + i % 26]) * 1000 for i in range(1000)]  # a 1 MB document in 1 kB pieces
    for piece in pieces:
        ends.add(piece)
    assert ends.tail() == b"".join(pieces)[-ANSWER_TAIL:]
    assert ends.size < ANSWER_TAIL + 1000  # what is held: the tail and at most one piece more
    small = AnswerEnds()
    small.add(b'{"eval_count": 3}')
    assert small.tail() == b'{"eval_count": 3}'


def test_a_stream_keeps_only_its_last_line():
    ends = AnswerEnds("ndjson")
    for i in range(10_000):
        ends.add(b'{"response": "tok%d", "done": false}\n' % i)
    ends.add(b'{"done": true, "eval_')  # the last line, in pieces
    ends.add(b'count": 9}\n')
    assert ends.tail() == b'{"done": true, "eval_count": 9}\n'
    assert ends.counters().completion_tokens == 9
    pieces = AnswerEnds("ndjson")
    pieces.add(b'{"a": 1}\n{"b": 2}\n')  # several lines in one piece stay together
    assert pieces.tail() == b'{"a": 1}\n{"b": 2}\n'


def test_the_counters_are_read_once_until_more_of_the_answer_comes():
    ends = AnswerEnds("ndjson")
    ends.add(b'{"done": true, "eval_count": 9}\n')
    first = ends.counters()
    assert ends.counters() is first  # the queue and the record both ask: one reading
    ends.add(b'{"done": true, "eval_count": 10}\n')
    assert ends.counters().completion_tokens == 10
    whole = AnswerEnds("json", start=True)
    whole.add(b'{"eval_count": ')  # no event ends: all of it is the start so far
    assert whole.counters() == Counters()
    whole.add(b'3, "prompt_eval_count": 2}')
    assert whole.counters() == Counters(prompt_tokens=2, completion_tokens=3) == whole.counters()


def test_an_event_stream_keeps_its_last_two_events():
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n'
    ends = AnswerEnds("sse")
    for _ in range(1000):
        ends.add(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n')
    ends.add(usage[:20])  # an event in two pieces
    ends.add(usage[20:])
    ends.add(b"data: [DONE]\n\n")
    assert ends.tail() == usage + b"data: [DONE]\n\n"
    assert ends.counters() == Counters(prompt_tokens=4, completion_tokens=2)


def message_stream(start_usage: dict, end_usage: dict, tokens: int = 3) -> bytes:
    """A stream of Anthropic's Messages API: message_start with `start_usage`, a text of
    `tokens` deltas, message_delta with `end_usage`, message_stop."""

    def event(data: dict) -> bytes:
        return b"event: %s\ndata: %s\n\n" % (data["type"].encode(), json.dumps(data, separators=(",", ":")).encode())

    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "usage": start_usage}
    text = {"type": "text", "text": ""}
    return b"".join(
        [
            event({"type": "message_start", "message": message}),
            event({"type": "content_block_start", "index": 0, "content_block": text}),
            *(
                event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"t{i} "}})
                for i in range(tokens)
            ),
            event({"type": "content_block_stop", "index": 0}),
            event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": end_usage}),
            event({"type": "message_stop"}),
        ]
    )


def in_pieces(stream: bytes, size: int) -> list[bytes]:
    return [stream[offset : offset + size] for offset in range(0, len(stream), size)]


@pytest.mark.parametrize(
    "start_usage, end_usage, counters",
    [
        # Anthropic's own: the prompt's count at the start only.
        ({"input_tokens": 12, "output_tokens": 1}, {"output_tokens": 7}, Counters(12, 7)),
        # Ollama's since 0.15.5: an estimate at the start, the model's count at the end.
        ({"input_tokens": 9, "output_tokens": 0}, {"input_tokens": 12, "output_tokens": 7}, Counters(12, 7)),
        # Ollama's before: at the start the first chunk's count, 0 (not counted yet), and none at the end.
        ({"input_tokens": 0, "output_tokens": 0}, {"output_tokens": 7}, Counters(completion_tokens=7)),
    ],
)
def test_a_prompts_count_only_the_start_says_is_read_there(start_usage, end_usage, counters):
    ends = AnswerEnds("sse", start=True)
    for piece in in_pieces(message_stream(start_usage, end_usage), 5):
        ends.add(piece)
    assert ends.counters() == counters


def test_a_start_never_says_the_output_of_an_answer_cut_short():
    stream = message_stream({"input_tokens": 12, "output_tokens": 1}, {"output_tokens": 7})
    ends = AnswerEnds("sse", start=True)
    ends.add(stream[: stream.index(b"event: content_block_stop")])
    assert ends.counters() == Counters(prompt_tokens=12)  # not the 1 generated by message_start


def test_the_first_event_is_kept_apart_only_when_asked():
    stream = message_stream({"input_tokens": 12, "output_tokens": 1}, {"output_tokens": 700}, tokens=700)
    first = stream[: stream.index(b"\n\n") + 2]
    ends, without, whole = AnswerEnds("sse", start=True), AnswerEnds("sse"), AnswerEnds("sse", start=True)
    for piece in in_pieces(stream, 7):
        ends.add(piece)
        without.add(piece)
    whole.add(stream)  # in one piece, longer than START_LIMIT
    for kept in (ends, whole):
        assert kept.start == first
        assert kept.counters() == Counters(prompt_tokens=12, completion_tokens=700)
    assert without.start == b""
    assert without.counters() == Counters(completion_tokens=700)

    short = AnswerEnds("sse", start=True)
    short.add(stream[: len(first) + 10])  # its first event and a little, all in one piece
    assert short.start == first
    assert short.tail() == stream[len(first) : len(first) + 10]  # never the first event


def test_an_answer_without_an_early_event_boundary_is_all_tail():
    message = {"content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": 12, "output_tokens": 7}}
    small = json.dumps(message).encode()  # a whole JSON answer, shorter than START_LIMIT
    large = json.dumps({**message, "content": [{"type": "text", "text": "x" * START_LIMIT}]}).encode()
    for answer in (small, large):
        ends = AnswerEnds("json", start=True)
        for piece in in_pieces(answer, 100):
            ends.add(piece)
        assert ends.start == b""
        assert ends.counters() == Counters(prompt_tokens=12, completion_tokens=7)
    assert ends.tail() == large


@pytest.mark.parametrize(
    "target, kept",
    [
        ("/v1/messages", True),
        ("/v1/%6Dessages?beta=true", True),  # the path as Ollama's router reads it
        ("/v1/messages/count_tokens", False),
        ("/v1/responses", False),
        ("/api/chat", False),
    ],
)
def test_the_path_that_goes_upstream_says_whether_the_start_is_kept(target, kept):
    assert prompt_at_start(target) is kept


def test_model_labels_are_bounded_and_only_for_answered_models():
    labels = ModelLabels(2)
    assert labels.label("a", answered=False) == OTHER  # Ollama did not know it: never a label
    assert labels.label(None, answered=True) == OTHER
    assert labels.label("not a name", answered=True) == OTHER
    assert [labels.label(m, answered=True) for m in ("a", "b", "c", "a")] == ["a:latest", "b:latest", OTHER, "a:latest"]
    assert labels.label("b", answered=False) == "b:latest"  # a known label counts its failures too


def test_one_model_spelled_many_ways_is_one_label():
    labels = ModelLabels(2)
    spellings = ("llama3.2", "LLaMA3.2:latest", "library/llama3.2", "registry.ollama.ai/library/llama3.2:latest")
    assert {labels.label(name, answered=True) for name in spellings} == {"llama3.2:latest"}
    assert labels.label("other-model", answered=True) == "other-model:latest"  # room was left for it


# -- through a GET-converting front, with real clients -------------------------------------


async def test_records_and_metrics_carry_what_ollama_reported(make_proxy, nginx, http, log_lines):
    proxy = make_proxy()
    front = nginx(proxy, as_get=True)
    client = ollama.AsyncClient(host=front)
    sdk = openai.AsyncOpenAI(base_url=front + "/v1", api_key="unused", max_retries=0)
    before = await scrape(http, proxy)
    streamed = [part async for part in await client.chat(model="llama3.2", messages=MESSAGES, stream=True)]
    whole = await client.chat(model="llama3.2", messages=MESSAGES, options={"num_predict": 5})
    embedded = await client.embed(model="llama3.2", input=["one two", "three"])
    completion = await sdk.chat.completions.create(model="llama3.2", messages=MESSAGES)
    async with await sdk.chat.completions.create(
        model="llama3.2", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as events:
        usage = [chunk.usage async for chunk in events if chunk.usage is not None]
    response = await sdk.responses.create(model="llama3.2", input=MESSAGES, max_output_tokens=4)
    async with await sdk.responses.create(model="llama3.2", input="why is the sky blue?", stream=True) as events:
        completed = [event.response async for event in events if event.type == "response.completed"]
    await client.close()
    await sdk.close()
    after = await scrape(http, proxy)

    records = {(r["route"], r["stream"]): r for r in log_lines() if r["message"] == "request"}
    last = streamed[-1]
    expected = {
        ("/api/chat", True): (last.prompt_eval_count, last.eval_count, last.eval_duration, True),
        ("/api/chat", False): (whole.prompt_eval_count, whole.eval_count, whole.eval_duration, False),
        ("/api/embed", None): (embedded.prompt_eval_count, None, None, False),
        ("/v1/chat/completions", None): (
            completion.usage.prompt_tokens,
            completion.usage.completion_tokens,
            None,
            False,
        ),
        ("/v1/chat/completions", True): (usage[0].prompt_tokens, usage[0].completion_tokens, None, True),
        ("/v1/responses", None): (response.usage.input_tokens, response.usage.output_tokens, None, False),
        ("/v1/responses", True): (completed[0].usage.input_tokens, completed[0].usage.output_tokens, None, True),
    }
    for key, (prompt, completion_tokens, duration, streamed_generation) in expected.items():
        record = records[key]
        assert record["model"] == "llama3.2"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion_tokens), key
        speed = round(completion_tokens / duration * 1e9, 2) if duration else None
        assert record["tokens_per_s"] == speed
        assert (record["ttft_ms"] is not None) is streamed_generation
        assert record["ttft_ms"] is None or 0 < record["ttft_ms"] <= record["duration_ms"]
    assert records[("/api/chat", True)]["load_ms"] == last.load_duration / 1e6 == 5.0

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    prompts = sum(prompt for prompt, *_ in expected.values())
    completions = sum(c or 0 for _, c, *_ in expected.values())
    assert moved("ollama_proxy_tokens_total", model="llama3.2:latest", kind="prompt") == prompts
    assert moved("ollama_proxy_tokens_total", model="llama3.2:latest", kind="completion") == completions
    for route, count in (("/api/chat", 2), ("/api/embed", 1), ("/v1/chat/completions", 2), ("/v1/responses", 2)):
        assert moved("ollama_proxy_generations_total", model="llama3.2:latest", route=route, outcome="ok") == count
    assert moved("ollama_proxy_time_to_first_token_seconds_count", model="llama3.2:latest") == 3
    assert moved("ollama_proxy_tokens_per_second_count", model="llama3.2:latest") == 2
    assert moved("ollama_proxy_tokens_per_second_sum", model="llama3.2:latest") == 50 + 50  # the stand-in's speed
    assert moved("ollama_proxy_model_load_seconds_count", model="llama3.2:latest") == 3  # /v1 does not report loads


ASKED = {
    "/v1/responses": {"instructions": "be brief", "input": [{"role": "user", "content": "why is the sky blue?"}]},
    "/v1/messages": {"system": "be brief", "messages": MESSAGES, "max_tokens": 5},
}


async def test_the_responses_and_messages_apis_report_their_tokens(make_proxy, http, log_lines):
    proxy = make_proxy()
    answers = {}
    for path, stream in itertools.product(ASKED, (False, True)):
        answer = await http.post(proxy + path, json={"model": "llama3.2", "stream": stream, **ASKED[path]})
        assert answer.status_code == 200
        answers[path, stream] = tokens_reported(path, answer.content, stream)
        if path == "/v1/messages" and stream:
            [(_, start)] = sse_events(answer.content)[:1]
            assert start["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0}  # characters / 4
            assert answers[path, stream] == (8, 5)  # what the model counted: a word each, and one
    samples = await scrape(http, proxy)

    records = [record for record in log_lines() if record["message"] == "request"]
    assert {(r["route"], r["stream"]): (r["prompt_tokens"], r["completion_tokens"]) for r in records} == answers
    for path in ASKED:  # generations, as the fair queue and the metrics count them
        assert value(samples, "ollama_proxy_generations_total", model="llama3.2:latest", route=path, outcome="ok") == 2
    prompts, outputs = (sum(counts) for counts in zip(*answers.values(), strict=True))
    assert value(samples, "ollama_proxy_tokens_total", model="llama3.2:latest", kind="prompt") == prompts
    assert value(samples, "ollama_proxy_tokens_total", model="llama3.2:latest", kind="completion") == outputs


async def read_piece_by_piece(http, url: str, asked: dict, sent: Callable[[], int], release: Callable[[], None]):
    """Stream an answer whose upstream sends each piece once `release`d, released again
    once all it has `sent` so far has come through: each piece reaches the proxy on its
    own, however small."""
    release()
    body = b""
    async with http.stream("POST", url, json=asked) as answer:
        async for data in answer.aiter_raw():
            body += data
            if len(body) == sent():
                release()
    return body


async def test_streams_split_at_awkward_places_are_counted_all_the_same(make_proxy, fake, http, log_lines):
    proxy = make_proxy()
    fake.piece_size = 7  # through event boundaries, names and numbers
    received = {}
    for path in ASKED:
        fake.sent, fake.lockstep = [], asyncio.Queue()
        body = await read_piece_by_piece(
            http,
            proxy + path,
            {"model": "llama3.2", "stream": True, **ASKED[path]},
            lambda: sum(len(piece) for _, piece in fake.sent),
            lambda: fake.lockstep.put_nowait(True),
        )
        pieces = [piece for _, piece in fake.sent]
        assert any(piece.endswith(b"\n") and not piece.endswith(b"\n\n") for piece in pieces)
        received[path] = (tokens_reported(path, body, stream=True), len(pieces))

    records = {record["route"]: record for record in log_lines() if record["message"] == "request"}
    for path, (counts, pieces) in received.items():
        record = records[path]
        assert record["chunks"] == pieces  # each relayed on its own
        assert (record["prompt_tokens"], record["completion_tokens"]) == counts


EVENTS_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class PiecemealUpstream(ScriptedUpstream):
    """An upstream that answers every request with an event stream of `pieces`, each sent
    only once the test releases it (`released`); it notes the path of each request."""

    def __init__(self, pieces: list[bytes]):
        super().__init__(self._answer)
        self.pieces = pieces
        self.released: asyncio.Queue[None] = asyncio.Queue()
        self.sent = 0  # bytes of the answer under way
        self.paths: list[bytes] = []

    async def _answer(self, reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.paths.append(head.split(b" ")[1])
                await reader.readexactly(int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1]))
                writer.write(EVENTS_HEAD)
                self.sent = 0
                for piece in self.pieces:
                    await self.released.get()
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.sent += len(piece)
                writer.write(b"0\r\n\r\n")


async def test_a_prompts_count_said_only_at_the_start_is_kept_by_the_path_that_goes_upstream(
    make_proxy, http, log_lines
):
    # Anthropic's API says the prompt's count only in message_start, which a long answer's
    # tail does not hold: in awkward pieces around its start and its end.
    stream = message_stream({"input_tokens": 12, "output_tokens": 1}, {"output_tokens": 700}, tokens=700)
    assert len(stream) > ANSWER_TAIL + 1000
    upstream = PiecemealUpstream(
        in_pieces(stream[:500], 5) + in_pieces(stream[500:-500], 4096) + in_pieces(stream[-500:], 5)
    )
    alias = {"path": "/anthropic/v1/messages", "upstream_path": "/v1/messages", "methods": ["POST"], "tokens": True}
    proxy = make_proxy(upstream=await upstream.start(), routes=parse_routes([{**alias, "answer": "sse"}]))
    asked = {"model": "llama3.2", "stream": True, "messages": MESSAGES, "max_tokens": 700}
    for path in ("/anthropic/v1/messages", "/v1/chat/completions"):
        body = await read_piece_by_piece(
            http, proxy + path, asked, lambda: upstream.sent, lambda: upstream.released.put_nowait(None)
        )
        assert body == stream
    assert upstream.paths == [b"/v1/messages", b"/v1/chat/completions"]
    await upstream.stop()

    records = {record["route"]: record for record in log_lines() if record["message"] == "request"}
    kept, other = records["/anthropic/v1/messages"], records["/v1/chat/completions"]
    assert kept["chunks"] == len(upstream.pieces)
    assert (kept["prompt_tokens"], kept["completion_tokens"]) == (12, 700)
    assert (other["prompt_tokens"], other["completion_tokens"]) == (None, 700)  # its API says it at the end


async def test_ollama_before_0_15_5_says_no_prompts_count_in_a_messages_stream(make_proxy, fake, http, log_lines):
    fake.version = "0.15.4"
    proxy = make_proxy()
    asked = {"model": "llama3.2", "stream": True, **ASKED["/v1/messages"]}
    answer = await http.post(proxy + "/v1/messages", json=asked)
    [(_, start)] = sse_events(answer.content)[:1]
    assert start["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}  # its first chunk's count
    assert "input_tokens" not in sse_events(answer.content)[-2][1]["usage"]
    [record] = [record for record in log_lines() if record["message"] == "request"]
    assert (record["prompt_tokens"], record["completion_tokens"]) == (None, 5)


async def test_unknown_models_never_become_labels(make_proxy, http, fake):
    proxy = make_proxy(metrics_max_models=3)
    for i in range(60):
        answer = await http.post(proxy + "/api/generate", json={"model": f"nope{i}", "prompt": "x", "stream": False})
        assert answer.status_code == 404
    fake.models.update(f"m{i}" for i in range(60))
    for i in range(60):
        answer = await http.post(proxy + "/api/generate", json={"model": f"m{i}", "prompt": "x", "stream": False})
        assert answer.status_code == 200
    samples = await scrape(http, proxy)
    models = {dict(labels).get("model") for name, labels in samples if name.startswith("ollama_proxy_generations")}
    assert models == {"m0:latest", "m1:latest", "m2:latest", OTHER}
    assert value(samples, "ollama_proxy_generations_total", model=OTHER, route="/api/generate", outcome="error") == 60
    assert value(samples, "ollama_proxy_generations_total", model=OTHER, route="/api/generate", outcome="ok") == 57


async def test_spelling_one_model_many_ways_takes_one_label(make_proxy, http):
    proxy = make_proxy(metrics_max_models=2)
    spellings = [
        "".join(c.upper() if (n >> i) & 1 else c for i, c in enumerate("llama")) + "3.2" for n in range(32)
    ] + ["llama3.2:latest", "library/llama3.2", "registry.ollama.ai/library/llama3.2:latest"]
    for name in spellings:
        answer = await http.post(proxy + "/api/generate", json={"model": name, "prompt": "x", "stream": False})
        assert answer.status_code == 200  # Ollama takes every one of them for llama3.2
    answer = await http.post(proxy + "/api/generate", json={"model": "silent", "prompt": "x", "stream": False})
    samples = await scrape(http, proxy)
    models = {dict(labels).get("model") for name, labels in samples if name.startswith("ollama_proxy_generations")}
    assert models == {"llama3.2:latest", "silent:latest"}  # room was left for a second model
    generated = value(
        samples, "ollama_proxy_generations_total", model="llama3.2:latest", route="/api/generate", outcome="ok"
    )
    assert generated == len(spellings)


# -- reading usage holds no body ------------------------------------------------------------


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class PeakRss:
    """The highest resident memory a process reaches while the block runs."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0

    async def __aenter__(self):
        self.task = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self):
        while True:
            self.peak = max(self.peak, rss(self.pid))
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc_info):
        self.peak = max(self.peak, rss(self.pid))
        self.task.cancel()


GROWTH_LIMIT = 40 * 1024 * 1024  # a few buffers and allocator slack, never a body


async def test_a_1_gib_upload_and_a_200000_line_stream_leave_rss_flat(launch, upstream_url, fake, http):
    process = launch({"PORT": "0", "OLLAMA_PROXY_HOST": "127.0.0.1", "OLLAMA_PROXY_UPSTREAM": upstream_url})
    proxy = (await read_log(process, "listening"))["address"]
    warm = await http.request("GET", proxy + "/api/chat", json={"model": "llama3.2", "messages": MESSAGES})
    assert warm.status_code == 200
    baseline = rss(process.pid)

    block = bytes(range(256)) * 4096  # 1 MiB
    size = 1024 * len(block)
    digest = "sha256:" + hashlib.sha256(block * 1024).hexdigest()
    reader, writer = await open_raw(proxy)
    writer.write(b"POST /api/blobs/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (digest.encode(), size))
    async with PeakRss(process.pid) as upload:
        for _ in range(1024):
            writer.write(block)
            await writer.drain()
        status, _, _ = await read_response(reader)
    assert status == 201 and fake.blob_received == size
    writer.close()

    lines = 200_000  # of about 1 KiB each: the stand-in's `flood` takes num_predict in KiB
    reader, writer = await open_raw(proxy)
    body = json.dumps({"model": "flood", "messages": MESSAGES, "options": {"num_predict": lines}}).encode()
    writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    async with PeakRss(process.pid) as stream:
        await reader.readuntil(b"\r\n\r\n")
        received = await read_chunked_to_end(reader)
    assert received > lines * 1000
    writer.close()
    assert upload.peak - baseline < GROWTH_LIMIT, (baseline, upload.peak)
    assert stream.peak - baseline < GROWTH_LIMIT, (baseline, stream.peak)
