"""The idle watch: something to do when nothing has moved for a while."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Silence:
    """Calls `on_silence` when `progress()` has not changed for `period` seconds,
    and again every `period` while that lasts.

    `progress` is a counter of what has moved, looked at four times a period:
    nothing is done per byte that moves. `stop` is for good: it lets go of both
    callbacks, which are usually bound to the watch's owner (that would keep
    the two in a cycle, for the garbage collector to find).
    """

    def __init__(self, period: float, progress: Callable[[], int], on_silence: Callable[[], None]):
        self.loop = asyncio.get_running_loop()
        self.period = period
        self.calls: tuple[Callable[[], int], Callable[[], None]] | None = (progress, on_silence)
        self.seen = progress()
        self.quiet_since = self.loop.time()
        self._timer = self.loop.call_later(period / 4, self._look)

    def stop(self) -> None:
        self._timer.cancel()
        self.calls = None

    def _look(self) -> None:
        assert self.calls is not None  # a stopped watch's timer is cancelled
        progress_of, on_silence = self.calls
        now = self.loop.time()
        progress = progress_of()
        self._timer = self.loop.call_later(self.period / 4, self._look)  # before on_silence, which may stop it
        if progress != self.seen:
            self.seen, self.quiet_since = progress, now
        elif now - self.quiet_since >= self.period:
            self.quiet_since = now
            on_silence()
