"""Ollama's own route table (server/routes.go), plus aliases older write-ups name.

Each entry says which access-key scope it needs (reading and generating is
`inference`; what changes the server, such as pulling or deleting models,
is `manage`), how Ollama answers it (`answer`: NDJSON lines, server-sent
events or one JSON document, see `routes.ANSWERS`) and whether the answer
reports token counts.
"""

from typing import Any

from tornado_ollama_proxy import hookimpl

Routes = list[dict[str, Any]]

# Methods are listed in order of preference: a request without a body to a
# multi-method route gets the first body-less one, with a body the first
# body-carrying one.
_READ = ["GET", "HEAD"]


def _read(path: str, methods: list[str], answer: str | None = "json") -> dict[str, Any]:
    return {"path": path, "methods": methods, "scope": "inference", "answer": answer}


def _call(path: str, scope: str, answer: str | None, tokens: bool = False) -> dict[str, Any]:
    entry = {"path": path, "methods": ["POST"], "requires_body": True, "scope": scope, "answer": answer}
    return {**entry, "tokens": True} if tokens else entry


OLLAMA_ROUTES: Routes = [
    _read("/", _READ, answer=None),  # "Ollama is running", text
    _read("/api/version", _READ),
    _read("/api/status", ["GET"]),
    _read("/api/tags", _READ),
    _read("/api/ps", ["GET"]),
    _read("/api/experimental/model-recommendations", ["GET"]),
    _read("/v1/models", ["GET"]),
    _read("/v1/models/{model}", ["GET"]),
    _call("/api/show", "inference", "json"),
    _call("/api/generate", "inference", "ndjson", tokens=True),
    _call("/api/chat", "inference", "ndjson", tokens=True),
    _call("/api/embed", "inference", "json", tokens=True),
    _call("/api/embeddings", "inference", "json", tokens=True),
    _call("/v1/chat/completions", "inference", "sse", tokens=True),
    _call("/v1/completions", "inference", "sse", tokens=True),
    _call("/v1/embeddings", "inference", "json", tokens=True),
    _call("/v1/responses", "inference", "sse", tokens=True),
    _call("/v1/messages", "inference", "sse", tokens=True),
    _call("/v1/audio/transcriptions", "inference", "json"),
    _call("/api/pull", "manage", "ndjson"),
    _call("/api/push", "manage", "ndjson"),
    _call("/api/create", "manage", "ndjson"),
    _call("/api/copy", "manage", None),  # an empty body
    _call("/api/experimental/web_search", "manage", "json"),
    _call("/api/experimental/web_fetch", "manage", "json"),
    {"path": "/api/me", "methods": ["POST"], "scope": "manage", "answer": "json"},
    {"path": "/api/signout", "methods": ["POST"], "scope": "manage", "answer": "json"},
    {"path": "/api/delete", "methods": ["DELETE"], "requires_body": True, "scope": "manage"},
    {"path": "/api/user/keys/{key}", "methods": ["DELETE"], "scope": "manage"},
    {"path": "/api/blobs/{digest}", "methods": ["POST", "HEAD"], "scope": "manage"},
]

ALIASES: Routes = [
    {**_read("/api/ls", ["GET"]), "upstream_path": "/api/tags"},
    {**_read("/api/serve", ["GET"], answer=None), "upstream_path": "/"},
    *(
        {
            **_call(path, "inference", "ndjson", tokens=True),  # a generation, when the body asks
            "upstream_path": "/api/generate",
            "body_defaults": {"keep_alive": 0},
        }
        for path in ("/api/stop", "/api/unload")
    ),
]


@hookimpl
def register_routes() -> Routes:
    return OLLAMA_ROUTES + ALIASES
