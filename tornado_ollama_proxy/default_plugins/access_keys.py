"""The built-in authenticator: the access keys of the settings and the key file, or on a
public address without any, a generated one."""

import logging
from urllib.parse import urlsplit

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.auth import SCOPES, ApiKey, KeyAuthenticator, KeyEntryError, digest_of, load_keys, strength
from tornado_ollama_proxy.clients import is_loopback
from tornado_ollama_proxy.generated_key import NAME, GeneratedKey, GeneratedKeyError, key_path, load_or_create
from tornado_ollama_proxy.settings import Settings, SettingsError
from tornado_ollama_proxy.token_windows import windows_of

log = logging.getLogger("tornado_ollama_proxy.auth")


@hookimpl
def authenticate(settings: Settings) -> KeyAuthenticator | None:
    keys = configured_keys(settings)
    generated = None
    if not keys and settings.public:  # none configured, or a key file of comments only
        generated = _generated(settings)
        # One key for everyone who was given it: shared, so each address waits in its own line.
        keys = (ApiKey(NAME, digest_of(generated.key), frozenset(SCOPES), strength(generated.key), shared=True),)
    if not keys:
        return None
    authenticator = KeyAuthenticator(keys, settings, generated)
    log.info("access keys required", extra={"keys": len(keys), "names": authenticator.names})
    for key in keys:
        if key.weak:
            log.warning(
                f"the key {key.name!r} is shorter than 128 bits: it can be guessed",
                extra={"fix": "python -c 'import secrets; print(secrets.token_urlsafe(32))'"},
            )
    if any(windows_of(key) for key in keys):
        _check_quota_storage(settings)
    if settings.worker_count > 1 and any(key.max_concurrent is not None for key in keys):
        log.warning(
            f"max_concurrent is counted by each worker: with {settings.worker_count} workers a key may run that"
            " many times as many generations at once"
        )
    if not settings.trusted_proxies and not is_loopback(settings.host):
        log.warning(
            "wrong keys are counted per client address, and trusted_proxies is empty: behind a platform's "
            "balancer every user shares its address",
            extra={"fix": "set trusted_proxies to the networks the balancer reaches this pod from (see README)"},
        )
    return authenticator


def _check_quota_storage(settings: Settings) -> None:
    """Token quotas keep their windows in memory or in Redis itself (a sentinel or a
    cluster URL is not one they can use); in memory, each worker has its own."""
    scheme = urlsplit(settings.rate_limit_storage).scheme
    if scheme not in ("memory", "redis", "rediss"):
        raise SettingsError(
            f"rate_limit_storage: token quotas keep their windows in memory:// or redis:// (rediss://), not {scheme}://"
        )
    if scheme == "memory" and settings.worker_count > 1:
        log.warning(
            f"token quotas in memory are each worker's own: with {settings.worker_count} workers a key may use"
            " that many times its quota",
            extra={"fix": "set rate_limit_storage to a Redis URL (see README)"},
        )


def configured_keys(settings: Settings) -> tuple[ApiKey, ...]:
    """The keys the settings give, in them and in the key file (`SettingsError` for a bad file)."""
    try:
        return load_keys(settings.api_keys, settings.api_keys_file)
    except KeyEntryError as error:
        raise SettingsError(f"api_keys_file: {error}") from None


def _generated(settings: Settings) -> GeneratedKey:
    try:
        return load_or_create(key_path(settings.generated_key_file))
    except GeneratedKeyError as error:
        raise SettingsError(str(error)) from None
