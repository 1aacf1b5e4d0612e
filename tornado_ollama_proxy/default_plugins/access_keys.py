"""The built-in authenticator: the access keys of the settings and the key file."""

import logging

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.auth import KeyAuthenticator, KeyEntryError, load_keys
from tornado_ollama_proxy.settings import Settings, SettingsError

log = logging.getLogger("tornado_ollama_proxy.auth")


@hookimpl
def authenticate(settings: Settings) -> KeyAuthenticator | None:
    try:
        keys = load_keys(settings.api_keys, settings.api_keys_file)
    except KeyEntryError as error:
        raise SettingsError(f"api_keys_file: {error}") from None
    if not keys:
        return None
    authenticator = KeyAuthenticator(keys, settings.public_paths, settings.auth_failures, settings.rate_limit_storage)
    log.info("access keys required", extra={"keys": len(keys), "names": authenticator.names})
    return authenticator
