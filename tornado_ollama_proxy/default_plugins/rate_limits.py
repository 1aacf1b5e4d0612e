"""The built-in limiter: ``limits``' algorithms and storages, configured by the settings."""

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.ratelimit import LimitsRateLimiter
from tornado_ollama_proxy.settings import Settings


@hookimpl
def rate_limiter(settings: Settings) -> LimitsRateLimiter | None:
    configured = (
        settings.rate_limit,
        settings.rate_limit_routes,
        settings.concurrency_per_client,
        settings.concurrency_total,
    )
    return LimitsRateLimiter(settings) if any(configured) else None
