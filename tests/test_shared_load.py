"""Each pod's load shared through Redis: what an outage does to the counts and the log."""

import socket

from tornado_ollama_proxy.shared_load import SharedLoad

from .helpers import pool_of


async def test_an_outage_zeroes_the_others_counts_and_is_logged_once_however_long(pods, make_proxy, log_lines):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens there once the probe is closed
    proxy = make_proxy(upstreams=pool_of(pods(2)))
    pool = proxy.proxy.pool
    for member in pool.members:
        member.others_in_flight, member.others_busy = 3, 1  # what Redis said before the outage
    sharing = SharedLoad(f"redis://127.0.0.1:{closed}", pool)
    for _ in range(3):
        await sharing.look()
    assert [(member.others_in_flight, member.others_busy) for member in pool.members] == [(0, 0), (0, 0)]
    said = [line["message"] for line in log_lines() if line["message"].startswith("shared load")]
    assert said == ["shared load unavailable: each process balances on its own counts"]
