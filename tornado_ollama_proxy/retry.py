"""When a request may go again, to the same pod or another, and how often the pool allows it.

A request may go again only while nothing of any pod's answer has reached the
client (a heartbeat may have: the head is then the proxy's own), and only if
the pod never received it (refused, connect or TLS failure, connect timeout),
or its route has no side effect and its body is held (or it has none): then
also when the pod closed or reset before its answer, answered 503 (Ollama's
fast "server busy"), or answered "model not found" while another pod lists
the model. Never pull, push, create, copy, delete or a blob once a pod
received it; never on a 400, 401, 403, 413 or 429, which are answers. Retries
are also bounded in number (`pool_retries`) and by a budget over the pool:
at most 20 % of the requests of the last 10 s, plus 3, so a sick pool is not
hammered (Envoy's retry budget).
"""

from __future__ import annotations

from collections import deque
from enum import Enum

BUDGET_RATIO = 0.2
BUDGET_MINIMUM = 3
BUDGET_SECONDS = 10


class Cause(Enum):
    """Why an attempt did not end in an answer for the client."""

    NOT_RECEIVED = "not_received"  # the pod never had it: refused, connect failure or timeout
    CLOSED = "closed"  # the pod closed or reset the connection before any answer
    BUSY = "busy"  # 503: the pod's queue is full
    NOT_FOUND = "not_found"  # "model not found" from a pod while another lists the model


SAFE_METHODS = frozenset({"GET", "HEAD"})


def may_go_again(cause: Cause, *, method: str, inference: bool, body_held: bool, answer_seen: bool) -> bool:
    """Whether a request whose attempt ended with `cause` may be sent again."""
    if answer_seen or not body_held:
        return False
    if cause is Cause.NOT_RECEIVED:
        return True
    return method in SAFE_METHODS or inference


class RetryBudget:
    """Retries at most BUDGET_RATIO of the requests of the last BUDGET_SECONDS, plus
    BUDGET_MINIMUM: counted per second, in a window that forgets as it moves."""

    def __init__(self) -> None:
        self.seconds: deque[list[int]] = deque()  # [second, requests, retries], oldest first

    def _now(self, second: int) -> list[int]:
        seconds = self.seconds
        while seconds and seconds[0][0] <= second - BUDGET_SECONDS:
            seconds.popleft()
        if not seconds or seconds[-1][0] != second:
            seconds.append([second, 0, 0])
        return seconds[-1]

    def request(self, second: int) -> None:
        self._now(second)[1] += 1

    def allow(self, second: int) -> bool:
        """Whether a retry fits the budget now; if it does, it is counted."""
        current = self._now(second)
        requests = sum(entry[1] for entry in self.seconds)
        retries = sum(entry[2] for entry in self.seconds)
        if retries >= BUDGET_RATIO * requests + BUDGET_MINIMUM:
            return False
        current[2] += 1
        return True
