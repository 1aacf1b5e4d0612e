"""Requests that go to several pods at once, and their answers made one.

With several pods, the pool must still look like one Ollama: its lists
(`/api/tags`, `/v1/models`, `/api/ps`, `/api/version`) are every pod's,
merged (`merge`); and management calls keep the pods alike: a pull, a create
or a blob upload goes to every pod that is up, a copy or a delete to every pod
that has the model (`X-Ollama-Upstream` names other targets). Progress from
several pods is one NDJSON stream; a whole answer, or a status, says every
failing pod by name. A push goes to one pod that has the model, as any other
request does.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from .attempt import Attempt
from .balancer import Wanted
from .errors import Rejection, error_message
from .framing import Head
from .journey import Journey
from .merge import Progress, models, tags, version
from .model_names import canonical
from .peer_json import json_object
from .pool import Member

LIST, PROGRESS, STATUS, BLOB = "list", "progress", "status", "blob"
LISTS: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
    "/api/tags": tags,
    "/api/ps": tags,
    "/v1/models": models,
    "/api/version": version,
}
LIST_LIMIT = 16 * 1024 * 1024  # bytes of one pod's answer kept to merge
JSON_TYPE = "application/json; charset=utf-8"
NDJSON_TYPE = "application/x-ndjson"


def kind_of(method: str, path: str) -> str | None:
    """How a request to the pool fans out, by its method and upstream path; None: it goes to one pod."""
    if method in ("GET", "HEAD") and path in LISTS:
        return LIST
    if method == "POST" and path in ("/api/pull", "/api/create"):
        return PROGRESS
    if (method, path) in (("POST", "/api/copy"), ("DELETE", "/api/delete")):
        return STATUS
    if method in ("HEAD", "POST") and path.startswith("/api/blobs/"):
        return BLOB
    return None


class Share:
    """One pod's part of a fanned-out request: its attempt, its answer's head and body."""

    attempt: Attempt  # given at once by `FanOut._start`, whose callbacks need the share first

    def __init__(self, member: Member) -> None:
        self.member = member
        self.head: Head | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.partial = b""  # an unfinished line of a progress stream
        self.told: str | None = None  # an error a progress stream told in-band
        self.succeeded = False  # a progress stream said "success"

    def keep(self, data: bytes) -> None:
        if self.size < LIST_LIMIT:
            self.body.append(data)
            self.size += len(data)

    @property
    def whole(self) -> bytes:
        return b"".join(self.body)

    def failure(self) -> str | None:
        """What went wrong at this pod, or None."""
        ended = self.attempt.ended()
        if ended is not None:
            return ended.rejection.message
        head = self.head
        assert head is not None  # an exchange that ended for the client has its answer's head
        if not 200 <= head.code < 300:
            return error_message(self.whole, head.code)
        return self.told


class FanOut(Journey):
    """A request to several pods; the client gets one answer made of theirs."""

    def __init__(self, *args: Any, kind: str, **kwargs: Any):
        self.kind = kind
        self.shares: list[Share] = []
        self.progress = Progress()
        super().__init__(*args, **kwargs)

    @property
    def streamed(self) -> bool:
        """A progress stream, passed on as it comes (unless the body asks for one answer)."""
        return self.kind == PROGRESS and self.body.info().stream is not False

    def go(self) -> None:
        """A body held whole waits for `settle`; else every target starts now (a blob upload
        goes to them all at once)."""
        if self.body.held is None:
            members = self._everyone()
            if not members:
                raise self.pool.unavailable()
            if not self.body.present:
                for member in members:
                    self._start(member)
                return
            for index, (member, producer) in enumerate(zip(members, self.body.tee(len(members)), strict=True)):
                self._start(member, body_producer=producer)
                self.shares[index].attempt.fetching.add_done_callback(functools.partial(self._let_go, index))

    def _everyone(self) -> list[Member]:
        return [member for member in self.pool.choose(Wanted(), self.plan.targets) if self.pool.claim(member)]

    async def _targets(self) -> list[Member]:
        """Who takes a held body: every pod that is up, or, for a copy or a delete, every
        pod that has the model (after one more look at their lists, if none seems to)."""
        if self.kind != STATUS or self.plan.targets is not None:
            return self._everyone()
        data = json_object(self.body.whole()) or {}
        named = data.get("source", data.get("model", data.get("name")))
        model = canonical(named) if isinstance(named, str) else None
        if model is None:
            return self._everyone()[:1]  # let one pod say what is wrong with the body
        if self.pool.lists_nowhere(model):
            await self.pool.refresh_all()
        owners = self.pool.owners(model)
        return [member for member in self._everyone() if owners.get(member.pod.name)]

    def _start(self, member: Member, **body: Any) -> None:
        plan = self.plan
        share = Share(member)
        self.shares.append(share)
        self.tried.append(member.pod.name)
        self.record.method_out = plan.method
        self.record.upstream = ",".join(self.tried)
        self.record.attempts = len(self.tried)
        share.attempt = Attempt(
            self.pool,
            member,
            plan.method,
            plan.target,
            plan.headers.copy(),
            generation=False,
            hold=lambda head: False,
            on_head=lambda head: setattr(share, "head", head),
            on_piece=functools.partial(self._take, share),
            **body,
        )

    def _let_go(self, index: int, _: object) -> None:
        self.body.let_go(index)

    def _take(self, share: Share, data: bytes) -> Awaitable[None] | None:
        head = share.head
        if not self.streamed or head is None or not 200 <= head.code < 300:
            share.keep(data)
            return None
        lines = (share.partial + data).split(b"\n")
        share.partial = lines.pop()
        pending = None
        for line in lines:
            pending = self._on_line(share, json_object(line) or {}) or pending
        return pending

    def _on_line(self, share: Share, line: dict[str, Any]) -> Awaitable[None] | None:
        if isinstance(line.get("error"), str):
            share.told = line["error"]
            return None
        share.succeeded = share.succeeded or line.get("status") == "success"
        merged = self.progress.add(share.member.pod.name, line)
        return None if merged is None else self.relay.on_piece(json.dumps(merged).encode() + b"\n")

    async def settle(self) -> None:
        """Start every target of a held body, wait for them all, and answer as one."""
        if not self.shares:
            members = await self._targets()
            if not members:
                self.end_early(self._nowhere())
                return
            if self.streamed:
                self._head(200, NDJSON_TYPE, None)
            for member in members:
                self._start(member, body=self.body.whole() if self.body.present else None)
        for share in self.shares:
            try:
                await share.attempt.fetching
            except Exception as error:  # each share reads its own end
                error.__traceback__ = None  # which would hold this frame, and it this fan-out: a cycle
        self.body.stop()
        if self.reply.answered:
            return
        if self.kind in (PROGRESS, STATUS):
            # What they have has changed: known before the client hears, so that its next
            # call (a delete after a delete, a chat after a pull) meets the pods as they are.
            refreshing = asyncio.gather(*(self.pool.refresh(share.member) for share in self.shares))
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(refreshing), self.proxy.settings.connect_timeout)
        self._answer()
        if self.relay.error_body is not None:
            self.relay.tell_in_band()
        self.reply.finish()

    def _nowhere(self) -> Rejection:
        if self.kind == STATUS:
            return Rejection(404, f"model '{self._model_named()}' not found")
        return self.pool.unavailable()

    def _model_named(self) -> str:
        data = json_object(self.body.whole()) or {}
        return str(data.get("source", data.get("model", data.get("name", ""))))[:256]

    def _answer(self) -> None:
        """The one answer, from every pod's: merged, or the failures named."""
        failures = {share.member.pod.name: share.failure() for share in self.shares}
        failed = [share for share in self.shares if failures[share.member.pod.name] is not None]
        reasons = "; ".join(f"{pod}: {reason}" for pod, reason in failures.items() if reason is not None)
        if self.streamed:
            for share in self.shares:
                if share.failure() is None and not share.succeeded:
                    failures[share.member.pod.name] = "its progress ended without success"
            self._piece(json.dumps(Progress.end(failures)).encode() + b"\n")
            self.record.outcome = "upstream_error" if any(failures.values()) else self.record.outcome
            return
        if self.kind == LIST:
            self._list(failures)
        elif failed:
            status = next((share.head.code for share in failed if share.head is not None), 502)
            if self.kind == BLOB and self.plan.method == "HEAD":
                self._head(404 if status == 404 else status, None, 0)
            else:
                self._error(status, reasons)
        elif self.kind == PROGRESS:
            self._whole(200, "application/json", b'{"status":"success"}')
        else:
            created = any(share.head is not None and share.head.code == 201 for share in self.shares)
            self._head(201 if created else 200, None, 0)

    def _list(self, failures: dict[str, str | None]) -> None:
        answers = [json_object(share.whole) for share in self.shares if failures[share.member.pod.name] is None]
        merged = [answer for answer in answers if answer is not None]
        if not merged:
            self._error(502, "; ".join(f"{pod}: {reason}" for pod, reason in failures.items()))
            return
        path = self.plan.target.partition("?")[0]
        self._whole(200, JSON_TYPE, json.dumps(LISTS[path](merged)).encode())

    def _error(self, status: int, message: str) -> None:
        self._whole(status, JSON_TYPE, json.dumps({"error": message}).encode())

    def _whole(self, status: int, content_type: str, body: bytes) -> None:
        self._head(status, content_type, len(body))
        self._piece(body)

    def _head(self, status: int, content_type: str | None, length: int | None) -> None:
        headers = [("Content-Type", content_type)] if content_type is not None else []
        self.relay.on_head(Head("HTTP/1.1", status, "", headers, length), ",".join(self.tried))
        self.proxy.metrics.streams.inc()

    def _piece(self, data: bytes) -> None:
        self.relay.on_piece(data)

    def _abort(self, error: Exception) -> None:
        for share in self.shares:
            share.attempt.abort(error)
        self.body.stop()

    def _progress(self) -> int:
        moved = self.record.bytes_in + self.body.written
        moved += sum(share.attempt.received for share in self.shares)
        moved += self.relay.flow.taken
        return moved

    def end(self) -> None:
        super().end()
        for share in self.shares:
            share.attempt.let_go()  # its callbacks hold its share
        self.shares = []  # their callbacks hold this fan-out
