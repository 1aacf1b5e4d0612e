"""Ollama's own route table (server/routes.go), plus aliases older write-ups name."""

from typing import Any

from tornado_ollama_proxy import hookimpl

# Methods are listed in order of preference: a request without a body to a
# multi-method route gets the first body-less one, with a body the first
# body-carrying one.
_READ = ["GET", "HEAD"]
Routes = list[dict[str, Any]]

OLLAMA_ROUTES: Routes = [
    {"path": "/", "methods": _READ},
    {"path": "/api/version", "methods": _READ},
    {"path": "/api/status", "methods": ["GET"]},
    {"path": "/api/tags", "methods": _READ},
    {"path": "/api/ps", "methods": ["GET"]},
    {"path": "/api/experimental/model-recommendations", "methods": ["GET"]},
    {"path": "/v1/models", "methods": ["GET"]},
    {"path": "/v1/models/{model}", "methods": ["GET"]},
    *(
        {"path": path, "methods": ["POST"], "requires_body": True}
        for path in (
            "/api/show",
            "/api/generate",
            "/api/chat",
            "/api/embed",
            "/api/embeddings",
            "/api/pull",
            "/api/push",
            "/api/create",
            "/api/copy",
            "/api/experimental/web_search",
            "/api/experimental/web_fetch",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/messages",
            "/v1/audio/transcriptions",
        )
    ),
    {"path": "/api/me", "methods": ["POST"]},
    {"path": "/api/signout", "methods": ["POST"]},
    {"path": "/api/delete", "methods": ["DELETE"], "requires_body": True},
    {"path": "/api/user/keys/{key}", "methods": ["DELETE"]},
    {"path": "/api/blobs/{digest}", "methods": ["POST", "HEAD"]},
]

ALIASES: Routes = [
    {"path": "/api/ls", "methods": ["GET"], "upstream_path": "/api/tags"},
    {"path": "/api/serve", "methods": ["GET"], "upstream_path": "/"},
    *(
        {
            "path": path,
            "methods": ["POST"],
            "upstream_path": "/api/generate",
            "body_defaults": {"keep_alive": 0},
            "requires_body": True,
        }
        for path in ("/api/stop", "/api/unload")
    ),
]


@hookimpl
def register_routes() -> Routes:
    return OLLAMA_ROUTES + ALIASES
