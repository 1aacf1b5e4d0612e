"""Log records as one JSON object per line on stdout (or key=value text for a terminal)."""

import logging
import sys

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.access_line import JsonLines
from tornado_ollama_proxy.logs import escaped
from tornado_ollama_proxy.settings import Settings

# Attributes every LogRecord has; anything else was passed as `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = escaped(super().format(record))
        extra = {key: value for key, value in vars(record).items() if key not in _STANDARD}
        return " ".join([line, *(f"{key}={_value(value)}" for key, value in extra.items())])


def _value(value: object) -> str:
    """A field's value, quoted when a space, `=` or quote in it could pass for another field."""
    text = escaped(str(value))
    if text and not any(character in text for character in ' ="'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


@hookimpl
def log_handler(settings: Settings) -> logging.Handler:
    handler = logging.StreamHandler(sys.stdout)
    if settings.log_format == "text":
        handler.setFormatter(TextFormatter())
    else:
        handler.setFormatter(JsonLines())
    return handler
