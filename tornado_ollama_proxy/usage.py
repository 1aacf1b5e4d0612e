"""What a request asks for and what its answer reports, read cheaply on the way.

The request body, when it is a JSON object of at most 1 MiB, says which
model and whether to stream; that decides the answer's format (and so what
a heartbeat may look like). An answer that reports token counts is read at
its end, from at most its last 64 KiB (and, where its API says the prompt's
count at its start, from its first event too): nothing is parsed per piece.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from .logs import bounded
from .model_names import canonical
from .peer_json import json_object
from .routes import router_path

REQUEST_COPY_LIMIT = 1024 * 1024  # a body larger than this is not read
MODEL_LIMIT = 256  # characters of a model name kept for records and the status page
OPENING_LIMIT = 1024  # characters of a conversation's opening that key its pod
ANSWER_TAIL = 64 * 1024  # the counters are read from at most this much of an answer's end
START_LIMIT = 4 * 1024  # an answer's first event is kept apart if it ends within this much (AnswerEnds)
OPENAI_OUTPUT = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # the output asked, on /v1/*
OTHER = "other"  # the model label of every model past the bound, or that Ollama did not answer


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The model a request names and its "stream" flag, when its body says so, the
    opening of its conversation (what every later turn repeats: see `opening`), and
    what a generation's place in the fair queue is reckoned by (`Asks`), read in the
    same parse."""

    model: str | None = None
    stream: bool | None = None
    opening: str | None = None
    asks: Asks | None = None  # None: the body is no JSON object that was read


@dataclass(frozen=True, slots=True)
class Asks:
    """What a generation asks of a pod before it runs: its prompt's characters, and the
    output it asks for in each API's terms (a positive whole number, else None):
    `options.num_predict` for /api/*, `max_tokens` and kin for /v1/* (Ollama ignores
    the other's)."""

    characters: int = 0
    num_predict: int | None = None
    max_tokens: int | None = None


UNKNOWN = RequestInfo()


def read_request(body: bytes | None) -> RequestInfo:
    """`model` and `stream` of a JSON-object body; UNKNOWN for anything else."""
    if not body or len(body) > REQUEST_COPY_LIMIT:
        return UNKNOWN
    data = json_object(body)
    if data is None:
        return UNKNOWN
    model = data.get("model", data.get("name"))
    stream = data.get("stream")
    return RequestInfo(
        bounded(model, MODEL_LIMIT) if isinstance(model, str) else None,
        stream if isinstance(stream, bool) else None,
        opening(data),
        asks(data),
    )


def asks(data: dict[str, Any]) -> Asks:
    """What a request body's JSON object asks of a pod (`Asks`)."""
    characters = sum(_text_length(data.get(name)) for name in ("prompt", "system", "input", "instructions"))
    messages = data.get("messages")
    if isinstance(messages, list):
        characters += sum(_text_length(message.get("content")) for message in messages if isinstance(message, dict))
    options = data.get("options")
    return Asks(
        characters,
        _output(options.get("num_predict") if isinstance(options, dict) else None),
        _output(next((data[name] for name in OPENAI_OUTPUT if data.get(name) is not None), None)),
    )


def _output(asked: Any) -> int | None:
    return asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else None


def _text_length(value: Any) -> int:
    """The characters of a prompt field: a string, or a list of strings or of parts (and,
    for /v1/responses, of messages whose content is either); nothing deeper exists."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, dict):
            item = item.get("text", item.get("content"))
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            total += sum(
                len(part["text"]) for part in item if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return total


def opening(data: dict[str, Any]) -> str | None:
    """What every turn of a conversation repeats, at most OPENING_LIMIT characters: its
    system message and first user message (chat), else its prompt (or input): the key
    that sends a conversation back to the pod that holds its prompt cache."""
    messages = data.get("messages")
    if isinstance(messages, list):
        dicts = [message for message in messages if isinstance(message, dict)]
        system = next((message for message in dicts if message.get("role") == "system"), None)
        user = next((message for message in dicts if message.get("role") == "user"), None)
        text = "\0".join(_text(message.get("content")) for message in (system, user) if message is not None)
    else:
        text = _text(data.get("prompt", data.get("input")))
    return text[:OPENING_LIMIT] or None


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts (OpenAI's form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def answer_format(answer: str | None, stream: bool | None) -> str | None:
    """How the upstream will answer: "ndjson", "sse", "json", or None (anything else).

    A route's `answer` names its convention: Ollama's /api calls stream NDJSON
    unless asked not to, its /v1 calls stream events only when asked to.
    """
    if answer == "ndjson":
        return "json" if stream is False else "ndjson"
    if answer == "sse":
        return "sse" if stream is True else "json"
    return answer


# Each count under its names: Ollama's, OpenAI's chat and completions `usage`, and the
# `usage` of the Responses and Anthropic Messages APIs. Whichever name says it last wins:
# an answer may echo a client's own JSON (the Responses API's `tools`, a tool call's
# input) before its counts, never after them.
_COUNTS = {
    "prompt_eval_count": "prompt",
    "prompt_tokens": "prompt",
    "input_tokens": "prompt",
    "eval_count": "completion",
    "completion_tokens": "completion",
    "output_tokens": "completion",
    "eval_duration": "eval_duration",
    "load_duration": "load_duration",
}
_COUNTER = re.compile(rb'"(' + "|".join(_COUNTS).encode() + rb')"\s*:\s*(\d+(?:\.\d+)?)')


@dataclass(frozen=True, slots=True)
class Counters:
    """What an answer reported about its generation (None where it said nothing)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_s: float | None = None
    load_ms: float | None = None


def read_counters(tail: bytes, start: bytes = b"") -> Counters:
    """The counters in an answer's last bytes: Ollama's (the final NDJSON line or the
    whole JSON: prompt_eval_count, eval_count, eval_duration, load_duration) or the
    /v1 calls' `usage` (prompt_tokens and completion_tokens; input_tokens and
    output_tokens in the Responses and Anthropic Messages APIs). The last mention of a
    count, under any of its names, wins.

    A prompt's count the end does not say is read from the answer's `start` (see
    `prompt_at_start`), unless it is 0, which says it was not counted yet (Ollama
    before 0.15.5 says 0 there, and the count nowhere). Never the output's: a start
    tells what had been generated then, not what an answer cut short used.
    """
    found = _mentions(tail)
    prompt = found.get("prompt")
    if prompt is None:
        prompt = _mentions(start).get("prompt") or None
    completion = found.get("completion")
    duration = found.get("eval_duration")
    load = found.get("load_duration")
    return Counters(
        prompt_tokens=None if prompt is None else int(prompt),
        completion_tokens=None if completion is None else int(completion),
        tokens_per_s=round(completion / duration * 1e9, 2) if completion and duration else None,
        load_ms=None if load is None else round(load / 1e6, 3),
    )


def _mentions(data: bytes) -> dict[str, float]:
    """Each count's last value in `data`, under whichever name (one scan for all of them)."""
    return {_COUNTS[name.decode()]: float(number) for name, number in _COUNTER.findall(data)}


# Where an answer says its prompt's count at its start, and its end need not: Anthropic's
# Messages API, in its first event, message_start (its message_delta may say only the
# output's count, as Ollama's did before 0.15.5).
PROMPT_AT_START = frozenset({"/v1/messages"})


def prompt_at_start(target: str) -> bool:
    """Whether the answer to a request target, as it goes upstream, may say its prompt's
    count only at its start: Ollama answers as the path its router matches names."""
    return router_path(target) in PROMPT_AT_START


# Where a stream's counters are: Ollama's last NDJSON line; the /v1 calls' usage event,
# which comes before the closing "data: [DONE]" (chat, completions), is the last event
# (the Responses API's response.completed) or comes before message_stop (Anthropic's
# message_delta).
LAST_RECORDS = {"ndjson": (b"\n", 1), "sse": (b"\n\n", 2)}


class AnswerEnds:
    """What an answer's counters are read from (`counters`): its last ANSWER_TAIL bytes
    and, in a stream (`answer_format` "ndjson" or "sse"), only its last line or last two
    events; with `start`, its first event apart (`start`), when one ends within its
    first START_LIMIT bytes.

    Pieces are kept as they are and dropped from the front, so nothing is copied
    per piece; a long stream of tokens holds one line, not 64 KiB of them. Only the
    first pieces are copied, while the first event arrives. That event is never part
    of the tail: what it says of the output (nothing yet) is no count of an answer cut
    short, however short. The counters are read once per answer: read again with no
    piece added since (the queue learns them as the exchange ends, the record as the
    request does), they are those read before.
    """

    def __init__(self, answer_format: str | None = None, *, start: bool = False) -> None:
        self.pieces: deque[bytes] = deque()
        self.size = 0
        self.boundary, self.records = LAST_RECORDS.get(answer_format or "", (b"", 0))
        self.ended = 0  # held pieces that end a record
        self.start = b""  # the first event, once it has arrived whole
        self.starting: bytes | None = b"" if start else None  # its bytes while they arrive
        self.read: Counters | None = None  # the counters, while no piece has come since

    def add(self, piece: bytes) -> None:
        self.read = None
        if self.starting is not None:
            piece = self._take_start(self.starting, piece)
            if not piece:
                return
        pieces = self.pieces
        if self.records and pieces and pieces[-1].endswith(self.boundary):
            while self.ended >= self.records:  # `piece` begins a record: keep records - 1 before it
                self._drop()
        pieces.append(piece)
        self.size += len(piece)
        if self.records and piece.endswith(self.boundary):
            self.ended += 1
        while self.size - len(pieces[0]) >= ANSWER_TAIL:
            self._drop()

    def _drop(self) -> None:
        dropped = self.pieces.popleft()
        self.size -= len(dropped)
        if self.records and dropped.endswith(self.boundary):
            self.ended -= 1

    def _take_start(self, before: bytes, piece: bytes) -> bytes:
        """Take the first event's bytes (`before`: those of the pieces before) off `piece`,
        and give back what follows it; all of them, when no event ends within START_LIMIT
        bytes (a whole JSON answer)."""
        starting = before + piece
        end = starting.find(b"\n\n", max(len(before) - 1, 0), START_LIMIT)  # it may begin in the piece before
        if end >= 0:
            self.start, self.starting = starting[: end + 2], None
            return starting[end + 2 :]
        if len(starting) < START_LIMIT:
            self.starting = starting
            return b""
        self.starting = None
        return starting

    def tail(self) -> bytes:
        return b"".join(self.pieces)[-ANSWER_TAIL:]

    def counters(self) -> Counters:
        if self.read is None:
            if self.starting is not None:  # no event has ended (a whole JSON answer, or one cut short): all is tail
                self.read = read_counters(self.starting)
            else:
                self.read = read_counters(self.tail(), self.start)
        return self.read


class ModelLabels:
    """Model names as labels, spelled as Ollama compares them (`model_names.canonical`,
    so that one model is one label however a client writes it): only one Ollama
    answered with a 2xx becomes a label, at most `limit` of them; every other
    request is `other`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.known: set[str] = set()

    def label(self, model: str | None, answered: bool) -> str:
        name = canonical(model) if model is not None else None
        if name in self.known:
            assert name is not None
            return name
        if name is None or not answered or len(self.known) >= self.limit:
            return OTHER
        self.known.add(name)
        return name
