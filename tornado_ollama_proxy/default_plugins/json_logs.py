"""Log records on stdout: one JSON object per line for a log pipeline (a PaaS, a file, a
pipe), readable lines for a person at a terminal (`log_format` "auto" tells them apart)."""

import logging
import os
import sys
from typing import TextIO

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.access_line import JsonLines
from tornado_ollama_proxy.logs import LINES, escaped
from tornado_ollama_proxy.settings import Settings

# Attributes every LogRecord has; anything else was passed as `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_COLOURS = {"DEBUG": "2", "INFO": "32", "WARNING": "33", "ERROR": "31", "CRITICAL": "1;31"}


class TextFormatter(logging.Formatter):
    """Time, level, message, then `key=value` for each field; a record's `lines` below it.
    Every value is escaped: a client's text cannot start a line or drive the terminal."""

    def __init__(self, colour: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        line = escaped(super().format(record))
        if self.colour:
            level = record.levelname
            line = line.replace(f" {level} ", f" \x1b[{_COLOURS.get(level, '0')}m{level}\x1b[0m ", 1)
        lines = getattr(record, LINES, None)
        extra = {
            key: value
            for key, value in vars(record).items()
            if key not in _STANDARD and key != LINES and not (key == "request_id" and value is None)
        }
        if isinstance(lines, list):  # the fields, said again for a person: not repeated
            return "\n    ".join([line, *(escaped(str(text)) for text in lines)])
        return " ".join([line, *(f"{key}={_value(value)}" for key, value in extra.items())])


def _value(value: object) -> str:
    """A field's value, quoted when a space, `=` or quote in it could pass for another field;
    a backslash of its own is doubled first, so that no escape can be forged."""
    text = escaped(str(value).replace("\\", "\\\\"))
    if text and not any(character in text for character in ' ="'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


def readable(log_format: str, stream: TextIO) -> bool:
    """Whether lines go to a person: "text", or "auto" on a terminal."""
    return log_format == "text" or (log_format == "auto" and stream.isatty())


def coloured(stream: TextIO) -> bool:
    """Colour only for a terminal that shows it, unless NO_COLOR says otherwise (no-color.org)."""
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM", "") not in ("", "dumb")


@hookimpl
def log_handler(settings: Settings) -> logging.Handler:
    handler = logging.StreamHandler(sys.stdout)
    if readable(settings.log_format, sys.stdout):
        handler.setFormatter(TextFormatter(colour=coloured(sys.stdout)))
    else:
        handler.setFormatter(JsonLines())
    return handler
