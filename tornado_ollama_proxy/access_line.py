"""The access record's line, written without a `LogRecord` while the built-in JSON
handler is the only one it goes to.

A busy proxy writes one per request, and logging's way (a `LogRecord`,
`findCaller`, python-json-logger's format field by field) cost about a tenth
of a small request's CPU. The line is the same: the formatter builds it, from
the record's fields in one dict. Every other line, and an access line bound
for any other handler (a plugin's, a test's), goes through logging as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from .logs import ACCESS_LOGGER, LINES, MalformedInputFilter, RequestIdFilter

access_log = logging.getLogger(ACCESS_LOGGER)
# The built-in handler's filters change nothing on an access record (it has its request_id).
_HARMLESS_FILTERS = (RequestIdFilter, MalformedInputFilter)


class JsonLines(JsonFormatter):
    """The built-in JSON format: time, level, logger and message, then the record's fields."""

    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level"},
            reserved_attrs=[*RESERVED_ATTRS, LINES],
        )
        self._second = -1
        self._stamp = ""

    def access_line(self, fields: dict[str, Any], now: float) -> str:
        """What `format` makes of the access logger's "request" with `fields` as its
        extra, logged at `now` (`time.time()`)."""
        second = int(now)
        if second != self._second:  # the date and time are formatted once a second
            self._second, self._stamp = second, time.strftime(self.default_time_format, self.converter(now))
        stamp = f"{self._stamp},{int((now - second) * 1000):03d}"  # logging's default_msec_format
        return self.serialize_log_record(
            {"time": stamp, "level": "INFO", "name": ACCESS_LOGGER, "message": "request", **fields}
        )


def write(fields: dict[str, Any]) -> bool:
    """Write the access line for `fields` if the built-in JSON handler alone would write it;
    False when logging must (another handler, a filter, a level that drops it)."""
    handler = _only_handler()
    if handler is None:
        return False
    formatter = handler.formatter
    assert isinstance(formatter, JsonLines)
    line = formatter.access_line(fields, time.time())
    assert handler.lock is not None
    with handler.lock:  # as logging holds it around emit
        try:
            handler.stream.write(line + handler.terminator)
            handler.flush()
        except Exception:
            handler.handleError(access_log.makeRecord(ACCESS_LOGGER, logging.INFO, "", 0, "request", (), None))
    return True


def _only_handler() -> logging.StreamHandler[Any] | None:
    """The built-in handler when it is the only one an access record reaches, and takes it as is."""
    if access_log.filters or not access_log.isEnabledFor(logging.INFO):
        return None
    handlers: list[logging.Handler] = []
    logger: logging.Logger | None = access_log
    while logger is not None:
        handlers += logger.handlers
        logger = logger.parent if logger.propagate else None
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if (
        type(handler) is not logging.StreamHandler
        or not isinstance(handler.formatter, JsonLines)
        or handler.level > logging.INFO
        or not all(isinstance(found, _HARMLESS_FILTERS) for found in handler.filters)
    ):
        return None
    return handler
