"""What each pod has, read from its own answers."""

import json

from tornado_ollama_proxy.registry import PodModels, parse_models, parse_version


def test_a_tags_answer_gives_models_by_canonical_name():
    body = json.dumps(
        {
            "models": [
                {"name": "llama3.2:latest", "model": "llama3.2:latest", "digest": "d1", "modified_at": "t1"},
                {"name": "Alice/Tuned", "digest": "d2"},
                {"name": "no good name!"},
                "not an entry",
            ]
        }
    ).encode()
    models = parse_models(body)
    assert sorted(models) == ["alice/tuned:latest", "llama3.2:latest"]
    assert (models["llama3.2:latest"].digest, models["llama3.2:latest"].modified_at) == ("d1", "t1")
    assert models["alice/tuned:latest"].entry == {"name": "Alice/Tuned", "digest": "d2"}


def test_what_is_not_such_an_answer_is_none():
    assert parse_models(b"404 page not found") is None
    assert parse_models(b'{"models": 5}') is None
    assert parse_version(b'{"version": "0.32.0"}') == "0.32.0"
    assert parse_version(b'{"version": 5}') is None and parse_version(b"x") is None


def test_an_unread_list_may_hold_anything():
    models = PodModels()
    assert models.has("m:latest") is None and not models.is_loaded("m:latest")
    models.listed = parse_models(b'{"models": [{"name": "m"}]}')
    models.loaded = parse_models(b'{"models": [{"name": "m"}]}')
    assert models.has("m:latest") and models.is_loaded("m:latest") and models.has("n:latest") is False
