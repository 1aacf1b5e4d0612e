"""Access keys: parsing, scopes, refusals the clients show, and nothing secret anywhere."""

import asyncio
import hashlib
import json

import httpx
import ollama
import openai
import pytest

from tornado_ollama_proxy.auth import (
    SCOPES,
    KeyAuthenticator,
    KeyEntryError,
    digest_of,
    load_keys,
    offered_key,
    parse_entries,
    parse_key_file,
    strength,
)
from tornado_ollama_proxy.cli import main
from tornado_ollama_proxy.errors import Rejection
from tornado_ollama_proxy.settings import Settings, load_settings

from .get_only_front import make_front
from .helpers import BlackHole, open_raw, read_log

READER_KEY = "r-" + "a" * 40  # inference only
ADMIN_KEY = "m-" + "b" * 40  # every scope
KEYS = [
    {"name": "reader", "key": READER_KEY, "scopes": ["inference"]},
    {"name": "admin", "key_sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest()},
]
MESSAGES = [{"role": "user", "content": "hi"}]


# -- key entries and key files ----------------------------------------------------------


def test_entries_take_a_bare_key_a_key_or_its_digest():
    bare, named, hashed = parse_entries(
        [
            "k1",
            {"name": "alice", "key": "k2", "scopes": ["inference"]},
            {"name": "bob", "key_sha256": hashlib.sha256(b"k3").hexdigest().upper()},
        ]
    )
    assert (bare.name, bare.digest, bare.scopes) == ("key-1", digest_of("k1"), frozenset(SCOPES))
    assert (named.name, named.digest, named.scopes) == ("alice", digest_of("k2"), frozenset({"inference"}))
    assert (hashed.name, hashed.digest) == ("bob", digest_of("k3"))


def test_an_entry_may_carry_its_share_of_a_busy_pod_and_say_it_is_shared():
    plain, weighted = parse_entries(
        [{"name": "a", "key": "x"}, {"name": "b", "key": "y", "weight": 2.5, "shared": True}]
    )
    assert (plain.weight, plain.shared, weighted.weight, weighted.shared) == (1.0, False, 2.5, True)


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"name": "a", "key": "x"}, {"name": "a", "key": "y"}], "the name 'a' is given to two keys"),
        ([{"name": "a", "key": "x", "scopes": ["admin"]}], "must be some of inference, manage, metrics"),
        ([{"name": "a", "key": "x", "scopes": []}], "must be some of"),
        ([{"name": "a", "key": "x", "scopes": "inference"}], "scopes must be a list"),
        ([{"name": "a", "key": "x", "key_sha256": "0" * 64}], "exactly one of key and key_sha256"),
        ([{"name": "a"}], "exactly one of key and key_sha256"),
        ([{"name": "a", "key_sha256": "xyz"}], "64 hexadecimal digits"),
        ([{"name": "a b", "key": "x"}], "name 'a b' must be"),
        ([{"key": "x"}], "name None must be"),
        ([{"name": "a", "key": " x"}], "without surrounding spaces"),
        ([{"name": "a", "key": "x", "role": "admin"}], "unknown field 'role'"),
        ([{"name": "a", "key": "x", "weight": 0.001}], "weight must be a number from 0.01 to 1000"),
        ([{"name": "a", "key": "x", "weight": 1001}], "weight must be a number from 0.01 to 1000"),
        ([{"name": "a", "key": "x", "weight": "3"}], "weight must be a number from 0.01 to 1000"),
        ([{"name": "a", "key": "x", "weight": True}], "weight must be a number from 0.01 to 1000"),
        ([{"name": "a", "key": "x", "shared": "yes"}], "shared must be true or false"),
        ([42], "entry 1: a key string or an object"),
    ],
)
def test_bad_entries_are_named(entries, message):
    with pytest.raises(KeyEntryError) as refused:
        parse_entries(entries)
    assert message in str(refused.value)


def test_a_key_file_holds_names_keys_digests_and_scopes():
    digest = hashlib.sha256(b"k2").hexdigest()
    text = f"# the pod's keys\n\nalice:k1\nbob:sha256:{digest}:inference,metrics\n  carol:k3:manage  \n"
    alice, bob, carol = parse_key_file(text, "keys.txt")
    assert (alice.name, alice.digest, alice.scopes) == ("alice", digest_of("k1"), frozenset(SCOPES))
    assert (bob.digest, bob.scopes) == (digest_of("k2"), frozenset({"inference", "metrics"}))
    assert (carol.digest, carol.scopes) == (digest_of("k3"), frozenset({"manage"}))


@pytest.mark.parametrize(
    "line, message",
    [
        ("alice", "expected name:key or name:sha256:<hex>"),
        ("alice:k1:inference:x", "too many ':'"),
        ("alice:sha256:nothex", "64 hexadecimal digits"),
        ("alice:k1:everything", "must be some of"),
        ("al ice:k1", "name 'al ice' must be"),
    ],
)
def test_a_bad_key_file_line_is_named_by_number(line, message):
    with pytest.raises(KeyEntryError) as refused:
        parse_key_file(f"# keys\nok:k0\n{line}\n", "keys.txt")
    assert str(refused.value).startswith("keys.txt, line 3: ") and message in str(refused.value)


def test_keys_from_settings_and_file_together_have_unique_names(tmp_path):
    (tmp_path / "keys").write_text("alice:k2\n")
    with pytest.raises(KeyEntryError, match="'alice' is given to two keys"):
        load_keys(parse_entries([{"name": "alice", "key": "k1"}]), str(tmp_path / "keys"))
    with pytest.raises(KeyEntryError, match="cannot be read: No such file or directory"):
        load_keys((), str(tmp_path / "absent"))


def test_the_offered_key_comes_from_a_bearer_token_then_x_api_key():
    assert offered_key({"Authorization": "Bearer k1", "X-API-Key": "k2"}) == "k1"
    assert offered_key({"Authorization": "bearer  k1 "}) == "k1"
    assert offered_key({"Authorization": "Basic dTpw", "X-API-Key": "k2"}) == "k2"
    assert offered_key({"Authorization": "Bearer "}) is None
    assert offered_key({}) is None


def test_settings_take_one_key_from_the_environment_and_never_echo_it():
    settings = load_settings(None, environ={"OLLAMA_PROXY_API_KEYS": "s3cret-key"})
    [key] = settings.api_keys
    assert (key.name, key.digest) == ("key-1", digest_of("s3cret-key"))
    many = load_settings(None, environ={"OLLAMA_PROXY_API_KEYS": json.dumps(KEYS)})
    assert [key.name for key in many.api_keys] == ["reader", "admin"]
    with pytest.raises(Exception) as refused:
        load_settings(
            None, environ={"OLLAMA_PROXY_API_KEYS": json.dumps([{"name": "x", "key": "s3cret", "scopes": ["root"]}])}
        )
    assert "scopes ['root'] must be some of" in str(refused.value) and "s3cret" not in str(refused.value)


# -- the authenticator on its own -------------------------------------------------------


@pytest.fixture
def authenticator(io_loop):
    return KeyAuthenticator(parse_entries(KEYS), Settings(public_paths=("/_proxy/health",), auth_failures="3/minute"))


async def test_a_key_is_known_by_its_name_and_allowed_its_scopes(authenticator):
    bearer = {"Authorization": f"Bearer {READER_KEY}"}
    assert await authenticator.authenticate(bearer, "/api/chat", "inference", "1.2.3.4") == "reader"
    assert await authenticator.authenticate({"X-API-Key": ADMIN_KEY}, "/api/pull", "manage", "1.2.3.4") == "admin"
    with pytest.raises(Rejection) as refused:
        await authenticator.authenticate(bearer, "/api/pull", "manage", "1.2.3.4")
    assert (refused.value.status, refused.value.message) == (
        403,
        "the key 'reader' may not use /api/pull: it needs the manage scope",
    )
    assert await authenticator.authenticate({}, "/_proxy/health", "metrics", "1.2.3.4") is None


async def wrong(authenticator, headers, client="6.6.6.6"):
    with pytest.raises(Rejection) as refused:
        await authenticator.authenticate(headers, "/api/chat", "inference", client)
    return refused.value


async def test_wrong_keys_are_limited_per_address_and_a_valid_key_is_always_admitted(authenticator):
    for _ in range(3):
        refused = await wrong(authenticator, {"Authorization": "Bearer guess"})
        assert (refused.status, refused.headers) == (401, {"WWW-Authenticate": 'Bearer realm="ollama-proxy"'})
    throttled = await wrong(authenticator, {"Authorization": "Bearer guess"})
    assert throttled.status == 429 and 0 < int(throttled.headers["Retry-After"]) <= 60
    assert await authenticator.authenticate({"X-API-Key": ADMIN_KEY}, "/api/chat", "inference", "6.6.6.6") == "admin"


async def test_a_missing_key_is_not_a_guess(authenticator):
    for _ in range(10):
        assert (await wrong(authenticator, {})).status == 401
    assert (await wrong(authenticator, {"X-API-Key": "guess"})).status == 401  # the first guess


async def test_every_limit_of_auth_failures_counts(io_loop):
    both = KeyAuthenticator(parse_entries(KEYS), Settings(auth_failures="5/minute; 2/hour"))
    assert [(await wrong(both, {"X-API-Key": "guess"})).status for _ in range(4)] == [401, 401, 429, 429]
    assert "2 per 1 hour" in (await wrong(both, {"X-API-Key": "guess"})).message


async def test_a_storage_outage_locks_nobody_out_and_is_logged_once(io_loop, caplog):
    down = KeyAuthenticator(
        parse_entries(KEYS), Settings(auth_failures="1/minute", rate_limit_storage="redis://127.0.0.1:1")
    )
    assert await down.authenticate({"X-API-Key": ADMIN_KEY}, "/api/chat", "inference", "1.1.1.1") == "admin"
    for _ in range(3):
        assert (await wrong(down, {"X-API-Key": "guess"})).status == 401  # not counted, not throttled
    messages = [record.getMessage() for record in caplog.records if record.name == "tornado_ollama_proxy.storage"]
    assert messages == ["rate limit storage unavailable: failed key attempts not counted"]


async def test_a_stalled_storage_delays_a_wrong_key_by_its_timeout_only(io_loop):
    hole = BlackHole()
    stalled = KeyAuthenticator(
        parse_entries(KEYS),
        Settings(rate_limit_storage=hole.url.replace("http", "redis"), rate_limit_storage_timeout=0.2),
    )
    refused = await asyncio.wait_for(wrong(stalled, {"X-API-Key": "guess"}), 5)
    hole.close()
    assert refused.status == 401


async def test_a_first_burst_of_wrong_keys_on_a_cold_redis_is_counted_once_each(redis_server):
    authenticator = KeyAuthenticator(
        parse_entries(KEYS), Settings(auth_failures="10/minute", rate_limit_storage=redis_server.url)
    )
    burst = await asyncio.gather(*(wrong(authenticator, {"X-API-Key": f"guess-{n}"}) for n in range(30)))
    assert sorted(refused.status for refused in burst) == [401] * 10 + [429] * 20


# -- through the platform, with the clients people use -----------------------------------


@pytest.fixture
def keyed_front(servers, make_proxy):
    """A proxy that requires keys, behind the front that turns everything into GET."""
    proxy = make_proxy(api_keys=parse_entries(KEYS))
    return servers.start(make_front(proxy))


async def test_the_ollama_client_uses_the_key_from_its_environment(keyed_front, fake, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", READER_KEY)
    client = ollama.AsyncClient(host=keyed_front)
    assert "llama3.2" in [m.model for m in (await client.list()).models]
    parts = [part async for part in await client.chat(model="llama3.2", messages=MESSAGES, stream=True)]
    assert parts[-1].done and "".join(part.message.content for part in parts) == "tok0 tok1 tok2 "
    with pytest.raises(ollama.ResponseError) as refused:
        await client.delete("llama3.2")
    assert refused.value.status_code == 403 and "needs the manage scope" in refused.value.error
    await client.close()
    monkeypatch.setenv("OLLAMA_API_KEY", ADMIN_KEY)
    admin = ollama.AsyncClient(host=keyed_front)
    assert (await admin.delete("llama3.2")).status == "success"
    await admin.close()
    for seen in fake.seen:  # the credential stays with the proxy
        assert "Authorization" not in seen.headers and "X-Api-Key" not in seen.headers


async def test_without_a_key_the_ollama_client_raises_a_401(keyed_front, fake, monkeypatch):
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    client = ollama.AsyncClient(host=keyed_front)
    with pytest.raises(ollama.ResponseError) as refused:
        await client.list()
    assert refused.value.status_code == 401
    assert refused.value.error == "missing or invalid API key: send Authorization: Bearer <key>"
    assert fake.seen == []
    await client.close()


async def test_the_openai_sdk_uses_its_api_key(keyed_front, fake):
    client = openai.AsyncOpenAI(base_url=keyed_front + "/v1", api_key=READER_KEY, max_retries=0)
    assert "llama3.2" in [model.id async for model in client.models.list()]
    async with await client.chat.completions.create(model="llama3.2", messages=MESSAGES, stream=True) as stream:
        assert "".join([chunk.choices[0].delta.content or "" async for chunk in stream]) == "Hello"
    denied = openai.AsyncOpenAI(base_url=keyed_front + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await denied.models.list()
    await client.close()
    await denied.close()


async def test_refusals_carry_cors_headers_and_preflights_need_no_key(servers, make_proxy, http):
    proxy = make_proxy(api_keys=parse_entries(KEYS), cors_origins=("https://chat.example.com",))
    origin = {"Origin": "https://chat.example.com"}
    refused = await http.get(proxy + "/api/tags", headers=origin)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://chat.example.com"
    assert refused.headers["www-authenticate"] == 'Bearer realm="ollama-proxy"'
    for method in ("OPTIONS", "GET"):  # a preflight the platform turned into GET too
        preflight = await http.request(
            method, proxy + "/api/chat", headers={**origin, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 204


async def test_with_cors_left_to_ollama_a_keyless_preflight_is_ollamas_to_answer(make_proxy, fake, http):
    proxy = make_proxy(api_keys=parse_entries(KEYS))  # cors_origins empty: OLLAMA_ORIGINS decides
    asks = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"}
    for method in ("OPTIONS", "GET"):  # a preflight the platform turned into GET too
        answer = await http.request(method, proxy + "/api/chat", headers=asks)
        assert (answer.status_code, answer.headers["access-control-allow-origin"]) == (204, "http://localhost:5173")
    assert [(seen.method, seen.path) for seen in fake.seen] == [("OPTIONS", "/api/chat")] * 2
    refused = await http.options(proxy + "/api/chat", headers={**asks, "Origin": "https://elsewhere.example"})
    assert (refused.status_code, refused.content) == (403, b"")  # Ollama's own refusal of the origin
    # The preflight's headers take no request past the key: Ollama answers the preflight, not the call.
    tags = await http.get(proxy + "/api/tags", headers={**asks, "Access-Control-Request-Method": "GET"})
    assert (tags.status_code, tags.content) == (204, b"")
    carrying = await http.request("GET", proxy + "/api/chat", headers=asks, content=b'{"model": "llama3.2"}')
    assert carrying.status_code == 401  # a body makes it no preflight
    scraped = await http.get(proxy + "/_proxy/metrics", headers={"X-API-Key": ADMIN_KEY})
    assert 'ollama_proxy_auth_failures_total{reason="missing"} 1.0' in scraped.text  # the one with a body


async def test_the_proxys_own_endpoints_need_the_metrics_scope_unless_public(make_proxy, http):
    proxy = make_proxy(api_keys=parse_entries([*KEYS, {"name": "prometheus", "key": "p" * 40, "scopes": ["metrics"]}]))
    assert (await http.get(proxy + "/_proxy/health")).status_code == 200  # public by default
    assert (await http.get(proxy + "/_proxy/metrics")).status_code == 401
    assert (await http.get(proxy + "/_proxy/metrics", headers={"X-API-Key": READER_KEY})).status_code == 403
    scraped = await http.get(proxy + "/_proxy/metrics", headers={"Authorization": "Bearer " + "p" * 40})
    assert scraped.status_code == 200
    assert 'ollama_proxy_auth_failures_total{reason="missing"} 1.0' in scraped.text
    assert 'ollama_proxy_auth_failures_total{reason="scope"} 1.0' in scraped.text
    closed = make_proxy(api_keys=parse_entries(KEYS), public_paths=[])
    assert (await http.get(closed + "/_proxy/health")).status_code == 401


async def test_fifty_bad_requests_from_one_address_lock_no_valid_key_out(make_proxy, http):
    """Behind Runpod every user arrives from the balancer's address: strangers' bad
    requests, and a status page polling without a key, must not lock out its users."""
    proxy = make_proxy(api_keys=parse_entries(KEYS))
    codes = []
    for n in range(25):
        codes.append((await http.get(proxy + "/api/tags")).status_code)
        codes.append((await http.get(proxy + "/api/tags", headers={"X-API-Key": f"guess-{n}"})).status_code)
    assert codes.count(401) == 25 + 10 and codes.count(429) == 15  # the 11th wrong key on is throttled
    throttled = await http.get(proxy + "/api/tags", headers={"X-API-Key": "guess"})
    assert throttled.status_code == 429 and "too many wrong keys from this address" in throttled.json()["error"]
    admitted = await http.get(proxy + "/api/tags", headers={"X-API-Key": READER_KEY})
    assert admitted.status_code == 200


async def test_the_access_record_names_the_key_and_the_limiter_counts_per_key(make_proxy, http, log_lines):
    proxy = make_proxy(api_keys=parse_entries(KEYS), rate_limit="1/minute")
    assert (await http.get(proxy + "/api/tags", headers={"X-API-Key": READER_KEY})).status_code == 200
    assert (await http.get(proxy + "/api/tags", headers={"X-API-Key": ADMIN_KEY})).status_code == 200
    assert (await http.get(proxy + "/api/tags", headers={"X-API-Key": READER_KEY})).status_code == 429
    assert (await http.get(proxy + "/api/pull", headers={"X-API-Key": READER_KEY}, params={})).status_code == 403
    assert (await http.get(proxy + "/api/tags")).status_code == 401
    records = [line for line in log_lines() if line["message"] == "request"]
    assert [(r["key"], r["status"], r["outcome"]) for r in records] == [
        ("reader", 200, "ok"),
        ("admin", 200, "ok"),
        ("reader", 429, "rate_limited"),
        ("reader", 403, "forbidden"),
        (None, 401, "unauthorized"),
    ]


async def test_unmapped_paths_need_the_manage_scope(make_proxy, http):
    proxy = make_proxy(api_keys=parse_entries(KEYS))
    assert (await http.get(proxy + "/api/brand-new", headers={"X-API-Key": READER_KEY})).status_code == 403
    assert (await http.get(proxy + "/api/brand-new", headers={"X-API-Key": ADMIN_KEY})).status_code == 404  # Ollama's


# -- start-up, and nothing secret anywhere -------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"api_keys": [{"name": "a", "key": "x1"}, {"name": "a", "key": "x2"}]},
            "api_keys: the name 'a' is given to two keys",
        ),
        (
            {"api_keys": [{"name": "a", "key": "x1", "scopes": ["all"]}]},
            "api_keys: entry 1: scopes ['all'] must be some of",
        ),
        ({"api_keys_file": "absent.txt"}, "api_keys_file: absent.txt: cannot be read: No such file or directory"),
        ({"api_keys_file": "keys.txt"}, "api_keys_file: keys.txt, line 2: expected name:key"),
    ],
)
def test_a_bad_key_setting_stops_start_up_with_one_line(tmp_path, capsys, monkeypatch, settings, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys.txt").write_text("alice:k1\nbob\n")
    (tmp_path / "settings.json").write_text(json.dumps({**settings, "plugins_dir": "."}))
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "x1" not in err and "x2" not in err


async def test_no_key_appears_in_any_log_line_of_a_run_that_used_it(launch, upstream_url, tmp_path):
    (tmp_path / "keys.txt").write_text(f"alice:{ADMIN_KEY}\n")
    env = {
        "PORT": "0",
        "OLLAMA_PROXY_HOST": "127.0.0.1",
        "OLLAMA_PROXY_UPSTREAM": upstream_url,
        "OLLAMA_PROXY_API_KEYS": READER_KEY,
        "OLLAMA_PROXY_API_KEYS_FILE": str(tmp_path / "keys.txt"),
        "OLLAMA_PROXY_LOG_HEADERS": '["Authorization", "X-API-Key"]',
    }
    process = launch(env)
    keys = await read_log(process, "access keys required")
    assert (keys["keys"], keys["names"]) == (2, ["key-1", "alice"])
    address = (await read_log(process, "listening"))["address"]
    async with httpx.AsyncClient() as http:
        for key in (READER_KEY, ADMIN_KEY, "a-wrong-one"):
            await http.get(address + "/api/tags", headers={"Authorization": f"Bearer {key}"})
            await http.get(address + "/_proxy/metrics", headers={"X-API-Key": key})
    process.terminate()
    output = process.stdout.read() + process.stderr.read()
    await asyncio.get_running_loop().run_in_executor(None, process.wait, 30)
    assert output.count('"message": "request"') == 3  # the scrapes are not logged by default
    for secret in (READER_KEY, ADMIN_KEY, digest_of(READER_KEY).hex(), digest_of(ADMIN_KEY).hex()):
        assert secret not in output


async def test_an_open_proxy_on_a_public_address_says_so_at_start_up(launch, upstream_url):
    process = launch(
        {"PORT": "0", "OLLAMA_PROXY_HOST": "0.0.0.0", "OLLAMA_PROXY_UPSTREAM": upstream_url, "OLLAMA_PROXY_OPEN": "1"}
    )
    warning = await read_log(process, "no access keys: anyone who can reach this port can use, pull and delete models")
    assert warning["level"] == "WARNING" and "api_keys" in warning["fix"]
    await read_log(process, "listening")  # up, so that it stops gracefully


def test_key_strength_is_estimated_from_length_and_alphabet():
    assert strength("0123456789abcdef" * 2) == 128  # hex
    assert strength("Zm9vYmFyYmF6cXV4") == 96  # base64
    assert strength("q" * 43) == 258  # as long as secrets.token_urlsafe(32)
    assert 19 < strength("p@ss") < 27  # printable
    [short, long, hashed] = parse_entries(
        [{"name": "short", "key": "Zm9vYmFyYmF6cXV4"}, {"name": "long", "key": "q" * 43}, KEYS[1]]
    )
    assert (short.weak, long.weak, hashed.weak) == (True, False, False)  # a digest says nothing of its key
    [from_file] = parse_key_file("bob:hunter2", "keys.txt")
    assert from_file.weak


async def test_start_up_warns_of_short_keys_and_of_keys_behind_an_untrusted_balancer(launch, upstream_url):
    process = launch(
        {
            "PORT": "0",
            "OLLAMA_PROXY_HOST": "0.0.0.0",
            "OLLAMA_PROXY_UPSTREAM": upstream_url,
            "OLLAMA_PROXY_API_KEYS": json.dumps([{"name": "bob", "key": "hunter2"}, {"name": "ci", "key": "c" * 43}]),
        }
    )
    weak = await read_log(process, "the key 'bob' is shorter than 128 bits: it can be guessed")
    assert weak["level"] == "WARNING" and "token_urlsafe" in weak["fix"]
    shared = await read_log(
        process,
        "wrong keys are counted per client address, and trusted_proxies is empty: behind a platform's "
        "balancer every user shares its address",
    )
    assert shared["level"] == "WARNING" and "trusted_proxies" in shared["fix"]
    await read_log(process, "listening")


def test_settings_name_no_key_at_start_up():
    from tornado_ollama_proxy.logs import effective_configuration

    configuration = effective_configuration(Settings(api_keys=parse_entries(KEYS)))
    assert configuration["api_keys"] == ["reader", "admin"]


async def test_a_key_sent_with_a_byte_tornado_refuses_is_not_logged(make_proxy, log_lines):
    proxy = make_proxy(api_keys=parse_entries(KEYS))
    reader, writer = await open_raw(proxy)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + READER_KEY.encode() + b"\x7f\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 400 ")  # Tornado's own refusal
    writer.close()
    lines = log_lines()
    assert any(line["message"] == "Malformed HTTP message from 127.0.0.1: Invalid header value" for line in lines)
    assert READER_KEY not in json.dumps(lines)


def test_a_short_key_is_named_at_start_up_in_this_process_too(caplog):
    from tornado_ollama_proxy.app import make_app

    with caplog.at_level("WARNING"):
        make_app(Settings(host="127.0.0.1", api_keys=parse_entries([{"name": "bob", "key": "abc123"}])))
    assert "the key 'bob' is shorter than 128 bits: it can be guessed" in caplog.messages
