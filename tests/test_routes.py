import itertools

import pytest

from tornado_ollama_proxy.default_plugins.ollama_routes import ALIASES, OLLAMA_ROUTES
from tornado_ollama_proxy.errors import Rejection
from tornado_ollama_proxy.routes import (
    BODY_METHODS,
    METHODS,
    Route,
    RouteError,
    RouteTable,
    check_target,
    decide_method,
    is_reserved,
    parse_route,
)

CHAT = Route("/api/chat", ("POST",), requires_body=True)
ME = Route("/api/me", ("POST",))
TAGS = Route("/api/tags", ("GET", "HEAD"))
DELETE = Route("/api/delete", ("DELETE",), requires_body=True)
BLOBS = Route("/api/blobs/{digest}", ("POST", "HEAD"))
ROOT_ONLY_GET = Route("/api/ps", ("GET",))
OVERRIDE = "X-HTTP-Method-Override"


# -- decide_method: every rule, every method, with and without a body ---------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("has_body", [False, True])
@pytest.mark.parametrize("route", [CHAT, ME, TAGS, DELETE, BLOBS, ROOT_ONLY_GET])
def test_allowed_incoming_method_is_kept_and_others_are_corrected(route, method, has_body):
    if method in route.methods:
        assert decide_method(route, method, {}, has_body) == method
        return
    try:
        chosen = decide_method(route, method, {}, has_body)
    except Rejection as rejection:
        # Only a lost body on a body-requiring route is refused.
        assert rejection.status == 400
        assert route.requires_body and not has_body
        assert "body was lost" in rejection.message
        return
    if len(route.methods) == 1:
        assert chosen == route.methods[0]
    else:
        # The method of the fitting kind, or the route's first when it has none.
        fitting = [m for m in route.methods if (m in BODY_METHODS) == has_body]
        assert chosen == (fitting or route.methods)[0]


def test_get_with_body_becomes_the_single_method():
    assert decide_method(CHAT, "GET", {}, True) == "POST"
    assert decide_method(DELETE, "GET", {}, True) == "DELETE"
    assert decide_method(ME, "GET", {}, False) == "POST"


def test_multi_method_route_picks_by_body():
    assert decide_method(BLOBS, "GET", {}, False) == "HEAD"
    assert decide_method(BLOBS, "GET", {}, True) == "POST"
    assert decide_method(TAGS, "POST", {}, False) == "GET"


def test_multi_method_route_without_a_method_of_the_wanted_kind_takes_the_first():
    assert decide_method(TAGS, "POST", {}, True) == "GET"


def test_lost_body_is_refused_with_the_reason():
    with pytest.raises(Rejection) as caught:
        decide_method(CHAT, "GET", {}, False)
    assert caught.value.status == 400
    assert "/api/chat needs a POST with a JSON body" in caught.value.message
    assert "arrived as GET without one" in caught.value.message
    assert "https://" in caught.value.message


def test_a_correct_client_sending_post_without_body_is_forwarded_for_ollama_to_judge():
    assert decide_method(CHAT, "POST", {}, False) == "POST"


@pytest.mark.parametrize("method, has_body", itertools.product(METHODS, [False, True]))
def test_unmapped_path_keeps_the_method_except_get_with_body(method, has_body):
    expected = "POST" if method == "GET" and has_body else method
    assert decide_method(None, method, {}, has_body) == expected


@pytest.mark.parametrize("route", [CHAT, TAGS, BLOBS, DELETE])
@pytest.mark.parametrize("wanted", METHODS)
@pytest.mark.parametrize("incoming", ["GET", "POST"])
def test_override_header_wins_when_allowed_else_405_with_allow(route, wanted, incoming):
    headers = {OVERRIDE: wanted.lower()}
    if wanted in route.methods:
        assert decide_method(route, incoming, headers, True) == wanted
        assert decide_method(route, incoming, headers, False) == wanted
        return
    with pytest.raises(Rejection) as caught:
        decide_method(route, incoming, headers, True)
    assert caught.value.status == 405
    assert caught.value.headers == {"Allow": ", ".join(route.methods)}
    assert wanted in caught.value.message and route.path in caught.value.message


def test_override_on_unmapped_path_is_taken():
    assert decide_method(None, "GET", {OVERRIDE: " patch "}, False) == "PATCH"


def test_override_naming_no_method_is_a_400():
    with pytest.raises(Rejection) as caught:
        decide_method(CHAT, "GET", {OVERRIDE: "FETCH"}, True)
    assert caught.value.status == 400
    assert "'FETCH'" in caught.value.message and "GET, HEAD, POST" in caught.value.message


# -- the built-in table ------------------------------------------------------


def builtin_table():
    return RouteTable(parse_route(entry) for entry in OLLAMA_ROUTES + ALIASES)


def test_builtin_table_maps_every_documented_route():
    table = builtin_table()
    expected = {
        "/": ("GET", "HEAD"),
        "/api/version": ("GET", "HEAD"),
        "/api/tags": ("GET", "HEAD"),
        "/api/ps": ("GET",),
        "/api/status": ("GET",),
        "/api/show": ("POST",),
        "/api/generate": ("POST",),
        "/api/chat": ("POST",),
        "/api/embed": ("POST",),
        "/api/embeddings": ("POST",),
        "/api/pull": ("POST",),
        "/api/push": ("POST",),
        "/api/create": ("POST",),
        "/api/copy": ("POST",),
        "/api/delete": ("DELETE",),
        "/api/me": ("POST",),
        "/api/signout": ("POST",),
        "/api/user/keys/abc": ("DELETE",),
        "/api/experimental/web_search": ("POST",),
        "/api/experimental/web_fetch": ("POST",),
        "/api/experimental/model-recommendations": ("GET",),
        "/api/blobs/sha256:" + "a" * 64: ("POST", "HEAD"),
        "/v1/chat/completions": ("POST",),
        "/v1/completions": ("POST",),
        "/v1/embeddings": ("POST",),
        "/v1/models": ("GET",),
        "/v1/models/llama3.2": ("GET",),
        "/v1/responses": ("POST",),
        "/v1/messages": ("POST",),
        "/v1/audio/transcriptions": ("POST",),
    }
    for path, methods in expected.items():
        route, _ = table.match(path)
        assert route.methods == methods, path
    assert len(table) == len(expected) + len(ALIASES)


@pytest.mark.parametrize(
    "path, target",
    [("/api/ls", "/api/tags"), ("/api/serve", "/"), ("/api/stop", "/api/generate"), ("/api/unload", "/api/generate")],
)
def test_aliases_name_their_upstream(path, target):
    route, params = builtin_table().match(path)
    assert route.upstream_target(params) == target


def test_unload_aliases_merge_keep_alive_zero():
    route, _ = builtin_table().match("/api/stop")
    assert route.body_defaults == {"keep_alive": 0}
    assert route.methods == ("POST",) and route.requires_body


# -- the table ---------------------------------------------------------------


def test_match_compares_decoded_segments_and_keeps_placeholders_as_they_arrived():
    table = RouteTable([Route("/a/{x}/b/{y}", ("GET",), upstream_path="/c/{y}/{x}")])
    route, params = table.match("/%61/1/b/2%3A3%20%3F%2F")
    # Encoded as they came: a decoded "%20" would put a space in the request
    # line, "%3F" a query, "%2F" another segment.
    assert params == {"x": "1", "y": "2%3A3%20%3F%2F"}
    assert route.upstream_target(params) == "/c/2%3A3%20%3F%2F/1"
    assert table.match("/a/1/b") is None
    assert table.match("/a/1/2/b/3") is None
    assert table.match("/a//b/3") is None  # a placeholder is never empty
    assert table.match("/a/1/c/3") is None


def test_the_reserved_prefix_is_recognised_however_it_is_spelled():
    assert is_reserved("/_proxy/health")
    assert is_reserved("/%5Fproxy/health")
    assert is_reserved("/_proxy%2fhealth")
    assert not is_reserved("/api/_proxy/health")


def test_later_entries_replace_earlier_ones_for_the_same_path():
    table = RouteTable([Route("/x", ("GET",)), Route("/y", ("GET",)), Route("/x", ("POST",))])
    assert table.match("/x")[0].methods == ("POST",)
    assert [r.path for r in table] == ["/x", "/y"]


def test_exact_paths_win_over_patterns():
    table = RouteTable([Route("/v1/models/{m}", ("GET",)), Route("/v1/models/special", ("POST",))])
    assert table.match("/v1/models/special")[0].methods == ("POST",)
    assert table.match("/v1/models/other")[0].methods == ("GET",)


def test_route_without_alias_has_no_upstream_target():
    assert TAGS.upstream_target({}) is None


# -- parse_route -------------------------------------------------------------


def test_parse_route_normalises_methods_and_keeps_options():
    route = parse_route(
        {
            "path": "/x/{a}",
            "methods": ["post", "POST", "head"],
            "upstream_path": "/y/{a}",
            "body_defaults": {"k": 1},
            "requires_body": True,
        }
    )
    assert route == Route("/x/{a}", ("POST", "HEAD"), "/y/{a}", {"k": 1}, True)
    assert parse_route(route) is route


@pytest.mark.parametrize(
    "entry, message",
    [
        ("/api/x", "must be an object with keys path, methods"),
        ({"path": "/x"}, "needs both 'path' and 'methods'"),
        ({"path": "/x", "methods": ["GET"], "verb": 1}, "unknown key 'verb'; allowed keys: path, methods"),
        ({"path": "x", "methods": ["GET"]}, "path: must be a string starting with '/'"),
        ({"path": 5, "methods": ["GET"]}, "path: must be a string starting with '/'"),
        ({"path": "/a/{b}c", "methods": ["GET"]}, "segment '{b}c' of '/a/{b}c' must be literal"),
        ({"path": "/a b", "methods": ["GET"]}, "segment 'a b'"),
        ({"path": "/x", "methods": []}, "methods: must be a non-empty list of GET, HEAD"),
        ({"path": "/x", "methods": "GET"}, "methods: must be a non-empty list"),
        ({"path": "/x", "methods": ["FETCH"]}, "got ['FETCH']"),
        ({"path": "/x", "methods": [1]}, "methods: must be a non-empty list"),
        ({"path": "/x", "methods": ["GET"], "upstream_path": "y"}, "upstream_path: must be a string starting"),
        ({"path": "/x", "methods": ["GET"], "upstream_path": "/y/{z}"}, "placeholder {z} is not in path '/x'"),
        ({"path": "/x", "methods": ["POST"], "body_defaults": [1]}, "body_defaults: must be a JSON object"),
        ({"path": "/x", "methods": ["GET"], "body_defaults": {"a": 1}}, "needs a method that carries a body"),
        ({"path": "/x", "methods": ["POST"], "requires_body": "yes"}, "requires_body: must be true or false"),
        ({"path": "/x", "methods": ["GET"], "scope": "admin"}, "scope: must be one of inference, manage, metrics"),
        ({"path": "/x", "methods": ["GET"], "answer": "xml"}, "answer: must be one of ndjson, sse, json or null"),
        ({"path": "/x", "methods": ["GET"], "tokens": 1}, "tokens: must be true or false, got 1"),
    ],
)
def test_parse_route_names_the_bad_field(entry, message):
    with pytest.raises(RouteError, match=None) as caught:
        parse_route(entry)
    assert message in str(caught.value)


# -- check_target -------------------------------------------------------------


@pytest.mark.parametrize(
    "uri", ["/", "/api/tags", "/api/tags?x=../y", "/v1/models/a.b", "/api/..x", "/%41pi", "/api/tags?q=%23%0A"]
)
def test_plain_paths_pass(uri):
    check_target(uri)


@pytest.mark.parametrize(
    "uri, reason",
    [
        ("http://elsewhere/", "not a path"),
        ("*", "not a path"),
        ("elsewhere:80", "not a path"),
        ("/api/../x", "'..' segment"),
        ("/api/%2e%2e/x", "'..' segment"),
        ("/api/.%2E/x", "'..' segment"),
        ("/api/%2E%2e", "'..' segment"),
        ("/./api/tags", "'.' or '..'"),
        ("/api/..%2fx", "'..' segment"),
        ("/api\\..\\x", "backslash"),
        ("/api/%5c..%5cx", "backslash"),
        ("/api/%00", "control characters"),
        ("/api/%0d%0aHost:%20x", "control characters"),
        ("/api/%7f", "control characters"),
        ("/api/pull#1", "contains '#'"),
        ("/api/tags?x=#y", "contains '#'"),
        ("/api/tags?x=\x01", "target contains control characters"),
        ("/api/\x7f", "target contains control characters"),
    ],
)
def test_escaping_and_foreign_targets_are_refused(uri, reason):
    with pytest.raises(Rejection) as caught:
        check_target(uri)
    assert caught.value.status == 400
    assert reason in caught.value.message


def test_a_route_needs_the_manage_scope_unless_it_says_otherwise():
    assert parse_route({"path": "/x", "methods": ["GET"]}).scope == "manage"
    read = parse_route({"path": "/x", "methods": ["GET"], "scope": "inference", "answer": "json", "tokens": True})
    assert (read.scope, read.answer, read.tokens) == ("inference", "json", True)


def test_every_built_in_route_says_its_scope():
    from tornado_ollama_proxy.default_plugins.ollama_routes import ALIASES, OLLAMA_ROUTES

    scopes = {entry["path"]: entry.get("scope") for entry in OLLAMA_ROUTES + ALIASES}
    assert None not in scopes.values()
    assert {path for path, scope in scopes.items() if scope == "manage"} == {
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
        "/api/blobs/{digest}",
        "/api/me",
        "/api/signout",
        "/api/user/keys/{key}",
        "/api/experimental/web_search",
        "/api/experimental/web_fetch",
    }
