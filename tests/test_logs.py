import io
import json
import logging

import pytest

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.default_plugins import json_logs
from tornado_ollama_proxy.logs import (
    MalformedInputFilter,
    RequestIdFilter,
    accept_request_id,
    bounded,
    configure_logging,
    effective_configuration,
    masked,
    request_id_var,
    sampled,
)
from tornado_ollama_proxy.plugins import make_plugin_manager
from tornado_ollama_proxy.settings import Settings


@pytest.mark.parametrize("offered", ["abc-123", "req_1.2:3@x/y+z=", "a" * 128])
def test_a_sane_client_request_id_is_kept(offered):
    assert accept_request_id(offered) == offered


@pytest.mark.parametrize("offered", [None, "", "a" * 129, "has space", "new\nline", "<script>", "é"])
def test_anything_else_gets_a_fresh_id(offered):
    fresh = accept_request_id(offered)
    assert fresh != offered and len(fresh) == 32 and int(fresh, 16) >= 0


def test_url_passwords_are_masked_everywhere():
    value = {"a": "redis://user:s3cret@host:6379/0", "b": ["rediss://:pw@h", 5], "c": "http://h/x@y"}
    assert masked(value) == {"a": "redis://user:***@host:6379/0", "b": ["rediss://:***@h", 5], "c": "http://h/x@y"}


def test_effective_configuration_is_plain_data():
    config = effective_configuration(Settings())
    assert json.loads(json.dumps(config))["upstream"] == "http://127.0.0.1:11434"


def test_sampling_silences_keeps_or_samples(monkeypatch):
    sampling = {"/_proxy/health": 0.0, "/noisy": 0.5}
    assert not sampled("/_proxy/health", sampling)
    assert sampled("/api/chat", sampling)
    monkeypatch.setattr("random.random", lambda: 0.4)
    assert sampled("/noisy", sampling)
    monkeypatch.setattr("random.random", lambda: 0.6)
    assert not sampled("/noisy", sampling)


def record(**extra):
    item = logging.LogRecord("tornado_ollama_proxy.access", logging.INFO, __file__, 1, "request", None, None)
    item.__dict__.update(extra)
    return item


def test_the_filter_adds_the_current_request_id_unless_one_is_given():
    token = request_id_var.set("rid-1")
    try:
        plain, explicit = record(), record(request_id="rid-2")
        RequestIdFilter().filter(plain)
        RequestIdFilter().filter(explicit)
    finally:
        request_id_var.reset(token)
    assert (plain.request_id, explicit.request_id) == ("rid-1", "rid-2")


def test_json_lines_carry_time_level_message_and_the_extra_fields():
    handler = json_logs.log_handler(Settings())
    line = json.loads(handler.format(record(request_id="r", status=200)))
    assert {"time", "level", "name", "message", "request_id", "status"} <= set(line)
    assert (line["level"], line["message"], line["status"]) == ("INFO", "request", 200)


def test_text_format_is_one_readable_line():
    handler = json_logs.log_handler(Settings(log_format="text"))
    line = handler.format(record(request_id="r", status=200))
    assert line.endswith(" INFO request request_id=r status=200")  # time, level, message, fields


def test_text_format_cannot_be_made_to_forge_a_field():
    handler = json_logs.log_handler(Settings(log_format="text"))
    line = handler.format(record(model="llama3.2 outcome=ok key=alice", client='a"b', status=404, stream=None))
    assert 'model="llama3.2 outcome=ok key=alice"' in line and 'client="a\\"b"' in line
    assert line.endswith("status=404 stream=None")


def test_text_format_cannot_be_made_to_forge_a_field_with_a_backslash():
    handler = json_logs.log_handler(Settings(log_format="text"))
    line = handler.format(record(model='llama3.2\\" key=mallory', key="alice", other="a\\nb", real="a\nb"))
    # The value's own backslash is doubled, so its quote stays escaped and inside the value.
    assert 'model="llama3.2\\\\\\" key=mallory" key=alice' in line
    assert "other=a\\\\nb real=a\\nb" in line  # a backslash and an n, then a newline: told apart


def test_text_and_json_lines_survive_a_lone_surrogate():
    for log_format in ("text", "json"):
        handler = json_logs.log_handler(Settings(log_format=log_format))
        handler.format(record(model="\ud800x")).encode("utf-8")  # written out, not lost


def test_tornados_line_about_a_request_it_cannot_parse_keeps_no_header_value():
    item = logging.LogRecord(
        "tornado.general",
        logging.INFO,
        __file__,
        1,
        "Malformed HTTP message from %s: %s",
        ("127.0.0.1", "Invalid header value 'Bearer s3cret\\x7f'"),
        None,
    )
    MalformedInputFilter().filter(item)
    assert item.getMessage() == "Malformed HTTP message from 127.0.0.1: Invalid header value"
    plain = record()
    MalformedInputFilter().filter(plain)
    assert plain.getMessage() == "request"


def test_text_format_cannot_be_made_to_forge_a_line():
    handler = json_logs.log_handler(Settings(log_format="text"))
    line = handler.format(record(model="llama\nINFO tornado_ollama_proxy.access request outcome=ok", key="\x1b[31mred"))
    assert "\n" not in line and "\x1b" not in line
    assert 'model="llama\\nINFO tornado_ollama_proxy.access request outcome=ok"' in line
    assert "key=\\x1b[31mred" in line


@pytest.mark.parametrize(
    "text, limit, kept",
    [("llama3.2", 256, "llama3.2"), ("a\nb\tc\x7f", 256, "a\\nb\\tc\\x7f"), ("x" * 300, 256, "x" * 255 + "…")],
)
def test_client_text_is_escaped_and_bounded(text, limit, kept):
    assert bounded(text, limit) == kept


def test_a_plugin_can_replace_the_log_handler(tmp_path):
    sink = io.StringIO()

    class Sink:
        @hookimpl
        def log_handler(self, settings):
            return logging.StreamHandler(sink)

    pm = make_plugin_manager(Settings(plugins_dir=str(tmp_path)))
    pm.register(Sink(), name="sink")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(pm, Settings(log_level="warning"))
        token = request_id_var.set("rid-9")
        logging.getLogger("x").warning("hello")
        logging.getLogger("x").info("not at warning level")
        request_id_var.reset(token)
        assert sink.getvalue() == "hello\n"
        assert root.handlers[0].filter(record()) and root.level == logging.WARNING
    finally:
        root.handlers[:], root.level = saved
