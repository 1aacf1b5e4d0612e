"""Model names compared as Ollama compares them."""

import pytest

from tornado_ollama_proxy.model_names import canonical

LLAMA = "llama3.2:latest"


@pytest.mark.parametrize(
    "name",
    [
        "llama3.2",
        "llama3.2:latest",
        "library/llama3.2",
        "library/llama3.2:latest",
        "registry.ollama.ai/library/llama3.2",
        "registry.ollama.ai/library/llama3.2:latest",
        "REGISTRY.ollama.ai/Library/LLaMA3.2:Latest",
        "https://registry.ollama.ai/library/llama3.2",
        "http://llama3.2",
        "llama3.2+Q4_0",
        "llama3.2@sha256-" + "a" * 64,
        "llama3.2:latest@sha256:" + "A" * 64,
    ],
)
def test_every_spelling_of_one_model_is_one_name(name):
    assert canonical(name) == LLAMA


@pytest.mark.parametrize(
    "name, expected",
    [
        ("llama3.2:1b", "llama3.2:1b"),
        ("alice/tuned", "alice/tuned:latest"),
        ("registry.ollama.ai/alice/tuned:v2", "alice/tuned:v2"),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m"),
        ("example.com/library/mistral", "example.com/library/mistral:latest"),
        ("x" * 120 + ":1", "x" * 120 + ":1"),
    ],
)
def test_other_models_keep_what_tells_them_apart(name, expected):
    assert canonical(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 129,  # longer than Ollama takes
        "a/b/c/d",  # one part too many
        "model:",  # an empty tag
        "model:a:b",
        "model+",
        "model@sha256-short",
        "model@@sha256-" + "a" * 64,
        "host:5000/model",  # a port is read as a tag, which then holds a '/'
        "bad..name",
        "my.space/model",  # a namespace has no dot
        "/model",
        "model/",
        "mo del",
        "mödel",
        "@sha256-" + "a" * 64,  # a digest alone names no model
        "llama\nINFO forged",
    ],
)
def test_what_ollama_would_not_take_for_a_name_is_none(name):
    assert canonical(name) is None
