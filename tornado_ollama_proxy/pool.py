"""The pool of Ollama pods: each pod with what the proxy knows of it, the client that
reaches them, and the keeping of that knowledge up to date.

As Envoy splits its work: the cluster (this module: members, probes,
registries, load), the load balancer (`balancer`, behind the `choose_upstream`
hook) and outlier detection (`outlier`). With one pod nothing runs in the
background and nothing is held back: the pod is always the one, as before
there was a pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from tornado.httpclient import HTTPResponse
from tornado.httputil import HTTPHeaders

from .balancer import PodView, Wanted
from .errors import Rejection
from .metrics import Metrics
from .outlier import EJECTED, HEALTHY, PROBING, PodHealth
from .registry import PodModels, parse_models, parse_version
from .retry import RetryBudget
from .settings import Settings
from .shared_load import SharedLoad
from .upstream import Pod
from .upstream_client import AbortableRequest, AnswerTimeout, PooledHTTPClient

log = logging.getLogger(__name__)

TAGS_SECONDS = 30.0  # each pod's model list is read again this often
Chooser = Callable[[Sequence[PodView], Wanted], Sequence[PodView]]


class Member:
    """A pod and what the pool knows of it: its health, its models, its load here."""

    def __init__(self, pod: Pod, settings: Settings):
        self.pod = pod
        self.health = PodHealth(settings.pool_max_fails, settings.pool_eject_seconds)
        self.models = PodModels()
        self.in_flight = 0  # this process's requests there
        self.busy = 0  # this process's generations there (against its slots)
        self.others_in_flight = 0  # other processes' (shared_load: a second old at most)
        self.others_busy = 0
        self.refreshing: asyncio.Task[None] | None = None

    def view(self, wanted: Wanted, has_model: bool | None) -> PodView:
        pod = self.pod
        loaded = wanted.model is not None and self.models.is_loaded(wanted.model)
        busy, in_flight = self.busy + self.others_busy, self.in_flight + self.others_in_flight
        return PodView(pod.name, pod.weight, pod.slots, busy, in_flight, has_model, loaded)


class Pool:
    """The pods, by name and in their configured order."""

    def __init__(self, settings: Settings, chooser: Chooser, metrics: Metrics):
        self.settings = settings
        self.chooser = chooser
        self.metrics = metrics
        self.members = [Member(Pod(config, settings), settings) for config in settings.pods]
        self.by_name = {member.pod.name: member for member in self.members}
        self.single = len(self.members) == 1
        self.budget = RetryBudget()
        for member in self.members:
            metrics.upstream_healthy.labels(member.pod.name).set(1)
        self._client: PooledHTTPClient | None = None
        self.slot_freed: Callable[[], None] | None = None  # the fair queue's, when pods have slots
        self._watching: asyncio.Task[None] | None = None
        self._sharing: asyncio.Task[None] | None = None

    @property
    def pods(self) -> list[Pod]:
        return [member.pod for member in self.members]

    # -- reaching the pods --------------------------------------------------------------

    @property
    def client(self) -> PooledHTTPClient:
        # Created on first use, inside the running event loop.
        if self._client is None:
            self._client = PooledHTTPClient(force_instance=True)
        return self._client

    def fetch(self, request: AbortableRequest) -> asyncio.Future[HTTPResponse]:
        """Start `request` now (it is abortable from this moment)."""
        return self.client.start(request)

    def close(self) -> None:
        for task in (self._watching, self._sharing):
            if task is not None:
                task.cancel()
        for member in self.members:
            if member.refreshing is not None:
                member.refreshing.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- choosing -----------------------------------------------------------------------

    def choose(self, wanted: Wanted, among: Sequence[str] | None = None, avoid: Sequence[str] = ()) -> list[Member]:
        """The pods that may take a request, best first: available ones (not ejected, or
        whose ejection is over and may be probed), among the named ones if given, not the
        avoided ones, that can serve the model (the `choose_upstream` hook orders them)."""
        if self.single:  # nothing to weigh: the one pod, unless it is avoided
            only = self.members[0]
            name = only.pod.name
            return [only] if (among is None or name in among) and name not in avoid else []
        now = time.monotonic()
        candidates = [
            member
            for member in self.members
            if (among is None or member.pod.name in among)
            and member.pod.name not in avoid
            and member.health.available(now)
        ]
        owners = self.owners(wanted.model) if wanted.model is not None else None
        views = {
            member.pod.name: member.view(wanted, None if owners is None else owners.get(member.pod.name))
            for member in candidates
        }
        ordered = self.chooser(list(views.values()), wanted)
        return [self.by_name[view.name] for view in ordered]

    def owners(self, model: str) -> dict[str, bool | None]:
        """Per pod, whether it serves `model`: it lists it (when two pods list one name with
        different digests, only those with the newest, by `modified_at`), or None while its
        list is unknown."""
        listed = {member.pod.name: member.models.listed for member in self.members}
        entries = {name: models[model] for name, models in listed.items() if models is not None and model in models}
        newest = max((entry.modified_at for entry in entries.values()), default="")
        return {
            name: None if models is None else (name in entries and entries[name].modified_at == newest)
            for name, models in listed.items()
        }

    def lists_nowhere(self, model: str) -> bool:
        """Whether every pod's list is known and none has `model`."""
        return not self.single and all(member.models.has(model) is False for member in self.members)

    def conflicts(self) -> dict[str, list[str]]:
        """Model names two pods list with different digests: name -> the pods that have it."""
        digests: dict[str, dict[str, str]] = {}
        for member in self.members:
            for name, entry in (member.models.listed or {}).items():
                digests.setdefault(name, {})[member.pod.name] = entry.digest
        return {name: sorted(pods) for name, pods in digests.items() if len(set(pods.values())) > 1}

    def unavailable(self) -> Rejection:
        """The answer when no pod can take a request: each pod's last failure, named."""
        now = time.monotonic()
        reasons = []
        for member in self.members:
            failure = member.health.last_failure
            said = f"{failure.reason} ({now - failure.at:.0f} s ago)" if failure else "not available"
            reasons.append(f"{member.pod.name!r}: {said}")
        return Rejection(502, "no upstream can take the request: " + "; ".join(reasons), {"Retry-After": "1"})

    # -- what a request does to a pod ---------------------------------------------------

    def enter(self, member: Member, generation: bool) -> None:
        member.in_flight += 1
        if generation:
            member.busy += 1
        self.metrics.child(self.metrics.upstream_in_flight, member.pod.name).inc()

    def leave(self, member: Member, generation: bool) -> None:
        member.in_flight -= 1
        self.metrics.child(self.metrics.upstream_in_flight, member.pod.name).dec()
        if generation:
            member.busy -= 1
            if self.slot_freed is not None:
                self.slot_freed()

    def pick(self, members: Iterable[Member]) -> Member | None:
        """The first of `members` that may take a request now (see `claim`)."""
        return next((member for member in members if self.claim(member)), None)

    def claim(self, member: Member) -> bool:
        """Whether a request may go to `member` now: a pod whose ejection is over takes one
        request (which claims it) before it gets its share again."""
        return self.single or member.health.state == HEALTHY or member.health.probe(time.monotonic())

    def report(self, member: Member, failure: str | None, *, learned: bool = True, probe: bool = False) -> None:
        """What an exchange told of the pod: None for an answer, else the failure; nothing
        when its client left first (`learned` False). A probe's success does not end an
        ejection: only a request does, so that a pod answering 503 to work (and 200 to
        probes) gets no work until it takes some."""
        if self.single:
            return
        health = member.health
        now = time.monotonic()
        if not learned:
            health.released()
        elif failure is None:
            if not probe or health.state == HEALTHY:
                health.succeeded(now)
        elif health.failed(failure, now):
            self.metrics.upstream_ejections.labels(member.pod.name).inc()
            log.warning("upstream ejected", extra={"upstream": member.pod.name, "reason": failure})
        self.metrics.upstream_healthy.labels(member.pod.name).set(1 if health.state == HEALTHY else 0)

    # -- keeping up to date ---------------------------------------------------------------

    def start(self) -> None:
        """With several pods, watch them: a probe (and `/api/ps`) every pool_health_seconds,
        `/api/tags` every 30 s; and with Redis as the storage, share the load with every
        other process that uses it."""
        if self.single or self._watching is not None:
            return
        self._watching = asyncio.ensure_future(self._watch())
        storage = self.settings.rate_limit_storage
        if urlsplit(storage).scheme in ("redis", "rediss"):
            self._sharing = asyncio.ensure_future(SharedLoad(storage, self).run())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        tags_due = 0.0
        while True:
            tags = loop.time() >= tags_due
            if tags:
                tags_due = loop.time() + TAGS_SECONDS
            await asyncio.gather(*(self._look(member, tags=tags) for member in self.members))
            await asyncio.sleep(self.settings.pool_health_seconds)

    def refresh(self, member: Member) -> asyncio.Task[None]:
        """Read a pod's models again now (after a management call, or a "model not found");
        one refresh at a time per pod."""
        if member.refreshing is None or member.refreshing.done():
            member.refreshing = asyncio.ensure_future(self._look(member, tags=True, probe=False))
        return member.refreshing

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(member) for member in self.members))

    async def _look(self, member: Member, *, tags: bool, probe: bool = True) -> None:
        """Probe a pod (`/api/version`, its health) and read what it has loaded, and when
        `tags`, what it lists."""
        models = member.models
        if probe:
            version, failure = await self.probe(member)
            self.report(member, failure, probe=True)
            if version is None:
                return
            models.version = version
        loaded, _ = await self.ask(member, "/api/ps", parse_models)
        if loaded is not None:
            models.loaded = loaded
        if tags:
            listed, _ = await self.ask(member, "/api/tags", parse_models)
            if listed is not None:
                models.listed = listed
                self.metrics.digest_conflicts.set(len(self.conflicts()))

    async def probe(self, member: Member) -> tuple[str | None, str | None]:
        """Ask the pod its version: the version, or None and what went wrong."""
        version, failure = await self.ask(member, "/api/version", parse_version)
        return version, failure

    async def ask(
        self, member: Member, path: str, parse: Callable[[bytes], Any], within: float | None = None
    ) -> tuple[Any, str | None]:
        """GET `path` from the pod, bounded by `within` seconds (connect_timeout by default):
        its parsed answer, or None and what went wrong."""
        pod = member.pod
        request = pod.request("GET", path, HTTPHeaders())
        request.request_timeout = bound = pod.connect_timeout if within is None else within
        try:
            response = await self.fetch(request)
        except AnswerTimeout:
            return None, f"upstream {pod.name!r} did not answer within {bound:g} s"
        except Exception as error:
            return None, pod.failure(error)[1].message
        if response.code != 200:
            return None, f"upstream {pod.name!r} answered {response.code}"
        parsed = parse(response.body)
        return parsed, None if parsed is not None else f"upstream {pod.name!r} does not answer like Ollama"

    def snapshot(self) -> list[dict[str, Any]]:
        """The pool as the status page and the health check show it."""
        now = time.monotonic()
        rows = []
        for member in self.members:
            health, pod = member.health, member.pod
            failure = health.last_failure
            rows.append(
                {
                    "name": pod.name,
                    "state": health.state,
                    "until_s": round(health.ejected_until - now, 1) if health.state == EJECTED else None,
                    "in_flight": member.in_flight + member.others_in_flight,
                    "busy": member.busy + member.others_busy,
                    "slots": pod.slots,
                    "loaded": sorted(member.models.loaded),
                    "models": None if member.models.listed is None else len(member.models.listed),
                    "version": member.models.version,
                    "last_failure": None if failure is None else failure.reason,
                    "last_failure_s": None if failure is None else round(now - failure.at, 1),
                }
            )
        return rows

    @property
    def healthy(self) -> list[Member]:
        return [member for member in self.members if member.health.state == HEALTHY]


class Hold:
    """A pod chosen for a request that has not gone there yet (its quota is reserved in
    between): the slot it keeps there (`slot`: from the queue), and the probe it claimed
    if the pod was back from an ejection. Ends once: `take` (its attempt counts them from
    now) or `let_go` (the slot to whoever waits next, the probe to the next request)."""

    def __init__(self, pool: Pool, member: Member, *, slot: bool):
        self.pool = pool
        self.member = member
        self.slot = slot
        self.probe = member.health.state == PROBING  # `pick` claimed it: nobody else probes now
        if slot:
            member.busy += 1

    def take(self) -> Member:
        if self.slot:
            self.member.busy -= 1  # the attempt counts it from now
        return self.member

    def let_go(self) -> None:
        if self.slot:
            self.member.busy -= 1
            assert self.pool.slot_freed is not None  # a slot is kept only where a queue waits for one
            self.pool.slot_freed()
        if self.probe:
            self.pool.report(self.member, None, learned=False)
