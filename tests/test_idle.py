"""The idle watch: silence noticed after its period, and again while it lasts."""

import asyncio
import gc
import weakref

from tornado_ollama_proxy.idle import Silence, _Round

from .helpers import until


async def test_silence_is_noticed_after_its_period_and_again_while_it_lasts(io_loop):
    loop = asyncio.get_running_loop()
    noticed = []
    silence = Silence(0.2, lambda: 0, lambda: noticed.append(loop.time()))
    started = loop.time()
    await until(lambda: len(noticed) >= 2)
    silence.stop()
    assert 0.2 <= noticed[0] - started <= 0.35  # looked at four times a period
    assert 0.15 <= noticed[1] - noticed[0] <= 0.35


async def test_movement_puts_silence_off(io_loop):
    loop = asyncio.get_running_loop()
    moved, noticed = [0], []
    silence = Silence(0.2, lambda: moved[0], lambda: noticed.append(loop.time()))
    started = loop.time()
    while loop.time() - started < 0.5:  # something moves all the while
        moved[0] += 1
        await asyncio.sleep(0.02)
    assert noticed == []
    quiet_from = loop.time()
    await until(lambda: noticed)
    silence.stop()
    assert noticed[0] - quiet_from >= 0.15


async def test_watches_of_one_period_share_one_timer_which_ends_with_the_last(io_loop):
    loop = asyncio.get_running_loop()
    first, second, other = Silence(0.2, lambda: 0, list), Silence(0.2, lambda: 0, list), Silence(0.4, lambda: 0, list)
    assert first.round is second.round is _Round.rounds[(loop, 0.2)]
    assert other.round is _Round.rounds[(loop, 0.4)]
    for watch in (first, second, other):
        watch.stop()
    await until(lambda: (loop, 0.2) not in _Round.rounds and (loop, 0.4) not in _Round.rounds)
    renewed = Silence(0.2, lambda: 0, list)  # a new round, for a new watch
    assert renewed.round is not first.round
    renewed.stop()


async def test_a_round_that_ended_is_freed_at_once_not_left_in_a_cycle(io_loop):
    loop = asyncio.get_running_loop()
    watch = Silence(0.1, lambda: 0, list)
    ended = weakref.ref(watch.round)
    watch.stop()
    del watch  # which names its round
    await until(lambda: (loop, 0.1) not in _Round.rounds)
    gc.disable()  # only reference counting may free it
    try:
        await until(lambda: ended() is None)
    finally:
        gc.enable()


async def test_a_watch_stopped_by_another_in_the_same_round_is_not_looked_at(io_loop):
    stopped_noticed = []
    later = Silence(0.2, lambda: 0, lambda: stopped_noticed.append(True))
    stopping = Silence(0.2, lambda: 0, later.stop)
    # Looked at in the order they started: reorder so that `stopping` comes first.
    later.round.watches.pop(later)
    later.round.watches[later] = None
    await until(lambda: later.calls is None)
    stopping.stop()
    assert stopped_noticed == []


async def test_a_callback_that_raises_is_reported_and_the_round_goes_on(io_loop):
    loop = asyncio.get_running_loop()
    reported, noticed = [], []
    loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))

    def fails() -> None:
        raise RuntimeError("a bug in one watch")

    failing = Silence(0.2, lambda: 0, fails)
    other = Silence(0.2, lambda: 0, lambda: noticed.append(len(reported)))
    await until(lambda: len(noticed) >= 2)
    failing.stop()
    other.stop()
    assert noticed[:2] == [1, 2]  # looked at in the same rounds as the one that failed, each time
    assert all(isinstance(error, RuntimeError) for error in reported)
    loop.set_exception_handler(None)
