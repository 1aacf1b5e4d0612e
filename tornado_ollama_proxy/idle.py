"""The idle watch: something to do when nothing has moved for a while."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ClassVar


class Silence:
    """Calls `on_silence` when `progress()` has not changed for `period` seconds,
    and again every `period` while that lasts.

    `progress` is a counter of what has moved, looked at four times a period:
    nothing is done per byte that moves. Every watch of one period is looked
    at in the same round (`_Round`), so a request's watches cost it no timer of
    their own. `stop` is for good: it lets go of both callbacks, which are
    usually bound to the watch's owner.
    """

    def __init__(self, period: float, progress: Callable[[], int], on_silence: Callable[[], None]):
        self.period = period
        self.calls: tuple[Callable[[], int], Callable[[], None]] | None = (progress, on_silence)
        self.seen = progress()
        self.round = _Round.of(period)
        self.quiet_since = self.round.loop.time()
        self.round.watches[self] = None

    def stop(self) -> None:
        self.calls = None
        self.round.watches.pop(self, None)

    def look(self, now: float) -> None:
        assert self.calls is not None  # a stopped watch has left its round
        progress_of, on_silence = self.calls
        progress = progress_of()
        if progress != self.seen:
            self.seen, self.quiet_since = progress, now
        elif now - self.quiet_since >= self.period:
            self.quiet_since = now
            on_silence()


class _Round:
    """One timer that looks at every watch of one period, four times a period, on
    one event loop; it ends when no watch is left. A watch started between two
    looks is first looked at in the next: silence is noticed after `period`,
    and at most a quarter of it later."""

    rounds: ClassVar[dict[tuple[asyncio.AbstractEventLoop, float], _Round]] = {}

    @classmethod
    def of(cls, period: float) -> _Round:
        loop = asyncio.get_running_loop()
        found = cls.rounds.get((loop, period))
        if found is None:
            found = cls.rounds[(loop, period)] = cls(loop, period)
        return found

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float):
        self.loop = loop
        self.period = period
        self.watches: dict[Silence, None] = {}  # in the order they started
        loop.call_later(period / 4, self._look)  # not kept: a timer that has run would hold this round

    def _look(self) -> None:
        if not self.watches:
            del _Round.rounds[(self.loop, self.period)]
            return
        self.loop.call_later(self.period / 4, self._look)  # whatever a watch's callback does
        now = self.loop.time()
        for watch in list(self.watches):
            if watch.calls is None:  # stopped by one looked at before it
                continue
            try:
                watch.look(now)
            except Exception as error:  # a bug in one watch's callback: the others are still looked at
                self.loop.call_exception_handler({"message": "an idle watch failed", "exception": error})
