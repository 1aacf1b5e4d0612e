"""Outlier detection: when a pod is taken out of the pool, and how it comes back.

Failures in a row (a refused or reset connection, a timeout, a 502, 503 or
504, a failed probe) eject a pod for a while, twice as long each further time
up to a cap; when that while is over, one request (or probe) tries it
(half-open) before it gets its share again. A 500 is not a failure of the
pod: Ollama answers 500 for errors a request causes, and one user must not be
able to eject pods. The clock is passed in, so every rule is testable alone.
"""

from __future__ import annotations

from dataclasses import dataclass

EJECTION_CAP = 300.0  # seconds: an ejection doubles up to 5 minutes
# A pod that has not failed for this long starts its ejections afresh.
FORGIVE_AFTER = EJECTION_CAP

HEALTHY, EJECTED, PROBING = "healthy", "ejected", "probing"


@dataclass
class Failure:
    """A pod's last failure: what it was and when (monotonic seconds)."""

    reason: str
    at: float


class PodHealth:
    """One pod's state: `healthy`, `ejected` until a time, or `probing` (half-open)."""

    def __init__(self, max_fails: int, eject_seconds: float):
        self.max_fails = max_fails
        self.eject_seconds = eject_seconds
        self.state = HEALTHY
        self.fails = 0  # in a row
        self.ejections = 0  # in a row, for the doubling
        self.ejected_until = 0.0
        self.last_failure: Failure | None = None

    def available(self, now: float) -> bool:
        """Whether a request may go there now: healthy, or its ejection is over and
        nobody is probing it yet (the caller then probes: see `probe`)."""
        return self.state == HEALTHY or (self.state == EJECTED and now >= self.ejected_until)

    def probe(self, now: float) -> bool:
        """Claim the one try a pod whose ejection is over gets; False if it is not that pod's turn."""
        if self.state == EJECTED and now >= self.ejected_until:
            self.state = PROBING
            return True
        return False

    def succeeded(self, now: float) -> None:
        """An answer from the pod. While it is ejected, the answer is to a request sent
        before (requests under way when a pod fails may still end well): the ejection stands."""
        if self.state == EJECTED:
            return
        if self.state != HEALTHY or (self.last_failure and now - self.last_failure.at >= FORGIVE_AFTER):
            if self.state == HEALTHY:
                self.ejections = 0  # healthy long enough: the next ejection is short again
            self.state = HEALTHY
        self.fails = 0

    def failed(self, reason: str, now: float) -> bool:
        """Count a failure; True when it ejects the pod."""
        self.last_failure = Failure(reason, now)
        self.fails += 1
        if self.state == PROBING or (self.state == HEALTHY and self.fails >= self.max_fails):
            self.state = EJECTED
            self.ejected_until = now + min(EJECTION_CAP, self.eject_seconds * 2**self.ejections)
            self.ejections += 1
            return True
        return False

    def released(self) -> None:
        """A probing request ended without telling anything of the pod (its client left):
        the next one probes instead."""
        if self.state == PROBING:
            self.state = EJECTED
