"""The status page and its figures: what is in flight, usage per model, totals."""

import asyncio
import base64
import hashlib
import os
import re

import pytest

from tornado_ollama_proxy import status
from tornado_ollama_proxy.auth import parse_entries
from tornado_ollama_proxy.record import AccessRecord
from tornado_ollama_proxy.status import BUCKET_SECONDS, CHART_SECONDS, StatusBoard

from .helpers import send_json, until

MESSAGES = [{"role": "user", "content": "hi"}]


async def start_stream(proxy, model, key=None):
    """A streamed chat that stays open: the stand-in's `stall` sends one line, `silent` none."""
    auth = b"X-API-Key: %s\r\n" % key.encode() if key else b""
    return await send_json(proxy, b"GET", b"/api/chat", {"model": model, "messages": MESSAGES}, auth)


async def test_the_figures_list_requests_in_flight_and_usage_since_start(make_proxy, http, fake, upstream_url):
    proxy = make_proxy(rate_limit_routes={"/api/show": "1/minute"})
    for _ in range(3):
        answer = await http.request("GET", proxy + "/api/chat", json={"model": "llama3.2", "messages": MESSAGES})
        assert answer.status_code == 200
    assert (await http.post(proxy + "/api/chat", json={"model": "nope", "messages": MESSAGES})).status_code == 404
    shows = [(await http.post(proxy + "/api/show", json={"model": "llama3.2"})).status_code for _ in range(2)]
    assert shows == [200, 429]
    (_, stalled), (_, silent) = await start_stream(proxy, "stall"), await start_stream(proxy, "silent")
    await until(lambda: len(fake.seen) == 7)  # both streams reached the stand-in

    figures = (await http.get(proxy + "/_proxy/status")).json()
    rows = sorted(figures["in_flight"], key=lambda row: row["model"])
    assert [(row["route"], row["method"], row["model"], row["client"]) for row in rows] == [
        ("/api/chat", "POST", "silent", "127.0.0.1"),
        ("/api/chat", "POST", "stall", "127.0.0.1"),
    ]
    assert [row["chunks"] for row in rows] == [0, 1] and rows[1]["bytes_out"] > 0 and rows[0]["age_s"] >= 0
    assert figures["upstream"] == {"status": "ok", "upstream": "default", "upstream_version": "0.32.0"}
    assert figures["totals"] == {
        "requests": 6,
        "errors": 2,
        "rate_limited": 1,
        "client_gone": 0,
        "unauthorized": 0,
        "forbidden": 0,
    }
    assert figures["corrections"] == {"GET → POST": 3}
    assert figures["models"] == {
        "llama3.2:latest": {
            "requests": 3,
            "errors": 0,
            "prompt_tokens": 3 * 2,  # the stand-in: a token per word, plus one
            "completion_tokens": 3 * 3,
            "median_tokens_per_s": 50.0,
            "median_ttft_s": figures["models"]["llama3.2:latest"]["median_ttft_s"],
        },
        "other": {
            "requests": 1,
            "errors": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "median_tokens_per_s": None,
            "median_ttft_s": None,
        },
    }
    assert 0 < figures["models"]["llama3.2:latest"]["median_ttft_s"] < 5
    chart = figures["tokens_per_s"]
    assert len(chart) == CHART_SECONDS // BUCKET_SECONDS
    # The three generations' 9 tokens, in the last 10 s (or two, across a boundary).
    assert sum(point["tokens_per_s"] for point in chart[-2:]) == 9 / BUCKET_SECONDS
    assert chart[0]["tokens_per_s"] == 0
    assert figures["worker"] == {"pid": os.getpid(), "workers": 1}
    assert figures["uptime_s"] >= 0

    stalled.close()
    silent.close()
    for _ in range(2):
        await asyncio.wait_for(fake.disconnected.get(), 5)
    figures = (await http.get(proxy + "/_proxy/status")).json()
    assert figures["in_flight"] == [] and figures["totals"]["client_gone"] == 2
    assert figures["totals"]["requests"] == 8  # its own figures are not requests to Ollama


async def test_the_page_is_one_self_contained_file(make_proxy, http):
    proxy = make_proxy()
    for path in ("/_proxy/", "/_proxy"):
        page = await http.get(proxy + path)
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'const STATUS_URL = "/_proxy/status";' in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # nothing loaded from elsewhere
    assert '<meta name="viewport"' in page.text  # readable on a phone
    policy = dict(directive.split(" ", 1) for directive in page.headers["content-security-policy"].split("; "))
    [script] = re.findall(r"<script>(.*?)</script>", page.text, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'"  # that script and no other: nothing injected runs
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert (policy["frame-ancestors"], policy["base-uri"], policy["form-action"]) == ("'none'",) * 3


async def test_client_addresses_are_shown_to_this_machine_and_to_metrics_keys_only(make_proxy, http):
    open_proxy = make_proxy(trusted_proxies=["127.0.0.1"])
    reader, writer = await start_stream(open_proxy, "stall")
    await reader.readuntil(b"\r\n\r\n")
    [here] = (await http.get(open_proxy + "/_proxy/status")).json()["in_flight"]
    assert here["client"] == "127.0.0.1"
    # Through a tunnel or a front that names a remote client, no address is shown.
    remote = await http.get(open_proxy + "/_proxy/status", headers={"X-Forwarded-For": "203.0.113.7"})
    [there] = remote.json()["in_flight"]
    assert there["client"] is None and there["route"] == "/api/chat"
    writer.close()


async def test_the_page_moves_or_is_turned_off(make_proxy, http):
    moved = make_proxy(status_path="/dash/")
    assert 'const STATUS_URL = "/dash/status";' in (await http.get(moved + "/dash")).text
    assert (await http.get(moved + "/dash/status")).json()["in_flight"] == []
    assert (await http.get(moved + "/_proxy/status")).status_code == 404
    off = make_proxy(status_path=None)
    for path in ("/_proxy/", "/_proxy/status"):
        answer = await http.get(off + path)
        assert answer.status_code == 404 and "is not an endpoint of this proxy" in answer.json()["error"]


async def test_with_keys_the_figures_need_the_metrics_scope(make_proxy, http):
    keys = [
        {"name": "reader", "key": "r" * 40, "scopes": ["inference"]},
        {"name": "ops", "key": "o" * 40, "scopes": ["metrics"]},
    ]
    proxy = make_proxy(api_keys=parse_entries(keys))
    assert (await http.get(proxy + "/_proxy/")).status_code == 200  # the page holds no figures
    assert (await http.get(proxy + "/_proxy/status")).status_code == 401
    assert (await http.get(proxy + "/_proxy/status", headers={"X-API-Key": "r" * 40})).status_code == 403
    assert (await http.get(proxy + "/api/tags")).status_code == 401
    assert (await http.post(proxy + "/api/pull", headers={"X-API-Key": "r" * 40})).status_code == 403
    reader, writer = await start_stream(proxy, "stall", key="r" * 40)
    await reader.readuntil(b"\r\n\r\n")
    figures = await http.get(proxy + "/_proxy/status", headers={"Authorization": "Bearer " + "o" * 40})
    [row] = figures.json()["in_flight"]
    assert (row["key"], row["model"]) == ("reader", "stall")  # who uses the pod, by key name
    assert figures.json()["totals"]["unauthorized"] == 1 and figures.json()["totals"]["forbidden"] == 1
    writer.close()


async def test_with_several_workers_the_figures_say_they_are_one_workers(make_proxy, http):
    proxy = make_proxy(workers=4)
    assert (await http.get(proxy + "/_proxy/status")).json()["worker"] == {"pid": os.getpid(), "workers": 4}


# -- the board on its own ---------------------------------------------------------------------


def ended(completion_tokens=None, **fields):
    record = AccessRecord("id", "127.0.0.1", "POST", "/api/generate", "/api/generate")
    record.status, record.outcome, record.completion_tokens = 200, "ok", completion_tokens
    for name, value in fields.items():
        setattr(record, name, value)
    return record


@pytest.fixture
def clock(monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(status.time, "time", lambda: now[0])
    return now


def test_the_chart_counts_tokens_per_10_s_for_10_minutes(clock):
    board = StatusBoard(workers=1)
    board.add(ended(100), "m")
    clock[0] += 3
    board.add(ended(50), "m")
    clock[0] += 20
    board.add(ended(30), "m")
    board.add(ended(None), "m")  # reported nothing: nothing to chart
    chart = board.chart()
    assert [point["tokens_per_s"] for point in chart[-3:]] == [15.0, 0.0, 3.0]
    assert [point["seconds_ago"] for point in chart[-3:]] == [23.0, 13.0, 3.0]  # since each 10 s began
    clock[0] += CHART_SECONDS - 15
    board.add(ended(10), "m")
    assert len(board.buckets) == 2  # the first 10 s fell out of the window
    assert sum(point["tokens_per_s"] for point in board.chart()) == 4.0


def test_medians_and_errors_per_model():
    board = StatusBoard(workers=1)
    for speed, ttft in ((10.0, 100.0), (30.0, 300.0), (20.0, 200.0)):
        board.add(ended(5, tokens_per_s=speed, ttft_ms=ttft, prompt_tokens=2), "m")
    board.add(ended(status=200, upstream_status=404), "m")  # told in-band after a heartbeat
    board.add(ended(outcome="timeout"), "m")
    summary = board.snapshot()["models"]["m"]
    assert summary == {
        "requests": 5,
        "errors": 2,
        "prompt_tokens": 6,
        "completion_tokens": 15,
        "median_tokens_per_s": 20.0,
        "median_ttft_s": 0.2,
    }
