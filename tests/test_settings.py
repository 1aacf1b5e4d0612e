import json
from dataclasses import fields

import pytest

from tornado_ollama_proxy.routes import Route
from tornado_ollama_proxy.settings import SCHEMA, Settings, SettingsError, load_settings


@pytest.fixture
def write_settings(tmp_path):
    def write(data):
        path = tmp_path / "settings.json"
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        return str(path)

    return write


def test_defaults_listen_everywhere_on_8000_in_front_of_local_ollama(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, environ={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.upstream) == ("0.0.0.0", 8000, "http://127.0.0.1:11434")
    assert settings.max_body_size is None and settings.unmapped_paths == "forward"


def test_shipped_settings_file_is_valid_and_matches_the_defaults():
    shipped = load_settings("settings.json", environ={})
    defaults = Settings()
    for key in Settings.__dataclass_fields__:
        if key != "plugins_dir":
            assert getattr(shipped, key) == getattr(defaults, key), key
    assert shipped.plugins_dir == "plugins"
    with open("settings.json") as file:
        # Every key but upstreams: one source names the pool by upstream or by upstreams.
        assert set(json.load(file)) == set(Settings.__dataclass_fields__) - {"upstreams"}


def test_settings_json_in_the_working_directory_is_read_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.json").write_text('{"port": 9000}')
    assert load_settings(None, environ={}).port == 9000


def test_precedence_is_defaults_file_environment_flags(write_settings):
    path = write_settings({"port": 9001, "upstream": "http://10.0.0.5:11434", "idle_timeout": 30})
    environ = {"PORT": "9002", "OLLAMA_PROXY_UPSTREAM": "http://gpu:11434", "OLLAMA_PROXY_IDLE_TIMEOUT": "45.5"}
    settings = load_settings(path, environ=environ, flags={"upstream": "https://ollama.example:443/base/"})
    assert settings.port == 9002
    assert settings.idle_timeout == 45.5
    assert settings.upstream == "https://ollama.example:443/base/"
    [pod] = settings.pods
    assert (pod.name, pod.base, pod.host) == ("default", "https://ollama.example:443/base", "ollama.example:443")
    assert settings.connect_timeout == 10.0


def test_ollama_proxy_port_wins_over_paas_port():
    assert load_settings(None, environ={"PORT": "1", "OLLAMA_PROXY_PORT": "2"}, flags={}).port == 2


def test_environment_takes_json_for_structured_keys():
    settings = load_settings(
        None,
        environ={
            "OLLAMA_PROXY_ROUTES": '[{"path": "/x", "methods": ["POST"]}]',
            "OLLAMA_PROXY_MAX_BODY_SIZE": "1024",
            "OLLAMA_PROXY_UNMAPPED_PATHS": "reject",
            "OLLAMA_PROXY_SHUTDOWN_GRACE": "0",
            "OLLAMA_PROXY_CORS_ORIGINS": '["https://Chat.Example.com", "*"]',
            "OLLAMA_PROXY_METRICS_PATH": "null",
            "OLLAMA_PROXY_HEALTH_PATH": "/healthz",
            "OLLAMA_PROXY_ACCESS_LOG_SAMPLING": '{"/api/tags": 0.25}',
            "OLLAMA_PROXY_LOG_HEADERS": '["User-Agent"]',
        },
    )
    assert (settings.metrics_path, settings.health_path) == (None, "/healthz")
    assert settings.access_log_sampling == {"/api/tags": 0.25}
    assert settings.log_headers == ("User-Agent",)
    assert settings.routes == (Route("/x", ("POST",)),)
    assert settings.max_body_size == 1024
    assert settings.unmapped_paths == "reject"
    assert settings.shutdown_grace == 0
    assert settings.cors_origins == ("https://chat.example.com", "*")


def test_rate_limit_settings_from_the_environment():
    settings = load_settings(
        None,
        environ={
            "OLLAMA_PROXY_RATE_LIMIT": "120/minute; 2000/day",
            "OLLAMA_PROXY_RATE_LIMIT_ROUTES": '{"/api/pull": "5/hour"}',
            "OLLAMA_PROXY_RATE_LIMIT_STORAGE": "redis://:pw@redis:6379/0",
            "OLLAMA_PROXY_TRUSTED_PROXIES": '["10.0.0.0/8", "::1"]',
            "OLLAMA_PROXY_CLIENT_KEY_HEADER": "X-API-Key",
            "OLLAMA_PROXY_CONCURRENCY_PER_CLIENT": "2",
        },
    )
    assert settings.rate_limit == "120/minute; 2000/day"
    assert settings.rate_limit_routes == {"/api/pull": "5/hour"}
    assert settings.rate_limit_storage == "redis://:pw@redis:6379/0"
    assert [str(n) for n in settings.trusted_networks] == ["10.0.0.0/8", "::1/128"]
    assert settings.client_key_header == "X-API-Key" and settings.concurrency_per_client == 2


@pytest.mark.parametrize("value, expected", [(None, None), (0, None), (0.5, 0.5), (100, 100.0)])
def test_heartbeats_are_seconds_or_off(write_settings, value, expected):
    assert load_settings(write_settings({"heartbeat_seconds": value}), environ={}).heartbeat_seconds == expected


def test_relative_plugins_dir_is_relative_to_the_settings_file(write_settings, tmp_path):
    path = write_settings({"plugins_dir": "extra"})
    assert load_settings(path, environ={}).plugins_dir == str(tmp_path / "extra")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prot": 1}, "unknown key 'prot'; allowed keys: host, port, upstream"),
        ({"port": "8000"}, "port: expected a whole number from 0 to 65535"),
        ({"port": 70000}, "port: expected a whole number from 0 to 65535"),
        ({"port": True}, "port: expected a whole number"),
        ({"host": ""}, "host: expected a non-empty string"),
        ({"upstream": "127.0.0.1:11434"}, "upstream: expected an http:// or https:// URL with a host"),
        ({"upstream": "ftp://x"}, "upstream: expected an http:// or https:// URL"),
        ({"upstream": "http://x/?a=1"}, "upstream: expected an http:// or https:// URL"),
        ({"upstream": "http://u:p@x"}, "upstream: expected an http:// or https:// URL"),
        ({"upstream": "http://x:99999"}, "upstream: expected an http:// or https:// URL with a valid port"),
        ({"upstream": 5}, "upstream: expected"),
        ({"idle_timeout": 0}, "idle_timeout: expected a number of seconds > 0"),
        (
            {"status_path": "_proxy/"},
            "status_path: expected a path such as /_proxy/, or null to turn the status page off",
        ),
        ({"status_path": "/a//"}, "status_path: expected a path such as /_proxy/"),
        ({"metrics_max_models": 0}, "metrics_max_models: expected a whole number of models >= 1"),
        ({"metrics_max_models": True}, "metrics_max_models: expected a whole number of models >= 1"),
        ({"heartbeat_seconds": -1}, "heartbeat_seconds: expected a number of seconds > 0, or null or 0 for none"),
        ({"heartbeat_seconds": False}, "heartbeat_seconds: expected a number of seconds > 0, or null or 0 for none"),
        ({"header_timeout": 0}, "header_timeout: expected a number of seconds > 0"),
        ({"keepalive_timeout": "75"}, "keepalive_timeout: expected a number of seconds > 0"),
        ({"api_keys": {"alice": "k"}}, "api_keys: a key, or a list of keys and objects"),
        ({"api_keys": [{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}]}, "api_keys: the name 'a' is given"),
        ({"api_keys_file": ""}, "api_keys_file: expected a file path, or null"),
        ({"public_paths": ["health"]}, 'public_paths: expected a list of paths such as ["/_proxy/health"]'),
        ({"public_paths": "/x"}, "public_paths: expected a list of paths"),
        ({"auth_failures": "ten a minute"}, 'auth_failures: expected a limit such as "10/minute"'),
        ({"auth_failures": None}, "auth_failures: expected a limit"),
        ({"connect_timeout": -1}, "connect_timeout: expected a number of seconds > 0"),
        ({"connect_timeout": "10"}, "connect_timeout: expected a number of seconds > 0"),
        ({"shutdown_grace": -1}, "shutdown_grace: expected a number of seconds >= 0"),
        ({"max_body_size": 0}, "max_body_size: expected a whole number of bytes >= 1, or null"),
        ({"max_body_size": 1.5}, "max_body_size: expected a whole number of bytes"),
        ({"unmapped_paths": "drop"}, "unmapped_paths: expected 'forward' or 'reject', got 'drop'"),
        ({"log_level": "loud"}, "log_level: expected 'debug' or 'info' or 'warning' or 'error'"),
        ({"routes": {}}, "routes: expected a list of route objects"),
        ({"log_format": "xml"}, "log_format: expected 'auto' or 'json' or 'text', got 'xml'"),
        ({"log_headers": ["User Agent"]}, 'log_headers: expected a list of header names such as ["User-Agent"]'),
        ({"log_headers": "User-Agent"}, "log_headers: expected a list of header names"),
        ({"access_log_sampling": {"/x": 2}}, "access_log_sampling: expected an object of path -> rate from 0"),
        ({"access_log_sampling": {"x": 0}}, "access_log_sampling: expected an object of path -> rate"),
        ({"access_log_sampling": {"/x": True}}, "access_log_sampling: expected an object of path -> rate"),
        ({"access_log_sampling": []}, "access_log_sampling: expected an object of path -> rate"),
        ({"health_path": "health"}, "health_path: expected a path such as /_proxy/health, or null"),
        ({"metrics_path": "/a b"}, "metrics_path: expected a path such as /_proxy/health, or null"),
        ({"metrics_path": 5}, "metrics_path: expected a path"),
        ({"health_cache_seconds": -1}, "health_cache_seconds: expected a number of seconds >= 0"),
        ({"rate_limit": "lots/minute"}, 'rate_limit: expected limits such as "120/minute"'),
        ({"rate_limit": 5}, "rate_limit: expected limits such as"),
        (
            {"rate_limit_routes": {"/api/pull": "often"}},
            "rate_limit_routes: expected an object of route path -> limits",
        ),
        ({"rate_limit_routes": {"api/pull": "1/hour"}}, "rate_limit_routes: expected an object"),
        ({"rate_limit_routes": ["/api/pull"]}, "rate_limit_routes: expected an object"),
        ({"rate_limit_strategy": "token-bucket"}, "rate_limit_strategy: expected 'moving-window' or 'fixed-window'"),
        (
            {"rate_limit_storage": "mongodb://x"},
            "rate_limit_storage: expected a storage URL starting memory://, redis://",
        ),
        ({"rate_limit_storage": 1}, "rate_limit_storage: expected a storage URL"),
        ({"rate_limit_fail": "maybe"}, "rate_limit_fail: expected 'open' or 'closed'"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies: expected a list of addresses or networks"),
        ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies: expected a list of addresses or networks"),
        ({"rate_limit_exempt": ["nope"]}, "rate_limit_exempt: expected a list of addresses or networks"),
        ({"concurrency_per_client": 0}, "concurrency_per_client: expected a whole number >= 1, or null"),
        ({"hold_body_max": -1}, "hold_body_max: expected a whole number of bytes >= 0"),
        ({"pool_max_fails": 0}, "pool_max_fails: expected a whole number >= 1"),
        ({"pool_retries": -1}, "pool_retries: expected a whole number >= 0 (0: never move a request to another pod)"),
        ({"concurrency_total": True}, "concurrency_total: expected a whole number >= 1"),
        ({"client_key_header": "X API"}, 'client_key_header: expected a header name such as "X-API-Key"'),
        ({"workers": -1}, "workers: expected a whole number of processes >= 1, or 0 for one per core"),
        ({"cors_origins": "*"}, 'cors_origins: expected a list of origins such as "https://chat.example.com"'),
        ({"cors_origins": ["chat.example.com"]}, "cors_origins: expected a list of origins"),
        ({"cors_origins": ["https://chat.example.com/app"]}, "cors_origins: expected a list of origins"),
        ({"cors_origins": [3]}, "cors_origins: expected a list of origins"),
        (
            {"routes": [{"path": "/x", "methods": ["GET"]}, {"path": "/y", "methods": []}]},
            "routes: expected entry 1: methods: must be a non-empty list",
        ),
    ],
)
def test_bad_values_in_the_file_name_the_key_and_what_is_allowed(write_settings, data, message):
    path = write_settings(data)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, environ={})
    assert str(caught.value).startswith(path + ": ")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"PORT": "eighty"}, "PORT: port: expected a whole number from 0 to 65535 (0 picks a free port), got 'eighty'"),
        (
            {"OLLAMA_PROXY_IDLE_TIMEOUT": "NaN"},
            "OLLAMA_PROXY_IDLE_TIMEOUT: idle_timeout: expected a number of seconds > 0",
        ),
        ({"OLLAMA_PROXY_ROUTES": "[{"}, "OLLAMA_PROXY_ROUTES: routes: expected a list of route objects"),
    ],
)
def test_bad_environment_values_name_the_variable(environ, message):
    with pytest.raises(SettingsError, match=None) as caught:
        load_settings(None, environ=environ)
    assert message in str(caught.value)


def test_bad_flag_names_the_flag():
    with pytest.raises(SettingsError) as caught:
        load_settings(None, environ={}, flags={"port": "x"})
    assert str(caught.value).startswith("--port: port: expected")


@pytest.mark.parametrize(
    "content, message",
    [("{nope", "not valid JSON"), ("[1, 2]", "must hold a JSON object of settings")],
)
def test_unreadable_files_say_why(write_settings, content, message):
    path = write_settings(content)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, environ={})
    assert message in str(caught.value)


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError) as caught:
        load_settings(str(tmp_path / "absent.json"), environ={})
    assert "cannot be read: No such file or directory" in str(caught.value)


def test_the_schema_has_one_entry_per_setting_in_order():
    assert list(SCHEMA) == [field.name for field in fields(Settings)]


# -- the pool ---------------------------------------------------------------------------


def test_upstreams_name_the_pods_and_upstream_is_a_pool_of_one():
    assert [(pod.name, pod.url) for pod in Settings().pods] == [("default", "http://127.0.0.1:11434")]
    settings = load_settings(
        None,
        environ={
            "OLLAMA_PROXY_UPSTREAMS": json.dumps(
                [
                    {"name": "big", "url": "http://10.0.0.2:11434/", "weight": 2, "slots": 4},
                    {
                        "name": "remote",
                        "url": "https://p-8000.proxy.runpod.net",
                        "headers": {"Authorization": "Bearer k"},
                    },
                ]
            )
        },
    )
    big, remote = settings.pods
    assert (big.name, big.base, big.host, big.weight, big.slots) == (
        "big",
        "http://10.0.0.2:11434",
        "10.0.0.2:11434",
        2.0,
        4,
    )
    assert (remote.slots, remote.weight, remote.headers) == (None, 1.0, (("Authorization", "Bearer k"),))


def test_upstreams_in_the_short_form():
    settings = load_settings(
        None, environ={"OLLAMA_PROXY_UPSTREAMS": "a=http://10.0.0.2:11434, b=http://10.0.0.3:11434"}
    )
    assert [(pod.name, pod.url) for pod in settings.pods] == [
        ("a", "http://10.0.0.2:11434"),
        ("b", "http://10.0.0.3:11434"),
    ]


def test_a_later_sources_pool_replaces_an_earlier_ones(write_settings):
    path = write_settings({"upstream": "http://10.0.0.5:11434"})  # as the shipped file does
    pooled = load_settings(path, environ={"OLLAMA_PROXY_UPSTREAMS": "a=http://10.0.0.2:1,b=http://10.0.0.3:1"})
    assert [pod.name for pod in pooled.pods] == ["a", "b"]
    single = load_settings(path, environ={"OLLAMA_PROXY_UPSTREAMS": "a=http://x:1"}, flags={"upstream": "http://y:2"})
    assert [(pod.name, pod.url) for pod in single.pods] == [("default", "http://y:2")]


@pytest.mark.parametrize(
    "source",
    [
        {"file": {"upstream": "http://x:1", "upstreams": [{"name": "a", "url": "http://y:1"}]}},
        {"environ": {"OLLAMA_PROXY_UPSTREAM": "http://x:1", "OLLAMA_PROXY_UPSTREAMS": "a=http://y:1"}},
    ],
)
def test_upstream_and_upstreams_in_one_source_is_a_settings_error(write_settings, source):
    path = write_settings(source["file"]) if "file" in source else None
    with pytest.raises(SettingsError, match="upstream and upstreams: give one"):
        load_settings(path, environ=source.get("environ", {}))


@pytest.mark.parametrize(
    "upstreams, message",
    [
        ([], "upstreams: a list of pods"),
        ("a", "entry 1: url: an http:// or https:// URL"),
        ([{"name": "a"}], "entry 1: url: an http:// or https:// URL"),
        ([{"name": "a b", "url": "http://x:1"}], "entry 1: name: 1 to 64 of"),
        ([{"name": "a", "url": "http://x:1", "color": "red"}], "entry 1: unknown field 'color'"),
        ([{"name": "a", "url": "http://x:1", "weight": 0}], "entry 1: weight: a number > 0"),
        ([{"name": "a", "url": "http://x:1", "slots": 0}], "entry 1: slots: a whole number >= 1"),
        ([{"name": "a", "url": "http://x:1", "headers": {"Host": "y"}}], "entry 1: headers: an object"),
        ([{"name": "a", "url": "http://x:1", "headers": {"X-K": "s3cr3t\nb"}}], "entry 1: headers: an object"),
        (["http://x:1"], "entry 1: an object with name and url"),
        ([{"name": "a", "url": "http://x:1"}, {"name": "a", "url": "http://y:1"}], "'a' is given twice"),
    ],
)
def test_bad_upstreams_are_named_without_echoing_them(upstreams, message):
    with pytest.raises(SettingsError) as refused:
        load_settings(
            None,
            environ={"OLLAMA_PROXY_UPSTREAMS": json.dumps(upstreams) if not isinstance(upstreams, str) else upstreams},
        )
    assert message in str(refused.value) and "s3cr3t" not in str(refused.value)


def test_a_bad_upstream_is_named_without_echoing_its_password(write_settings):
    path = write_settings({"upstream": "ftp://admin:S3cretPW@127.0.0.1:9"})
    with pytest.raises(SettingsError) as caught:
        load_settings(path, environ={})
    assert "upstream: expected an http:// or https:// URL" in str(caught.value)
    assert str(caught.value).endswith("got 'ftp://admin:***@127.0.0.1:9'")


def test_the_start_up_log_shows_no_pods_headers():
    from tornado_ollama_proxy.logs import effective_configuration

    settings = load_settings(
        None,
        environ={
            "OLLAMA_PROXY_UPSTREAMS": json.dumps(
                [{"name": "r", "url": "http://x:1", "headers": {"Authorization": "Bearer k"}}]
            )
        },
    )
    assert effective_configuration(settings)["upstreams"][0]["headers"] == [("Authorization", "***")]
