"""What a request asks of a token quota: which calls a quota counts, its prompt's
estimate (erring high), the output it asks for, and its body with that output capped.

The estimate reads everything Ollama may render into the model's context, however
it is dressed; the cap is written in each API's own terms, and every other spelling
that Go's JSON decoder (Ollama's) would also take is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .peer_json import json_object
from .routes import router_path

if TYPE_CHECKING:
    from .routes import Route

CHARACTERS_PER_TOKEN = 3  # fewer than most tokenizers' 4: a quota's estimate errs high
TOKENS_PER_MESSAGE = 4  # the chat template's own tokens around each message
TEMPLATE_TOKENS = 16  # and around the whole prompt
IMAGE_PARTS = ("image_url", "image", "input_image")  # OpenAI's, Anthropic's and the Responses API's
# What in a body (at its top) is not the model's context: which model, how long to keep it,
# how to answer.
UNCOUNTED = frozenset(
    {
        "model",
        "keep_alive",
        "stream",
        "stream_options",
        "options",
        *("max_tokens", "max_completion_tokens", "max_output_tokens"),
    }
)
# Where each generating path (as it goes upstream) takes its output limit; embeddings have none.
OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "/api/generate": ("options", "num_predict"),
    "/api/chat": ("options", "num_predict"),
    "/v1/chat/completions": ("max_tokens",),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}
OUTPUT_NAMES = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # /v1's, of every API
# Every path a quota counts, as it goes upstream (so an alias counts as what it calls).
COUNTED = frozenset({*OUTPUT_FIELDS, "/api/embed", "/api/embeddings", "/v1/embeddings"})


def uncounted_read(route: Route) -> bool:
    """Whether a route only reads (what the server has, a model's details): no quota
    needs to count it."""
    return route.path == "/api/show" or set(route.methods) <= {"GET", "HEAD"}


def counted_path(target: str) -> str | None:
    """The path a quota counts a request target (as it goes upstream) by, decoded as
    Ollama's router decodes it (`/api/%67enerate` is `/api/generate`); None if it counts none."""
    path = router_path(target)
    return path if path in COUNTED else None


@dataclass(frozen=True, slots=True)
class Ask:
    """A generation as its quota sees it: its prompt's estimated tokens, the output it asks
    for (None: no limit of its own), and its body read (None: not a JSON object)."""

    prompt: int
    output: int | None
    data: dict[str, Any] | None


def read_ask(path: str, body: bytes | None, image_tokens: int) -> Ask:
    """What a body asks of a quota: every text in it (prompt, messages, system, tools,
    format, whatever Ollama may put in the model's context) at UTF-8 bytes / 3, a token
    per number (a `context` of token ids), a few tokens per message and for the template,
    `image_tokens` per image (not its base64 length); and the output limit it sets in its
    path's own terms (Ollama ignores the other API's)."""
    data = json_object(body) if body else None
    if data is None:
        return Ask(len(body or b"") // CHARACTERS_PER_TOKEN + TEMPLATE_TOKENS, None, None)
    counted: list[Any] = []  # what is weighed as it is
    images = 0
    for name, value in data.items():
        if name in UNCOUNTED:
            continue
        if name == "images" and isinstance(value, list):
            images += len(value)
        elif name in ("messages", "input") and isinstance(value, list):
            for message in value:
                images += _message(message, counted)
        else:
            counted.append(value)
    messages = data.get("messages")
    tokens = TOKENS_PER_MESSAGE * len(messages) if isinstance(messages, list) else 0
    size, numbers = _weigh(counted)
    prompt = size // CHARACTERS_PER_TOKEN + numbers + tokens + TEMPLATE_TOKENS + images * image_tokens
    return Ask(prompt, _asked_output(path, data), data)


def _message(message: Any, counted: list[Any]) -> int:
    """The images of a message (or of an item of the Responses API's input), its other
    parts put in `counted`. Images are a message's `images` (Ollama's) and the parts of
    its content list whose type says image: nothing else is one (Ollama reads a
    message's own `type` as nothing)."""
    if not isinstance(message, dict):
        counted.append(message)
        return 0
    images = 0
    for name, value in message.items():
        if name == "images" and isinstance(value, list):
            images += len(value)
        elif name == "content" and isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                    images += 1
                else:
                    counted.append(part)
        else:
            counted.append(value)
    return images


def _weigh(values: list[Any]) -> tuple[int, int]:
    """The UTF-8 bytes of every text in `values`, and how many numbers. Walked without
    recursion: a body may nest as deep as the parser allowed."""
    size = numbers = 0
    pending = values
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            size += len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif value is not None and not isinstance(value, bool):
            numbers += 1
    return size, numbers


def _asked_output(path: str, data: dict[str, Any]) -> int | None:
    fields = OUTPUT_FIELDS.get(path)
    if fields is None:
        return None
    if fields[0] == "options":
        options = data.get("options")
        value = options.get("num_predict") if isinstance(options, dict) else None
    else:
        value = data.get("max_completion_tokens", data.get(fields[0]))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def capped(path: str, data: dict[str, Any], output: int) -> dict[str, Any]:
    """The body with its output limited to `output` tokens, in its path's terms, and no
    other spelling of those fields: Go's JSON decoder, Ollama's, takes `"MAX_TOKENS"` or
    `"Options"` for the field too, and the last one it meets wins."""
    fields = OUTPUT_FIELDS[path]
    if fields[0] == "options":
        options = data.get("options")
        options = _only(options if isinstance(options, dict) else {}, "num_predict")
        return {**_only(data, "options"), "options": {**options, "num_predict": output}}
    limited = {**_only(data, *OUTPUT_NAMES), fields[0]: output}
    if "max_completion_tokens" in data:
        limited["max_completion_tokens"] = output
    return limited


def _only(data: dict[str, Any], *names: str) -> dict[str, Any]:
    """`data` without the keys that spell one of `names` otherwise: in other letter cases,
    or with letters that fold to theirs as Go folds them (a long s is an s, the Kelvin sign a k)."""
    return {key: value for key, value in data.items() if key in names or key.casefold() not in names}


# The event a /v1 stream ends with when asked for its usage: no choices, the counts.
_USAGE_EVENT = re.compile(rb'data: \{[^\n]*"choices":\s*\[\],[^\n]*"usage":[^\n]*\}\n\n')
STREAMED_USAGE = ("/v1/chat/completions", "/v1/completions")  # what asks with stream_options


def ask_for_usage(data: dict[str, Any]) -> dict[str, Any] | None:
    """A streamed /v1 body that does not ask for its usage event, asking for it (None when
    it asks already, or is not streamed): its tokens are then counted, not guessed."""
    options = data.get("stream_options")
    options = options if isinstance(options, dict) else {}
    if data.get("stream") is not True or options.get("include_usage") is True:
        return None
    return {**_only(data, "stream_options"), "stream_options": {**options, "include_usage": True}}


EVENT_HELD_MAX = 64 * 1024  # an event begun in one piece waits this much at most for its end


class UsageStrip:
    """A /v1 stream without the usage event its client did not ask for (many clients read
    `choices[0]` of every event). Ollama writes each event whole, but a piece may end
    inside one (the network splits what it writes): the end of a piece that begins an
    event is held until the event's end arrives, so that a usage event is always seen
    whole; one larger than EVENT_HELD_MAX goes on as it came."""

    def __init__(self) -> None:
        self.held = b""

    def __call__(self, piece: bytes) -> bytes:
        data = self.held + piece if self.held else piece
        end = data.rfind(b"\n\n")  # of the last whole event
        rest = data[end + 2 :] if end >= 0 else data
        begun = b"data:".startswith(rest[:5])  # an event, or what may begin one
        self.held = rest if begun and len(rest) <= EVENT_HELD_MAX else b""
        if self.held:
            data = data[: len(data) - len(rest)]
        return _USAGE_EVENT.sub(b"", data)

    def rest(self) -> bytes:
        """At the stream's end, what is held (the stream ended inside an event, without
        the blank line after it): its lines as they came, but for a usage line and a
        line cut short (its JSON unfinished: it may have been one)."""
        held, self.held = self.held, b""
        return b"".join(line for line in held.splitlines(keepends=True) if _whole_and_asked(line))


def _whole_and_asked(line: bytes) -> bool:
    """Whether a line of a stream's held end goes to the client: a `data:` line that is
    `[DONE]` or a whole JSON object other than the usage event; any other line."""
    data = line.rstrip(b"\r\n")
    if not data.startswith(b"data:"):
        return True
    payload = data[5:].strip()
    if payload == b"[DONE]":
        return True
    return json_object(payload) is not None and not _USAGE_EVENT.fullmatch(data + b"\n\n")
