"""Rolling windows of tokens per key, in memory and in Redis: what they grant, when a
refusal may retry, the clock they count by, and a reservation given up by its ticket."""

import time

import coredis
import pytest

from tornado_ollama_proxy.token_windows import MemoryTokens, RedisTokens, Window, retry_after

MINUTE = Window("tokens_per_minute", 60, 1, 100)
DAY = Window("tokens_per_day", 86400, 60, 150)
NOW = 1_000_000_020  # a whole minute


def test_a_refused_request_is_told_when_its_oldest_buckets_make_room_enough():
    buckets = {NOW - 50: 30, NOW - 30: 40, NOW - 10: 30}  # 100 used: full
    assert retry_after(MINUTE, buckets, 0, 25, NOW) == 11  # the first bucket leaves in 11 s
    assert retry_after(MINUTE, buckets, 0, 31, NOW) == 31  # the second one too
    assert retry_after(MINUTE, buckets, 20, 50, NOW) == 11
    assert retry_after(MINUTE, {NOW: 100}, 0, 1, NOW) == 61  # a bucket counts while any of it is inside


@pytest.fixture(params=["memory", "redis"])
def tokens(request):
    if request.param == "memory":
        return MemoryTokens()
    return RedisTokens(request.getfixturevalue("redis_server").url)


async def test_a_window_grants_what_is_wanted_while_there_is_room_and_at_least_what_is_needed(tokens):
    assert (await tokens.take("alice", [MINUTE], 10, 50, NOW)).granted == 50
    assert (await tokens.take("alice", [MINUTE], 10, 80, NOW + 1)).granted == 50  # what is left
    refused = await tokens.take("alice", [MINUTE], 1, 1, NOW + 2)
    assert (refused.granted, refused.used, refused.buckets) == (0, (100,), ({NOW: 50, NOW + 1: 50},))
    assert (await tokens.take("bob", [MINUTE], 1, 1, NOW + 2)).granted == 1  # each key its own
    await tokens.give("alice", [MINUTE], [NOW], -30, "")  # it used 20 of its 50
    assert (await tokens.take("alice", [MINUTE], 1, 100, NOW + 3)).granted == 30
    assert (await tokens.take("alice", [MINUTE], 1, 100, NOW + 61)).used == (80,)  # the first bucket left
    assert (await tokens.take("alice", [MINUTE], 1, 100, NOW + 200)).granted == 100  # all of it left


async def test_every_window_of_a_key_must_have_room(tokens):
    assert (await tokens.take("alice", [MINUTE, DAY], 1, 100, NOW)).granted == 100
    taken = await tokens.take("alice", [MINUTE, DAY], 1, 100, NOW + 61)  # a new minute, the same day
    assert (taken.granted, taken.used) == (50, (0, 100))
    refused = await tokens.take("alice", [MINUTE, DAY], 1, 100, NOW + 122)
    assert (refused.granted, refused.used) == (0, (0, 150))
    assert refused.buckets == ({}, {NOW: 100, NOW + 60: 50})  # day buckets are minutes


async def test_a_correction_for_a_bucket_that_left_its_window_changes_nothing(tokens):
    await tokens.take("alice", [MINUTE], 1, 60, NOW)
    assert (await tokens.take("alice", [MINUTE], 1, 10, NOW + 90)).used == (0,)
    await tokens.give("alice", [MINUTE], [NOW], 40, "")
    assert (await tokens.take("alice", [MINUTE], 1, 10, NOW + 91)).used == (10,)


async def test_proxies_sharing_redis_count_time_by_its_clock_not_their_own(redis_server, monkeypatch):
    tokens = RedisTokens(redis_server.url)
    monkeypatch.setattr(time, "time", lambda: 0.0)  # this machine's clock is far off
    taken = await tokens.take("alice", [MINUTE], 1, 1)
    assert taken.now > NOW and (await tokens.take("alice", [MINUTE], 1, 1)).used == (1,)


async def test_a_ticket_given_up_before_its_reservation_runs_gets_nothing(redis_server):
    tokens = RedisTokens(redis_server.url)
    keys_ = ["{ollama-proxy}:quota:alice:tokens_per_minute", "{ollama-proxy}:quota:ticket:t1"]
    await tokens.undo_script(keys=keys_)  # the proxy gave up first
    with pytest.raises(coredis.exceptions.ResponseError, match="gave this reservation up"):
        await tokens.take_script(keys=keys_, args=[NOW, 1, 50, 60, 1, 100])
    assert (await tokens.take("alice", [MINUTE], 1, 1, NOW)).used == (0,)


async def test_a_reservation_sent_again_answers_as_it_did_and_takes_once(redis_server):
    # A client library sends a command again on a new connection when the one it was on
    # dropped (another call's timeout drops it), though Redis may have run it already.
    tokens = RedisTokens(redis_server.url)
    await tokens.take("alice", [MINUTE, DAY], 1, 7, NOW - 30)
    keys_ = [
        "{ollama-proxy}:quota:alice:tokens_per_minute",
        "{ollama-proxy}:quota:alice:tokens_per_day",
        "{ollama-proxy}:quota:ticket:t2",
    ]
    windows = [60, 1, 100, 86400, 60, 150]
    assert await tokens.take_script(keys=keys_, args=[NOW, 1, 50, *windows]) == [50, NOW, 7, 7]
    # Sent again a second later: its grant, its clock and the uses it saw, and nothing more taken.
    assert await tokens.take_script(keys=keys_, args=[NOW + 1, 1, 50, *windows]) == [50, NOW, 7, 7]
    assert (await tokens.take("alice", [MINUTE, DAY], 1, 1, NOW + 1)).used == (57, 57)
    await tokens.undo_script(keys=keys_)  # given up all the same: what it took goes back, once
    await tokens.undo_script(keys=keys_)
    assert (await tokens.take("alice", [MINUTE, DAY], 1, 1, NOW + 1)).used == (8, 8)


async def test_a_ticket_given_up_after_its_reservation_ran_gives_it_back(redis_server):
    tokens = RedisTokens(redis_server.url)
    taken = await tokens.take("alice", [MINUTE], 10, 50, NOW)
    await tokens.undo_script(keys=["{ollama-proxy}:quota:alice:tokens_per_minute", taken.ticket])
    assert (await tokens.take("alice", [MINUTE], 1, 1, NOW + 1)).used == (0,)


async def test_a_reservation_sent_again_reads_back_its_numbers_exactly(redis_server):
    tokens = RedisTokens(redis_server.url)
    window = "{ollama-proxy}:quota:bob:tokens_per_minute"
    await coredis.Redis.from_url(redis_server.url).hset(window, {str(NOW - 5): -7})  # a use corrected below 0
    keys_ = [window, "{ollama-proxy}:quota:ticket:t3"]
    limit = 10**12  # the largest a key entry may set
    arguments = [NOW, 1, limit, 60, 1, limit]
    first = await tokens.take_script(keys=keys_, args=arguments)
    assert first == [limit, NOW, -7]
    assert await tokens.take_script(keys=keys_, args=arguments) == first
