"""Built-in behaviour, shipped as ordinary plugins on the public hooks."""

DEFAULT_PLUGINS = (
    "tornado_ollama_proxy.default_plugins.ollama_routes",
    "tornado_ollama_proxy.default_plugins.json_logs",
    "tornado_ollama_proxy.default_plugins.rate_limits",
    "tornado_ollama_proxy.default_plugins.access_keys",
    "tornado_ollama_proxy.default_plugins.balancing",
)
