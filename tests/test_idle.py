"""The idle watch: silence noticed after its period, and again while it lasts."""

import asyncio

from tornado_ollama_proxy.idle import Silence

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
