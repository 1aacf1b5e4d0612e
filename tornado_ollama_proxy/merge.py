"""One answer from several pods' answers, in Ollama's own schema. Pure functions.

Lists (`/api/tags`, `/v1/models`, `/api/ps`) list each model once, whichever
pods have it: where two pods list one name with different digests, the
newest (`modified_at`) is listed, as it is the one requests go to.
`/api/version` is the lowest version: what every pod can do. Progress
streams (pull, push, create) become one stream: per digest, `total` and
`completed` summed over pods, each status once, `success` once and only when
every pod succeeded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .model_names import canonical


def tags(answers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`/api/tags` (or `/api/ps`): each model once, newest first as Ollama lists them."""
    chosen: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for entry in answer.get("models") or []:
            if not isinstance(entry, dict):
                continue
            name = canonical(str(entry.get("model") or entry.get("name") or ""))
            if name is None:
                continue
            kept = chosen.get(name)
            if kept is None or str(entry.get("modified_at", "")) > str(kept.get("modified_at", "")):
                chosen[name] = entry
    ordered = sorted(chosen.items(), key=lambda item: item[0])
    ordered.sort(key=lambda item: str(item[1].get("modified_at", "")), reverse=True)
    return {"models": [entry for _, entry in ordered]}


def models(answers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`/v1/models`: each model once (the latest `created`), in OpenAI's list schema."""
    chosen: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for entry in answer.get("data") or []:
            if not isinstance(entry, dict):
                continue
            name = canonical(str(entry.get("id", "")))
            if name is None:
                continue
            kept = chosen.get(name)
            if kept is None or _number(entry.get("created")) > _number(kept.get("created")):
                chosen[name] = entry
    return {"object": "list", "data": [chosen[name] for name in sorted(chosen)]}


def version(answers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`/api/version`: the lowest version among the pods (a pre-release below its release)."""
    versions = [answer["version"] for answer in answers if isinstance(answer.get("version"), str)]
    return {"version": min(versions, key=_version_key)} if versions else {"version": ""}


def _version_key(text: str) -> tuple[tuple[int, ...], int, str]:
    release, _, pre = text.lstrip("v").partition("-")
    return tuple(int(part) for part in re.findall(r"\d+", release)), 0 if pre else 1, pre


def _number(value: Any) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else float("-inf")


class Progress:
    """Several pods' progress streams as one: `add` takes one pod's line, gives the line
    for the client (or None when it says nothing new); `end` the last one, once every
    pod has ended (None for a pod that succeeded, else what failed)."""

    def __init__(self) -> None:
        self.layers: dict[str, dict[str, dict[str, int]]] = {}  # digest -> pod -> {total, completed}
        self.told: set[str] = set()  # statuses without a digest already passed on

    def add(self, pod: str, line: Mapping[str, Any]) -> dict[str, Any] | None:
        status = line.get("status")
        if not isinstance(status, str) or status == "success":
            return None  # success is told once, at the end
        digest = line.get("digest")
        if isinstance(digest, str) and digest:
            layer = self.layers.setdefault(digest, {}).setdefault(pod, {"total": 0, "completed": 0})
            for field in ("total", "completed"):
                if isinstance(line.get(field), int):
                    layer[field] = line[field]
            pods = self.layers[digest].values()
            return {
                "status": status,
                "digest": digest,
                "total": sum(each["total"] for each in pods),
                "completed": sum(each["completed"] for each in pods),
            }
        if status in self.told:
            return None
        self.told.add(status)
        return {"status": status}

    @staticmethod
    def end(failures: Mapping[str, str | None]) -> dict[str, Any]:
        failed = [f"{pod}: {reason}" for pod, reason in failures.items() if reason is not None]
        return {"error": "; ".join(failed)} if failed else {"status": "success"}
