"""Several pods' answers as one, in Ollama's schema."""

from tornado_ollama_proxy import merge


def entry(name, digest="d", modified="2026-11-01T10:00:00Z"):
    return {"name": name, "model": name, "digest": digest, "modified_at": modified, "size": 1}


def test_tags_list_each_model_once_the_newest_where_digests_differ_newest_first():
    a = {"models": [entry("llama3.2:latest", "old", "2026-10-01T00:00:00Z"), entry("only-a:latest")]}
    b = {"models": [entry("llama3.2:latest", "new", "2026-11-20T00:00:00Z"), entry("LLAMA3.2"), "junk", entry("!")]}
    merged = merge.tags([a, b, {"models": None}, {}])
    assert [(e["name"], e["digest"]) for e in merged["models"]] == [("llama3.2:latest", "new"), ("only-a:latest", "d")]


def test_v1_models_list_each_model_once():
    a = {"object": "list", "data": [{"id": "m:latest", "object": "model", "created": 5, "owned_by": "library"}]}
    b = {"data": [{"id": "m", "object": "model", "created": 9}, {"id": "n", "created": "x"}, 3, {"id": "!"}]}
    assert merge.models([a, b]) == {
        "object": "list",
        "data": [{"id": "m", "object": "model", "created": 9}, {"id": "n", "created": "x"}],
    }


def test_the_version_is_the_lowest_a_pre_release_below_its_release():
    assert merge.version([{"version": "0.32.0"}, {"version": "0.9.10"}, {"version": "0.10.1"}]) == {"version": "0.9.10"}
    assert merge.version([{"version": "0.12.0"}, {"version": "0.12.0-rc1"}]) == {"version": "0.12.0-rc1"}
    assert merge.version([{"version": 5}, {}]) == {"version": ""}


def test_progress_sums_each_layer_over_pods_and_says_each_status_once():
    progress = merge.Progress()
    assert progress.add("a", {"status": "pulling manifest"}) == {"status": "pulling manifest"}
    assert progress.add("b", {"status": "pulling manifest"}) is None
    layer = {"status": "pulling abc", "digest": "sha256:abc", "total": 10}
    assert progress.add("a", {**layer, "completed": 4}) == {**layer, "total": 10, "completed": 4}
    assert progress.add("b", {**layer, "completed": 1}) == {**layer, "total": 20, "completed": 5}
    assert progress.add("a", {**layer, "completed": 10}) == {**layer, "total": 20, "completed": 11}
    # A count that is not a number (no Ollama sends one) leaves the pod's last one.
    assert progress.add("b", {**layer, "completed": "many"}) == {**layer, "total": 20, "completed": 11}
    assert progress.add("a", {"status": "success"}) is None and progress.add("a", {"no": "status"}) is None
    assert progress.end({"a": None, "b": None}) == {"status": "success"}
    assert progress.end({"a": None, "b": "no space", "c": "refused"}) == {"error": "b: no space; c: refused"}
