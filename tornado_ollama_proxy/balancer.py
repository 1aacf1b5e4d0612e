"""The load balancer: which pods may take a request, best first. Pure functions.

One decision, in this order (the built-in `choose_upstream`):

1. pods with a free slot (their generations in flight < `slots`; unknown slots
   are always free) before pods without one;
2. then pods where the model is loaded before pods that list it (which would
   load it: seconds to minutes), before pods whose list is not known yet;
3. then the conversation's pod, while it has a free slot: the one rendezvous
   (highest random weight) hashing picks for the conversation's key, so that
   every proxy process, on one machine or many, agrees with no shared state,
   and a pod leaving moves only its own conversations;
4. then fewest requests in flight relative to `weight`; ties take turns.

Pods known not to list the model can not take it at all.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PodView:
    """A pod as the balancer sees it at one moment."""

    name: str
    weight: float
    slots: int | None
    busy: int  # generations in flight there (every process's, as far as known)
    in_flight: int  # requests in flight there
    has_model: bool | None  # lists the request's model; None while its list is unknown
    loaded: bool  # has the request's model loaded

    @property
    def free(self) -> bool:
        return self.slots is None or self.busy < self.slots


@dataclass(frozen=True)
class Wanted:
    """What a request needs of a pod: a model (canonical name; None for any pod), and the
    conversation it belongs to (its affinity key; None for none)."""

    model: str | None = None
    affinity: str | None = None


def order(pods: Sequence[PodView], wanted: Wanted, turn: int = 0) -> list[PodView]:
    """The pods that may take the request, best first; `turn` rotates equals."""
    able = [pod for pod in pods if wanted.model is None or pod.has_model is not False]
    favourite = rendezvous(able, wanted.affinity) if wanted.affinity is not None else None

    def rank(pod: PodView) -> tuple[bool, int, bool, float]:
        holds = 0 if pod.loaded else 1 if pod.has_model else 2
        return (
            not pod.free,
            holds if wanted.model is not None else 0,
            pod is not favourite or not pod.free,
            pod.in_flight / pod.weight,
        )

    ranked = sorted(able, key=rank)
    equals = [pod for pod in ranked if rank(pod) == rank(ranked[0])] if ranked else []
    shift = turn % len(equals) if equals else 0
    return equals[shift:] + equals[:shift] + ranked[len(equals) :]


def rendezvous(pods: Sequence[PodView], key: str) -> PodView | None:
    """The pod weighted rendezvous hashing picks for `key`: each pod scores
    -weight / ln(h), h a hash of the key and its name in (0, 1); the highest wins."""
    best, best_score = None, -math.inf
    for pod in pods:
        digest = hashlib.blake2b(f"{key}\0{pod.name}".encode(), digest_size=8).digest()
        h = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # never 0 nor 1
        score = -pod.weight / math.log(h)
        if score > best_score:
            best, best_score = pod, score
    return best


def affinity_key(session: str | None, key_name: str | None, model: str | None, opening: str | None) -> str | None:
    """A conversation's key: the client's own `X-Ollama-Session`, else its key's name, its
    model and its opening together (None without an opening: nothing to come back for)."""
    if session:
        return "session\0" + session
    if opening is None:
        return None
    return "\0".join(("conversation", key_name or "", model or "", opening))


def default_chooser() -> Callable[[Sequence[PodView], Wanted], list[PodView]]:
    """The built-in policy, as the `choose_upstream` hook gives it: `order`, equals taking turns."""
    turns = itertools.count()

    def choose(pods: Sequence[PodView], wanted: Wanted) -> list[PodView]:
        return order(pods, wanted, next(turns))

    return choose
