"""The access line written without a LogRecord: the same line python-json-logger writes,
and only while the built-in JSON handler is the only one it goes to."""

import contextlib
import io
import json
import logging

import pytest

from tornado_ollama_proxy import access_line
from tornado_ollama_proxy.access_line import JsonLines
from tornado_ollama_proxy.default_plugins import json_logs
from tornado_ollama_proxy.logs import ACCESS_LOGGER, configure_logging
from tornado_ollama_proxy.plugins import make_plugin_manager
from tornado_ollama_proxy.settings import Settings

from .helpers import open_raw, read_response, until

FIELDS = {
    "request_id": "r-1",
    "client": "127.0.0.1",
    "key": None,
    "method_in": "GET",
    "method_out": "POST",
    "path": '/api/show "quoted" \\ é ☃ \\n',
    "stream": False,
    "status": 200,
    "duration_ms": 1.234,
    "ttfb_ms": 0.5,
    "tokens_per_s": 1e-7,
    "headers": {"User-Agent": "curl/8", "X-Empty": ""},
}


@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.9996, 1_700_000_059.001, 1_700_003_600.5])
def test_the_line_is_the_one_the_formatter_makes_of_a_log_record(created):
    formatter = JsonLines()
    record = logging.getLogger(ACCESS_LOGGER).makeRecord(
        ACCESS_LOGGER, logging.INFO, "proxy.py", 1, "request", (), None, extra=FIELDS
    )
    record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
    formatter.access_line(FIELDS, created - 1)  # the second before
    formatter.access_line(FIELDS, float(int(created)))  # the second's start: formatted and kept for the next
    assert formatter.access_line(FIELDS, created) == formatter.format(record)


@contextlib.contextmanager
def production():
    """The logging set-up the proxy starts with (the built-in handler alone on the root),
    writing into a string; put back as it was (pytest's own handlers too) at the end."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    sink = io.StringIO()
    try:
        configure_logging(make_plugin_manager(Settings()), Settings())
        root.handlers[0].setStream(sink)  # type: ignore[attr-defined]
        yield sink
    finally:
        root.handlers[:], root.level = saved


def test_the_built_in_handler_alone_gets_the_line_written_directly():
    with production() as sink:
        assert access_line.write(FIELDS)
    assert json.loads(sink.getvalue()) == {
        "time": json.loads(sink.getvalue())["time"],
        "level": "INFO",
        "name": ACCESS_LOGGER,
        "message": "request",
        **FIELDS,
    }


@pytest.mark.parametrize(
    "change",
    [
        "another handler",
        "text format",
        "a level above info",
        "a handler level above info",
        "a filter on the access logger",
        "a filter of its own on the handler",
        "a handler of another class",
        "no propagation, no handler",
    ],
)
def test_any_other_set_up_leaves_the_line_to_logging(change):
    with production() as sink:
        _change_and_write(change, sink)
    assert sink.getvalue() == ""


def _change_and_write(change, sink):
    root = logging.getLogger()
    handler = root.handlers[0]
    access = logging.getLogger(ACCESS_LOGGER)
    undo = []
    if change == "another handler":
        root.addHandler(logging.NullHandler())
    elif change == "text format":
        handler.setFormatter(json_logs.TextFormatter())
    elif change == "a level above info":
        root.setLevel(logging.WARNING)
    elif change == "a handler level above info":
        handler.setLevel(logging.WARNING)
    elif change == "a filter on the access logger":
        access.addFilter(logging.Filter())
        undo.append(lambda: access.filters.clear())
    elif change == "a filter of its own on the handler":
        handler.addFilter(logging.Filter())
    elif change == "a handler of another class":
        root.handlers[:] = [type("Plugin", (logging.StreamHandler,), {})(sink)]
        root.handlers[0].setFormatter(JsonLines())
    else:
        access.propagate = False
        undo.append(lambda: setattr(access, "propagate", True))
    try:
        assert not access_line.write(FIELDS)
    finally:
        for step in undo:
            step()


def test_a_stream_that_fails_is_reported_as_logging_reports_it(capsys, monkeypatch):
    def refuse(_):
        raise OSError("disk full")

    with production() as sink:
        monkeypatch.setattr(sink, "write", refuse)
        assert access_line.write(FIELDS)
    assert "--- Logging error ---" in capsys.readouterr().err


async def test_a_proxy_writes_each_request_s_line_directly(proxy_url):
    with production() as sink:
        reader, writer = await open_raw(proxy_url)
        writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Request-ID: tags-1\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
        writer.close()
        await until(lambda: "tags-1" in sink.getvalue())
    line = json.loads(sink.getvalue().splitlines()[-1])
    assert list(line)[:5] == ["time", "level", "name", "message", "request_id"]
    assert (line["request_id"], line["route"], line["status"], line["outcome"]) == ("tags-1", "/api/tags", 200, "ok")
