"""A stand-in Ollama that behaves like the real one wherever a proxy can tell.

It enforces Ollama's route/method table (405 with ``Allow``), the loopback
Host and Origin checks (403, empty body), answers with Ollama's framing
(NDJSON, SSE, empty-bodied 200s, Content-Types with or without charset) and
checks blob digests while streaming the upload.

Special model names make it misbehave on purpose, since they travel through
the proxy untouched: ``silent`` never answers, ``stall`` sends one line and
goes quiet, ``die`` sends two lines and drops the connection, ``flood`` streams
``options.num_predict`` KiB as fast as the reader takes it. Others are slow as
Ollama can be: ``slow`` says nothing for ``state.silence`` seconds before
answering (a cold load), ``gap`` pauses that long between its first two lines,
``late404`` takes that long to answer that it does not exist, pulling
``nospace`` takes that long to fail; pulling ``unfinished`` ends its progress without
a word of success or failure, as no Ollama should.
"""

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import json
import re
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from tornado.iostream import StreamClosedError
from tornado.web import Application, RequestHandler, stream_request_body

ROUTES = {
    "/": ("GET", "HEAD"),
    "/api/version": ("GET", "HEAD"),
    "/api/status": ("GET",),
    "/api/tags": ("GET", "HEAD"),
    "/api/ps": ("GET",),
    "/api/show": ("POST",),
    "/api/generate": ("POST",),
    "/api/chat": ("POST",),
    "/api/embed": ("POST",),
    "/api/embeddings": ("POST",),
    "/api/pull": ("POST",),
    "/api/push": ("POST",),
    "/api/create": ("POST",),
    "/api/copy": ("POST",),
    "/api/delete": ("DELETE",),
    "/api/me": ("POST",),
    "/api/signout": ("POST",),
    "/v1/chat/completions": ("POST",),
    "/v1/responses": ("POST",),
    "/v1/messages": ("POST",),
    "/v1/models": ("GET",),
}
V1_MODEL = re.compile(r"/v1/models/(.+)")
BLOB_PATH = re.compile(r"/api/blobs/(sha256[:-][0-9a-f]{64})")
JSON = "application/json; charset=utf-8"
NDJSON = "application/x-ndjson"
NO_SPACE = "write /root/.ollama/models/blobs/sha256-abc-partial: no space left on device"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict
    body: bytes


@dataclass
class FakeState:
    """What the stand-in has seen, and knobs the tests turn."""

    models: set = field(default_factory=lambda: {"llama3.2", "silent", "stall", "die", "flood", "slow", "gap"})
    silence: float = 0.0  # how long ``slow``, ``gap`` and ``late404`` are silent
    blobs: set = field(default_factory=set)
    seen: list = field(default_factory=list)
    chunk_delay: float = 0.0
    # When set, a stream sends its next chunk only after the test releases it:
    # a proxy that buffered would deadlock the test instead of passing it.
    lockstep: asyncio.Queue | None = None
    sent: list = field(default_factory=list)  # (monotonic time, bytes) per chunk sent
    piece_size: int | None = None  # when set, a stream's chunks are sent in pieces of this many bytes
    flood_written: int = 0
    flood_done: asyncio.Future | None = None
    blob_received: int = 0
    blob_gate: asyncio.Event | None = None  # when set, uploads are read only once it fires
    arrived: asyncio.Queue = field(default_factory=asyncio.Queue)
    disconnected: asyncio.Queue = field(default_factory=asyncio.Queue)
    open_streams: int = 0
    streams_wanted: int = 0
    streams_ready: asyncio.Event = field(default_factory=asyncio.Event)
    # As a pod of a pool: what it answers to /api/version and /api/ps, how it runs generations.
    version: str = "0.32.0"
    loaded: set = field(default_factory=set)  # models in memory, as /api/ps lists them
    load_delay: float = 0.0  # how long loading a model that is not loaded takes (silent)
    slots: int | None = None  # generations at once (OLLAMA_NUM_PARALLEL); the rest wait, first come first served
    busy: bool = False  # answer generations "503 server busy", as a full queue does
    busy_message: str = "server busy, please try again.  maximum pending requests exceeded"
    token_delay: float = 0.0  # time per generated token
    running: int = 0  # generations running now
    most_running: int = 0
    digests: dict = field(default_factory=dict)  # model -> digest, where it is not the default
    modified: dict = field(default_factory=dict)  # model -> modified_at, where it is not the default
    _slots: asyncio.Semaphore | None = None

    def slot(self):
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.slots or 1_000_000)
        return self._slots

    def listing(self, model):
        digest = self.digests.get(model, hashlib.sha256(model.encode()).hexdigest())
        return {
            "name": model,
            "model": model,
            "modified_at": self.modified.get(model, "2026-11-01T10:00:00Z"),
            "size": 1000,
            "digest": digest,
            "details": {"format": "gguf", "family": "llama"},
        }

    def resolve(self, name):
        """The model a request names, as Ollama finds it: the default registry,
        namespace and tag may be left out, and case does not matter."""
        return next((model for model in self.models if same_model(model, name)), None)


def same_model(a, b) -> bool:
    def full(name):
        name = str(name).lower()
        name = name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
        parts = name.split("/")
        return "/".join(["registry.ollama.ai", "library"][: 3 - len(parts)] + parts)

    return full(a) == full(b)


def is_local_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name in ("localhost", socket.gethostname().lower()) or name.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified


class OllamaBase(RequestHandler):
    allowed: tuple = ()

    def initialize(self, state: FakeState) -> None:
        self.state = state
        self.gone = asyncio.Event()  # the client left

    def compute_etag(self):
        return None

    def clear(self):
        super().clear()
        # Go's net/http sends no Server header and no default Content-Type.
        self.clear_header("Server")
        self.clear_header("Content-Type")

    def prepare(self):
        if not is_local_host(self.request.host):
            self.set_status(403)
            self.finish()
            return
        origin = self.request.headers.get("Origin")
        if origin and not re.fullmatch(r"https?://(localhost|127\.0\.0\.1)(:\d+)?", origin):
            self.set_status(403)
            self.finish()
            return
        if origin and self.request.method == "OPTIONS":  # gin-contrib/cors answers preflights itself
            self.set_status(204)
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Methods", "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS")
            self.set_header("Access-Control-Allow-Headers", "Authorization,Content-Type,User-Agent,Accept")
            self.set_header("Access-Control-Max-Age", "43200")
            self.state.seen.append(Seen("OPTIONS", self.request.path, dict(self.request.headers), b""))
            self.finish()
            return
        if self.request.method not in self.allowed:
            self.set_status(405)
            self.set_header("Allow", ", ".join(self.allowed))
            self.set_header("Content-Type", "text/plain")
            self.finish("405 method not allowed")
            return
        self.state.arrived.put_nowait(self.request.path)

    def json(self, data, status=200, content_type=JSON):
        self.set_status(status)
        self.set_header("Content-Type", content_type)
        self.finish(json.dumps(data))

    def error(self, status, message):
        self.json({"error": message}, status)

    def on_connection_close(self):
        super().on_connection_close()
        self.gone.set()
        self.state.disconnected.put_nowait(self.request.path)


class OllamaHandler(OllamaBase):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def prepare(self):
        path = self.request.path
        self.route = unquote(path)  # Ollama's router matches the decoded path
        if V1_MODEL.fullmatch(path):
            self.allowed = ("GET",)
            super().prepare()
            if not self._finished:
                self.state.seen.append(Seen(self.request.method, path, dict(self.request.headers), b""))
                name = unquote(V1_MODEL.fullmatch(path).group(1))
                if self.state.resolve(name) is None:
                    self.json({"error": {"message": f"model '{name}' not found", "type": "api_error"}}, 404)
                else:
                    self.json({"id": name, "object": "model", "created": 1, "owned_by": "library"})
            return
        if self.route not in ROUTES:
            self.set_status(404)
            self.set_header("Content-Type", "text/plain")
            self.finish("404 page not found")
            return
        self.allowed = ROUTES[self.route]
        super().prepare()
        if self._finished:
            return
        self.state.seen.append(Seen(self.request.method, self.route, dict(self.request.headers), self.request.body))

    async def get(self):
        handler = getattr(self, "do_" + self.route.strip("/").replace("/", "_"))
        await handler()

    head = post = delete = get

    def body(self):
        if not self.request.body:
            self.error(400, "missing request body")
            return None
        try:
            data = json.loads(self.request.body)
        except (ValueError, RecursionError):  # Go's decoder refuses nesting past 10,000 too
            self.error(400, "invalid character in request body")
            return None
        return data

    async def model_or_404(self, data):
        name = data.get("model") or data.get("name")
        if not name:
            self.error(400, "model is required")
            return None
        if name in ("slow", "late404"):
            await asyncio.sleep(self.state.silence)
        if self.state.resolve(name) is None:
            self.error(404, f"model '{name}' not found")
            return None
        return name

    async def do_(self):
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Ollama is running")

    async def do_api_version(self):
        self.json({"version": self.state.version})

    async def do_api_status(self):
        self.json({"status": "ok"})

    async def do_api_tags(self):
        self.json({"models": [self.state.listing(m) for m in sorted(self.state.models)]})

    async def do_api_ps(self):
        loaded = [
            {**self.state.listing(m), "expires_at": "2026-12-31T00:00:00Z", "size_vram": 1000}
            for m in sorted(self.state.loaded)
        ]
        self.json({"models": loaded})

    async def do_api_show(self):
        data = self.body()
        if data is not None and await self.model_or_404(data):
            self.json(
                {
                    "modelfile": "FROM x",
                    "parameters": "",
                    "template": "{{ .Prompt }}",
                    "details": {"format": "gguf"},
                    "model_info": {"general.architecture": "llama"},
                }
            )

    async def do_api_me(self):
        self.json({"name": "tester"})

    async def do_api_signout(self):
        self.json({})

    async def do_api_embed(self):
        data = self.body()
        if data is not None and await self.model_or_404(data):
            inputs = data["input"] if isinstance(data["input"], list) else [data["input"]]
            embeddings = [[0.1, 0.2] for _ in inputs]
            used = counters({"prompt": " ".join(inputs)}, 0)
            reported = {name: used[name] for name in ("total_duration", "load_duration", "prompt_eval_count")}
            self.json({"model": data["model"], "embeddings": embeddings, **reported})

    async def do_api_embeddings(self):
        data = self.body()
        if data is not None and await self.model_or_404(data):
            self.json({"embedding": [0.1, 0.2]})

    async def do_api_copy(self):
        data = self.body()
        if data is not None and data.get("source") in self.state.models:
            self.state.models.add(data["destination"])
            self.finish()
        elif data is not None:
            self.error(404, f"model '{data.get('source')}' not found")

    async def do_api_delete(self):
        data = self.body()
        if data is not None and await self.model_or_404(data):
            self.state.models.discard(self.state.resolve(data.get("model") or data.get("name")))
            self.finish()

    async def do_v1_models(self):
        self.json({"object": "list", "data": [{"id": m, "object": "model"} for m in sorted(self.state.models)]})

    async def do_api_generate(self):
        await self.generation("response")

    async def do_api_chat(self):
        await self.generation("message")

    async def generation(self, kind):
        data = self.body()
        if data is None or not await self.model_or_404(data):
            return
        if self.state.busy:
            await asyncio.sleep(self.state.silence)  # a busy pod may be slow to say so, too
            self.error(503, self.state.busy_message)
            return
        async with self.working(data["model"]):
            await self.generate(kind, data)

    @contextlib.asynccontextmanager
    async def working(self, model):
        """A slot of the pod's for the generation, the model loaded first if it is not."""
        state = self.state
        async with state.slot():
            state.running += 1
            state.most_running = max(state.most_running, state.running)
            try:
                resolved = state.resolve(model)
                if resolved not in state.loaded:
                    await asyncio.sleep(state.load_delay)
                    state.loaded.add(resolved)
                yield
            finally:
                state.running -= 1

    async def generate(self, kind, data):
        model = data["model"]
        empty = not data.get("prompt") if kind == "response" else not data.get("messages")
        if empty:
            # A load or unload answers one object even when streaming was asked for.
            reason = "unload" if data.get("keep_alive") == 0 else "load"
            self.json({"model": model, kind: self.piece(kind, ""), "done": True, "done_reason": reason})
            return
        count = int(data.get("options", {}).get("num_predict", 3))
        if not data.get("stream", True):
            await asyncio.sleep(self.state.token_delay * count)
            text = "".join(f"tok{i} " for i in range(count))
            final = {"model": model, kind: self.piece(kind, text), "done": True, "done_reason": "stop"}
            self.json({**final, **counters(data, count)})
            return
        self.set_header("Content-Type", NDJSON)
        if model == "silent":
            await self.gone.wait()  # until the client leaves, as Ollama stops a generation then
            return
        if model == "flood":
            await self.flood(count)
            return
        for i in range(count):
            await asyncio.sleep(self.state.token_delay)
            await self.send_line({"model": model, kind: self.piece(kind, f"tok{i} "), "done": False})
            if model == "gap" and i == 0:
                await asyncio.sleep(self.state.silence)
            if model == "stall":
                await self.gone.wait()
                return
            if model == "die" and i == 1:
                await asyncio.sleep(0.1)  # a crash some time after the last token
                self.request.connection.stream.close()
                return
        final = {"model": model, kind: self.piece(kind, ""), "done": True, "done_reason": "stop"}
        await self.send_line({**final, **counters(data, count)})

    @staticmethod
    def piece(kind, text):
        return text if kind == "response" else {"role": "assistant", "content": text}

    async def send_line(self, obj):
        await self.send_bytes(json.dumps(obj).encode() + b"\n")

    async def send_bytes(self, chunk):
        size = self.state.piece_size or len(chunk)
        for start in range(0, len(chunk), size):
            await self.send_piece(chunk[start : start + size])

    async def send_piece(self, chunk):
        if self.state.lockstep is not None:
            await self.state.lockstep.get()
        elif self.state.chunk_delay and self.state.sent:
            await asyncio.sleep(self.state.chunk_delay)
        self.state.sent.append((time.monotonic(), chunk))
        self.write(chunk)
        await self.flush()

    async def flood(self, kib):
        block = (b'{"response":"' + b"x" * 1000 + b'"}\n') * 64
        self.state.flood_written = 0
        try:
            while self.state.flood_written < kib * 1024:
                self.write(block)
                await self.flush()
                self.state.flood_written += len(block)
        except StreamClosedError:
            return
        if self.state.flood_done is not None:
            self.state.flood_done.set_result(time.monotonic())

    async def progress(self):
        data = self.body()
        if data is None:
            return
        steps = [
            {"status": "pulling manifest"},
            {"status": "pulling abc", "digest": "sha256:abc", "total": 10, "completed": 10},
            {"status": "success"},
        ]
        failing = data.get("model") == "nospace"  # a pull that fails after a while, as a full disk makes it
        if not failing and self.request.path in ("/api/pull", "/api/create"):
            self.state.models.add(data.get("model"))  # what a pull or a create brings
        if not data.get("stream", True):
            if failing:
                await asyncio.sleep(self.state.silence)
                self.error(500, NO_SPACE)
                return
            self.json({"status": "success"}, content_type="application/json")
            return
        self.set_header("Content-Type", NDJSON)
        if data.get("model") == "unfinished":
            steps.pop()
        for step in steps:
            if failing and step["status"] == "success":
                await asyncio.sleep(self.state.silence)
                step = {"error": NO_SPACE}
            await self.send_line(step)

    do_api_pull = do_api_push = do_api_create = progress

    async def do_v1_chat_completions(self):
        data = self.body()
        if data is None:
            return
        if data.get("model") in ("slow", "late404"):
            await asyncio.sleep(self.state.silence)
        if data.get("model") == "late404":
            message = 'model "late404" not found, try pulling it first'
            self.json({"error": {"message": message, "type": "api_error", "param": None, "code": None}}, 404)
            return
        used = counters(data, 1 if not data.get("stream") else 2)
        usage = {"prompt_tokens": used["prompt_eval_count"], "completion_tokens": used["eval_count"]}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not data.get("stream"):
            message = {"role": "assistant", "content": "hi"}
            self.json({"object": "chat.completion", "choices": [{"message": message}], "usage": usage})
            return
        self.set_header("Content-Type", "text/event-stream")
        for word in ("Hel", "lo"):
            chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": word}}]}
            await self.send_bytes(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (data.get("stream_options") or {}).get("include_usage"):
            chunk = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
            await self.send_bytes(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await self.send_bytes(b"data: [DONE]\n\n")

    async def do_v1_responses(self):
        """The Responses API as Ollama's middleware answers it (openai/responses.go): one
        JSON document with its `usage`, or with "stream": true events whose last,
        response.completed, carries it (no "data: [DONE]" follows)."""
        data = self.body()
        if data is None:
            return
        model = data.get("model")
        if self.state.resolve(str(model)) is None:
            error = {"message": f"model '{model}' not found", "type": "not_found_error", "param": None, "code": None}
            self.json({"error": error}, 404)
            return
        count = data.get("max_output_tokens") or 3
        used = counters({"prompt": " ".join(texts([data.get("instructions"), data.get("input")]))}, count)
        usage = {
            "input_tokens": used["prompt_eval_count"],
            "output_tokens": used["eval_count"],
            "total_tokens": used["prompt_eval_count"] + used["eval_count"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        created = int(time.time())
        response_id, item_id = f"resp_{created % 999_999:06d}", f"msg_{count:06d}"

        def response(status, text, reported):
            output = [] if text is None else [output_message(item_id, "completed", text)]
            return responses_object(data, response_id, created, status, output, reported)

        async with self.working(model):
            if not data.get("stream"):
                await asyncio.sleep(self.state.token_delay * count)
                whole = response("completed", "".join(f"tok{i} " for i in range(count)), usage)
                self.go_json(whole, "application/json")
                return
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            sequence = itertools.count()

            async def event(kind, **fields):  # a Go map: its keys sorted
                fields.update(type=kind, sequence_number=next(sequence))
                await self.send_event(kind, fields, sort_keys=True)

            await event("response.created", response=response("in_progress", None, None))
            await event("response.in_progress", response=response("in_progress", None, None))
            text = ""
            place = {"item_id": item_id, "output_index": 0, "content_index": 0}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            for i in range(count):
                await asyncio.sleep(self.state.token_delay)
                if i == 0:
                    item = output_message(item_id, "in_progress")
                    await event("response.output_item.added", output_index=0, item=item)
                    await event("response.content_part.added", **place, part=part)
                await event("response.output_text.delta", **place, delta=f"tok{i} ", logprobs=[])
                text += f"tok{i} "
            await event("response.output_text.done", **place, text=text, logprobs=[])
            await event("response.content_part.done", **place, part={**part, "text": text})
            await event("response.output_item.done", output_index=0, item=output_message(item_id, "completed", text))
            await event("response.completed", response=response("completed", text, usage))

    async def do_v1_messages(self):
        """Anthropic's Messages API as Ollama's middleware answers it (anthropic/anthropic.go):
        one JSON document with its `usage`, or with "stream": true events. The first,
        message_start, says the prompt's tokens as estimated (characters / 4) before the
        model counts them; message_delta, before the closing message_stop, says what the
        model counted: the prompt's tokens too since Ollama 0.15.5 (`version`), only the
        output's before, when message_start said the first chunk's count, 0."""
        data = self.body()
        if data is None:
            return
        model = data.get("model")
        if self.state.resolve(str(model)) is None:
            error = {"type": "not_found_error", "message": f"model '{model}' not found"}
            self.json({"type": "error", "error": error, "request_id": "req_0"}, 404)
            return
        count = data.get("max_tokens") or 3
        prompt = texts([data.get("system"), data.get("messages")])
        used = counters({"prompt": " ".join(prompt)}, count)
        message_id = f"msg_{int(time.time()) % 999_999:024x}"
        async with self.working(model):
            if not data.get("stream"):
                await asyncio.sleep(self.state.token_delay * count)
                text = "".join(f"tok{i} " for i in range(count))
                self.go_json(
                    {
                        **anthropic_message(message_id, model, [{"type": "text", "text": text}]),
                        "stop_reason": "end_turn",
                        "usage": {"input_tokens": used["prompt_eval_count"], "output_tokens": used["eval_count"]},
                    },
                    "application/json",
                )
                return
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            counted_at_end = version(self.state.version) >= (0, 15, 5)
            estimate = len("".join(prompt)) // 4 if counted_at_end else 0
            start = {
                **anthropic_message(message_id, model, []),
                "usage": {"input_tokens": estimate, "output_tokens": 0},
            }
            await self.send_event("message_start", {"type": "message_start", "message": start})
            for i in range(count):
                await asyncio.sleep(self.state.token_delay)
                if i == 0:
                    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
                    await self.send_event("content_block_start", block)
                delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"tok{i} "}}
                await self.send_event("content_block_delta", delta)
            await self.send_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            usage = {"input_tokens": used["prompt_eval_count"]} if counted_at_end else {}
            usage["output_tokens"] = used["eval_count"]
            ending = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}
            await self.send_event("message_delta", ending)
            await self.send_event("message_stop", {"type": "message_stop"})

    def go_json(self, data, content_type):
        """One document as Go's json.Encoder writes it: compact, and a newline after it."""
        self.set_header("Content-Type", content_type)
        self.finish(json.dumps(data, separators=(",", ":")) + "\n")

    async def send_event(self, kind, data, sort_keys=False):
        """An event as Ollama's middleware writes one (a Go map's keys sorted, a struct's in order)."""
        encoded = json.dumps(data, separators=(",", ":"), sort_keys=sort_keys)
        await self.send_bytes(f"event: {kind}\ndata: {encoded}\n\n".encode())


def responses_object(data, response_id, created, status, output, usage):
    """The Responses API's response, field by field as Ollama fills it, echoing the request."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "completed_at": created if status == "completed" else None,
        "status": status,
        "incomplete_details": None,
        "model": data["model"],
        "previous_response_id": None,
        "instructions": data.get("instructions") or None,
        "output": output,
        "error": None,
        "tools": data.get("tools") or [],
        "tool_choice": "auto",
        "truncation": data.get("truncation") or "disabled",
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "top_p": data.get("top_p", 1),
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": data.get("temperature", 1),
        "reasoning": None,
        "usage": usage,
        "max_output_tokens": data.get("max_output_tokens"),
        "max_tool_calls": None,
        "store": False,
        "background": bool(data.get("background")),
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }


def output_message(item_id, status, text=None):
    """The assistant's message in a Responses answer: empty while it is being written."""
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def anthropic_message(message_id, model, content):
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content}


def texts(value):
    """Every text of a prompt: strings, in lists, and in objects' content or text."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for item in value for text in texts(item)]
    if isinstance(value, dict):
        return texts(value.get("content")) + texts(value.get("text"))
    return []


def version(text):
    """An Ollama version as numbers to compare: (0, 15, 5) for 0.15.5 and 0.15.5-rc1."""
    return tuple(int(part) for part in text.split("-")[0].split("."))


def counters(data, completion_tokens):
    """What Ollama reports at a generation's end: a prompt token per word asked
    (plus one), 50 tokens/s, and a 5 ms load."""
    texts = [data.get("prompt") or ""] + [str(m.get("content") or "") for m in data.get("messages") or []]
    prompt_tokens = len(" ".join(texts).split()) + 1
    return {
        "total_duration": 10_000_000 + completion_tokens * 20_000_000,
        "load_duration": 5_000_000,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": 4_000_000,
        "eval_count": completion_tokens,
        "eval_duration": completion_tokens * 20_000_000,
    }


@stream_request_body
class BlobHandler(OllamaBase):
    allowed = ("HEAD", "POST")
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def prepare(self):
        self.request.connection.set_max_body_size(2**40)
        self.hasher = hashlib.sha256()
        super().prepare()
        if not self._finished:
            # The body is streamed and hashed, not kept.
            self.state.seen.append(Seen(self.request.method, self.request.path, dict(self.request.headers), b""))

    async def data_received(self, chunk):
        if self.state.blob_gate is not None:
            await self.state.blob_gate.wait()
        self.hasher.update(chunk)
        self.state.blob_received += len(chunk)

    async def head(self, digest):
        self.set_status(200 if digest in self.state.blobs else 404)

    async def post(self, digest):
        if digest in self.state.blobs:
            self.set_status(200)
        elif "sha256:" + self.hasher.hexdigest() != digest.replace("-", ":", 1):
            self.error(400, "digest mismatch")
        else:
            self.state.blobs.add(digest)
            self.set_status(201)

    get = put = patch = delete = options = post


def make_fake_ollama(state: FakeState) -> Application:
    return Application(
        [
            (r"/api/blobs/(sha256[:-][0-9a-f]{64})", BlobHandler, {"state": state}),
            (r".*", OllamaHandler, {"state": state}),
        ]
    )
