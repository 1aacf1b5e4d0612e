"""In a real browser (headless Chromium): the status page renders what is in flight, and
a browser chat app on another origin streams through the GET-converting front."""

import asyncio
import json
import re
import shutil
from html import unescape

import pytest
from tornado.web import Application, RequestHandler

from tornado_ollama_proxy.auth import parse_entries

from .helpers import send_json, until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def browse(tmp_path):
    """Open a URL in headless Chromium; its DOM once the page's scripts had `budget_ms`
    of (virtual) time, or a screenshot written to `screenshot`."""
    assert CHROMIUM is not None, "Chromium is needed: apt-get install -y chromium (the README's test command does)"

    async def run(url, *, budget_ms=2500, screenshot=None):
        output = [f"--screenshot={screenshot}", "--window-size=1100,900"] if screenshot else ["--dump-dom"]
        process = await asyncio.create_subprocess_exec(
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # tests may run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}",
            f"--virtual-time-budget={budget_ms}",
            *output,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()[-2000:]
        return out.decode()

    return run


def cells(dom, table_id):
    """The text of each row's cells in a table of the rendered page."""
    table = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert table is not None, dom[:2000]
    return [
        [unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    ]


async def test_the_status_page_shows_the_streams_in_flight(make_proxy, nginx, fake, browse, tmp_path, http):
    proxy = make_proxy()
    front = nginx(proxy, as_get=True)
    done = await http.post(proxy + "/api/generate", json={"model": "llama3.2", "prompt": "why", "stream": False})
    assert done.status_code == 200
    streams = []
    for model in ("stall", "silent"):
        _, writer = await send_json(proxy, b"POST", b"/api/chat", {"model": model, "messages": MESSAGES})
        streams.append(writer)
    await until(lambda: len(fake.seen) == 3)

    dom = await browse(front + "/_proxy/")
    rows = cells(dom, "in-flight")
    assert sorted((row[0], row[1], row[2]) for row in rows) == [
        ("/api/chat", "silent", "127.0.0.1"),
        ("/api/chat", "stall", "127.0.0.1"),
    ]
    [model] = cells(dom, "models")
    assert model[:4] == ["llama3.2:latest", "1", "2", "3"]  # requests, prompt and completion tokens
    assert "Ollama 0.32.0" in dom and "<path d=" in dom  # the upstream, and the chart drawn
    screenshot = tmp_path / "status-page.png"
    await browse(front + "/_proxy/", screenshot=screenshot)
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 10_000
    for writer in streams:
        writer.close()


async def test_without_a_key_the_page_asks_for_one_once_and_stops_polling(make_proxy, browse, http):
    proxy = make_proxy(api_keys=parse_entries([{"name": "ops", "key": "o" * 43, "scopes": ["metrics"]}]))
    dom = await browse(proxy + "/_proxy/", budget_ms=10_000)  # five polling periods
    assert 'id="key" style="display: block;"' in dom
    metrics = (await http.get(proxy + "/_proxy/metrics", headers={"X-API-Key": "o" * 43})).text
    # One refused poll, and no favicon request: nothing a stranger's open tab would repeat.
    assert 'ollama_proxy_auth_failures_total{reason="missing"} 1.0' in metrics


# The page's load event waits for the image, which the page's server sends once the app
# says it is done: Chromium dumps the page after its end, however slow the machine.
CHAT_APP = """<!doctype html><meta charset="utf-8"><div id="out"></div><div id="state">waiting</div>
<img src="/settled" alt="">
<script>
(async () => {
  const state = document.getElementById("state");
  try {
    const answer = await fetch(%(url)s, {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: "llama3.2", messages: [{role: "user", content: "hi"}], options: {num_predict: 4}}),
    });
    const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split("\\n");
      buffer = lines.pop();
      for (const line of lines.filter(Boolean)) {
        const part = JSON.parse(line);
        document.getElementById("out").textContent += part.message.content + "|";
      }
    }
    state.textContent = "done " + answer.status;
  } catch (error) {
    state.textContent = "refused: " + error.name;
  }
  await fetch("/settled", {method: "POST"});
})();
</script>"""


class ChatApp(RequestHandler):
    """Serves the chat app's page, calling whichever front `target["url"]` names."""

    def initialize(self, target):
        self.target = target

    def get(self):
        self.target["settled"] = asyncio.Event()
        self.finish(CHAT_APP % {"url": json.dumps(self.target["url"] + "/api/chat")})


class Settled(RequestHandler):
    """The image the page's load waits for (GET), sent once the app says it is done (POST)."""

    def initialize(self, target):
        self.target = target

    async def get(self):
        await asyncio.wait_for(self.target["settled"].wait(), 30)
        self.set_status(204)

    def post(self):
        self.target["settled"].set()


async def test_a_browser_chat_app_on_another_origin_streams_through_the_front(servers, make_proxy, nginx, browse, fake):
    # The app's origin is 127.0.0.2: Ollama itself allows only localhost origins.
    target = {}
    page = servers.start(
        Application([(r"/", ChatApp, {"target": target}), (r"/settled", Settled, {"target": target})]), host="127.0.0.2"
    )
    target["url"] = nginx(make_proxy(), as_get=True)
    dom = await browse(page)
    assert 'id="state">refused: TypeError' in dom  # Ollama refuses the origin (403), so the browser does
    assert '<div id="out"></div>' in dom

    target["url"] = nginx(make_proxy(cors_origins=(page.rstrip("/"),)), as_get=True)
    dom = await browse(page)
    assert 'id="state">done 200' in dom
    assert re.search(r'<div id="out">(.*?)</div>', dom).group(1) == "tok0 |tok1 |tok2 |tok3 ||"


# Two answers' headers, those a browser app may read (CORS hides the others).
LIMITS_APP = """<!doctype html><meta charset="utf-8"><div id="seen"></div>
<img src="/settled" alt="">
<script>
(async () => {
  const seen = [];
  for (let n = 0; n < 2; n++) {
    const answer = await fetch(%(url)s);
    seen.push([answer.status, Object.fromEntries(answer.headers)]);
  }
  document.getElementById("seen").textContent = JSON.stringify(seen);
  await fetch("/settled", {method: "POST"});
})();
</script>"""


class LimitsApp(ChatApp):
    def get(self):
        self.target["settled"] = asyncio.Event()
        self.finish(LIMITS_APP % {"url": json.dumps(self.target["url"] + "/api/tags")})


async def test_a_browser_app_on_another_origin_reads_its_rate_limits(servers, make_proxy, browse, clock):
    target = {}
    page = servers.start(
        Application([(r"/", LimitsApp, {"target": target}), (r"/settled", Settled, {"target": target})]),
        host="127.0.0.2",
    )
    target["url"] = make_proxy(cors_origins=(page.rstrip("/"),), rate_limit="1/minute")
    dom = await browse(page)
    seen = json.loads(unescape(re.search(r'<div id="seen">(.*?)</div>', dom).group(1)))
    limits = {
        "ratelimit-limit": "1",
        "ratelimit-remaining": "0",
        "ratelimit-reset": "60",
        "x-ratelimit-limit-requests": "1",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert [
        (status, {name: value for name, value in headers.items() if "ratelimit" in name or name == "retry-after"})
        for status, headers in seen
    ] == [(200, limits), (429, {"retry-after": "60", **limits})]


async def test_the_status_page_shows_the_pods_their_state_and_conflicts(pods, make_proxy, browse, http):
    started = pods(2)
    started[0][0].loaded.add("llama3.2")
    started[1][0].digests["llama3.2"] = "other"
    upstreams = [{"name": "gpu-a", "url": started[0][1], "slots": 4}, {"name": "gpu-b", "url": started[1][1]}]
    proxy = make_proxy(upstreams=upstreams, pool_max_fails=1, pool_eject_seconds=600)
    await proxy.proxy.pool.refresh_all()
    await started[1].kill()
    await http.get(proxy + "/api/version", headers={"X-Ollama-Upstream": "gpu-b"})  # fails: ejected
    figures = (await http.get(proxy + "/_proxy/status")).json()
    assert [(pod["name"], pod["state"]) for pod in figures["upstreams"]] == [("gpu-a", "healthy"), ("gpu-b", "ejected")]
    assert figures["conflicts"] == {"llama3.2:latest": ["gpu-a", "gpu-b"]}
    dom = await browse(proxy + "/_proxy/")
    rows = cells(dom, "pods")
    assert [row[:2] for row in rows] == [["gpu-a", "healthy"], ["gpu-b", rows[1][1]]]
    assert rows[1][1].startswith("ejected for ") and rows[0][3] == "0 / 4" and rows[0][4] == "llama3.2:latest"
    assert "refused the connection" in rows[1][7]
    assert "different digests under one name, requests go to the newest: llama3.2:latest (gpu-a, gpu-b)" in dom


async def test_the_status_page_shows_who_waits_for_a_slot(pods, make_proxy, browse, http):
    [pod] = pods(1)
    proxy = make_proxy(upstreams=[{"name": "gpu", "url": pod.url, "slots": 1}])
    await proxy.proxy.pool.refresh_all()
    holder = {"model": "stall", "messages": [{"role": "user", "content": "holder"}]}
    reader, writer = await send_json(proxy, b"POST", b"/api/chat", holder)
    await reader.readuntil(b"\r\n\r\n")
    chat = {"model": "llama3.2", "messages": MESSAGES, "stream": False}
    waiting = [asyncio.ensure_future(http.post(proxy + "/api/chat", json=chat)) for _ in range(2)]
    await until(lambda: proxy.proxy.queue.size == 2)
    dom = await browse(proxy + "/_proxy/")
    [row] = cells(dom, "queues")
    assert row[:2] == ["address:127.0.0.1", "2"] and row[2].endswith("s")
    writer.close()
    assert [answer.status_code for answer in await asyncio.gather(*waiting)] == [200, 200]
