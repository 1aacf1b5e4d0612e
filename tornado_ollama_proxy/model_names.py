"""Model names as Ollama reads them (types/model/name.go), so that one model is one name.

``llama3.2``, ``llama3.2:latest``, ``library/llama3.2``, ``LLaMA3.2`` and
``registry.ollama.ai/library/llama3.2:latest`` all name the same model; a
client that spells it many ways must not make many labels of it (nor, with
several pods, miss the pod that has it). Pure functions.

A name is ``[host/][namespace/]model[:tag][+build][@digest]``; missing parts
default to ``registry.ollama.ai``, ``library`` and ``latest``, and names
compare without regard to case.
"""

from __future__ import annotations

import re

DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
MAX_LENGTH = 128  # Ollama's MaxNamePartLen, which bounds the whole name too
_PART = re.compile(r"[A-Za-z0-9_.-]+")
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+")  # no dot: it would be a host
_DIGEST = re.compile(r"sha256[-:][0-9a-fA-F]{64}")


def canonical(name: str) -> str | None:
    """The name as Ollama compares it, in the form `/api/tags` lists: lower-case,
    the default host and namespace left out, the tag always there (``llama3.2:latest``,
    ``hf.co/org/model:q4_k_m``). None when Ollama would not take it for a name."""
    text = name[len("http://") :] if name.startswith("http://") else name.removeprefix("https://")
    if not 0 < len(text) <= MAX_LENGTH or ".." in text:
        return None
    text, at, digest = text.partition("@")
    text, plus, build = text.partition("+")
    path, colon, tag = text.partition(":")
    segments = path.split("/")
    if (
        (at and not _DIGEST.fullmatch(digest))
        or (plus and not _PART.fullmatch(build))
        or (colon and not _PART.fullmatch(tag))
        or len(segments) > 3
        or not all(_PART.fullmatch(segment) for segment in segments)
    ):
        return None
    *prefix, model = segments
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(prefix) == 2:
        host, namespace = prefix
    elif prefix:
        namespace = prefix[0]
    if not _NAMESPACE.fullmatch(namespace):
        return None
    if host.lower() != DEFAULT_HOST:
        shown = f"{host}/{namespace}/"
    else:
        shown = "" if namespace.lower() == DEFAULT_NAMESPACE else f"{namespace}/"
    return f"{shown}{model}:{tag or DEFAULT_TAG}".lower()
