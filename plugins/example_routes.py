"""An example plugin: every module in this folder is loaded at start-up.

A plugin implements hooks from ``tornado_ollama_proxy.hookspecs``. This one
adds a route, ``/api/models``, that answers like ``/api/tags``. Routes a plugin
registers replace built-in ones for the same path, and entries in
settings.json replace both.
"""

from tornado_ollama_proxy import hookimpl


@hookimpl
def register_routes():
    return [{"path": "/api/models", "methods": ["GET"], "upstream_path": "/api/tags"}]
