"""What each pod has: its models (`/api/tags`), which are loaded (`/api/ps`), its version.

Read from the pods' own answers, with names compared as Ollama compares them
(`model_names.canonical`). Parsing is pure: bytes in, entries out; an answer
that is not what Ollama sends leaves what was known as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .model_names import canonical
from .peer_json import json_object


@dataclass(frozen=True)
class Model:
    """A model as a pod lists it: its canonical name, digest, when it was modified, and
    the entry itself (Ollama's schema, relayed as it is)."""

    name: str
    digest: str
    modified_at: str
    entry: dict[str, Any] = field(compare=False, hash=False)


def parse_models(body: bytes) -> dict[str, Model] | None:
    """The models of an `/api/tags` or `/api/ps` answer by canonical name; None when it is
    not such an answer."""
    data = json_object(body)
    entries = data.get("models") if data is not None else None
    if not isinstance(entries, list):
        return None
    models = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = canonical(str(entry.get("model") or entry.get("name") or ""))
        if name is not None:
            models[name] = Model(name, str(entry.get("digest", "")), str(entry.get("modified_at", "")), entry)
    return models


def parse_version(body: bytes) -> str | None:
    data = json_object(body)
    version = data.get("version") if data is not None else None
    return version if isinstance(version, str) else None


class PodModels:
    """What is known of one pod's models: None until read (then it may have any)."""

    def __init__(self) -> None:
        self.listed: dict[str, Model] | None = None  # from /api/tags
        self.loaded: dict[str, Model] = {}  # from /api/ps
        self.version: str | None = None

    def has(self, name: str) -> bool | None:
        """Whether the pod lists the model; None when its list has not been read."""
        return None if self.listed is None else name in self.listed

    def is_loaded(self, name: str) -> bool:
        return name in self.loaded
