"""Log records: request ids, access records, masking, and the logging set-up.

Every record written while a request is handled carries its ``request_id``:
a contextvar set at the start of the request is inherited by every task the
request starts (the upstream fetch, the relay), and a filter copies it onto
the record.
"""

import contextvars
import logging
import random
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import pluggy

from .settings import Settings, without_password

REQUEST_ID_HEADER = "X-Request-ID"
ACCESS_LOGGER = "tornado_ollama_proxy.access"
# A record's `lines`: the same as its fields, written for a person (the start-up summary);
# readable lines show them, JSON lines leave them out.
LINES = "lines"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Headers whose values are never logged, whatever log_headers says (more come from
# the settings and the authenticator: `Proxy.secret_headers`).
CREDENTIALS = frozenset({"authorization", "x-api-key", "proxy-authorization", "cookie"})


def accept_request_id(offered: str | None) -> str:
    """The client's X-Request-ID when it is sane (bounded, safe characters), else a new one."""
    if offered is not None and _SANE_REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


def escaped(text: str) -> str:
    """`text` with control characters (newline, escape…) and lone surrogates written as
    escapes: a value a client chose cannot start a line of its own, drive a terminal,
    or fail the line's encoding."""
    text = _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bounded(text: str, limit: int) -> str:
    """A client's `text` for a record: escaped, and cut to `limit` characters."""
    text = escaped(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class MalformedInputFilter(logging.Filter):
    """Tornado logs a request it cannot parse with the offending text, which may be a
    header carrying a key ("Invalid header value 'Bearer …'"): only what is wrong stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "tornado.general" and record.msg == _MALFORMED and isinstance(record.args, tuple):
            peer, error = record.args
            record.args = (peer, re.split("[\"']", str(error), maxsplit=1)[0].rstrip(" :"))
        return True


_MALFORMED = "Malformed HTTP message from %s: %s"


def masked(value: Any) -> Any:
    """`value` with URL passwords replaced by ``***``, recursively, for logging."""
    if isinstance(value, str):
        return without_password(value)
    if isinstance(value, Mapping):
        return {key: masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    return value


def effective_configuration(settings: Settings) -> dict[str, Any]:
    """The settings as start-up logs them: passwords in URLs masked, keys by name only."""
    configuration: dict[str, Any] = masked(asdict(settings))
    configuration["api_keys"] = [key.name for key in settings.api_keys]
    for pod in configuration["upstreams"]:  # a pod's headers may carry its key
        pod["headers"] = [(name, "***") for name, _ in pod["headers"]]
    return configuration


def sampled(path: str, sampling: Mapping[str, float]) -> bool:
    """Whether an access record for `path` is written (rate 0 silences it, 1 keeps all)."""
    rate = sampling.get(path, 1.0)
    return rate >= 1.0 or random.random() < rate


def configure_logging(pm: pluggy.PluginManager, settings: Settings) -> None:
    """Send every record through the handler the plugins supply, tagged with the request id."""
    handler = pm.hook.log_handler(settings=settings)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(MalformedInputFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
