"""The load balancer's one decision: free slots, loaded model, conversation, least loaded."""

import itertools

import pytest

from tornado_ollama_proxy.balancer import PodView, Wanted, affinity_key, default_chooser, order, rendezvous


def pod(name, *, slots=None, busy=0, in_flight=0, has=True, loaded=False, weight=1.0):
    return PodView(name, weight, slots, busy, in_flight, has, loaded)


def names(pods):
    return [p.name for p in pods]


def test_a_pod_with_a_free_slot_comes_before_a_full_one_whatever_else():
    full = pod("full", slots=2, busy=2, loaded=True)
    free = pod("free", slots=2, busy=1, in_flight=9)
    assert names(order([full, free], Wanted("m"))) == ["free", "full"]


def test_unknown_slots_are_always_free():
    assert pod("x", busy=500).free and pod("y", slots=3, busy=2).free and not pod("z", slots=3, busy=3).free


def test_then_the_loaded_model_before_a_listed_one_before_an_unknown_list():
    pods = [pod("unknown", has=None), pod("listed"), pod("loaded", loaded=True, in_flight=5)]
    assert names(order(pods, Wanted("m"))) == ["loaded", "listed", "unknown"]


def test_pods_that_do_not_list_the_model_cannot_take_it():
    assert names(order([pod("no", has=False), pod("yes")], Wanted("m"))) == ["yes"]
    assert names(order([pod("no", has=False)], Wanted(None))) == ["no"]  # a request without a model: any


def test_a_request_without_a_model_ignores_what_is_loaded():
    pods = [pod("loaded", loaded=True, in_flight=3), pod("idle")]
    assert names(order(pods, Wanted(None))) == ["idle", "loaded"]


def test_the_conversation_returns_to_its_pod_while_it_has_a_free_slot():
    pods = [pod(n, slots=2) for n in "abcd"]
    favourite = rendezvous(pods, "conversation-1")
    assert names(order(pods, Wanted("m", "conversation-1")))[0] == favourite.name
    busier = [
        pod(n, slots=2, busy=1 if n == favourite.name else 0, in_flight=1 if n == favourite.name else 0) for n in "abcd"
    ]
    assert names(order(busier, Wanted("m", "conversation-1")))[0] == favourite.name  # busier, but its cache is there
    full = [pod(n, slots=2, busy=2 if n == favourite.name else 0) for n in "abcd"]
    assert names(order(full, Wanted("m", "conversation-1")))[-1] == favourite.name  # full: another takes it


def test_a_loaded_model_still_wins_over_the_conversations_pod():
    pods = [pod(n, loaded=n == "b") for n in "ab"]
    key = next(k for k in map(str, itertools.count()) if rendezvous(pods, k).name == "a")
    assert names(order(pods, Wanted("m", key))) == ["b", "a"]


def test_then_fewest_in_flight_by_weight_and_equals_take_turns():
    pods = [pod("a", in_flight=4, weight=2.0), pod("b", in_flight=3), pod("c", in_flight=1)]
    assert names(order(pods, Wanted("m"))) == ["c", "a", "b"]  # 1, 2, 3 relative to weight
    equals = [pod(n) for n in "abc"]
    assert [order(equals, Wanted("m"), turn)[0].name for turn in range(6)] == list("abcabc")
    chooser = default_chooser()
    assert [chooser(equals, Wanted("m"))[0].name for _ in range(4)] == list("abca")


def test_nothing_to_order():
    assert order([], Wanted("m")) == [] and rendezvous([], "k") is None


def test_rendezvous_moves_only_the_conversations_of_a_pod_that_leaves():
    pods = [pod(n) for n in "abcde"]
    keys = [f"conversation-{n}" for n in range(2000)]
    before = {key: rendezvous(pods, key).name for key in keys}
    after = {key: rendezvous([p for p in pods if p.name != "c"], key).name for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == "c" for key in moved)
    share = sum(1 for key in keys if before[key] == "a") / len(keys)
    assert 0.15 < share < 0.25  # an even spread


def test_rendezvous_follows_weights():
    pods = [pod("big", weight=3.0), pod("small")]
    keys = [f"k{n}" for n in range(4000)]
    big = sum(1 for key in keys if rendezvous(pods, key).name == "big") / len(keys)
    assert 0.7 < big < 0.8


@pytest.mark.parametrize(
    "session, key, model, opening, expected",
    [
        ("s-1", "alice", "m", "hi", "session\0s-1"),
        (None, "alice", "m:latest", "hi", "conversation\0alice\0m:latest\0hi"),
        (None, None, None, "hi", "conversation\0\0\0hi"),
        (None, "alice", "m", None, None),
        ("", "alice", "m", None, None),
    ],
)
def test_a_conversations_key(session, key, model, opening, expected):
    assert affinity_key(session, key, model, opening) == expected
