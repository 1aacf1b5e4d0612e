"""Outlier detection: failures in a row eject a pod, ejections double, a probe brings it back."""

from tornado_ollama_proxy.outlier import EJECTED, EJECTION_CAP, HEALTHY, PROBING, PodHealth


def fail(health, times, now=0.0):
    return [health.failed("refused", now) for _ in range(times)]


def test_max_fails_in_a_row_eject_and_a_success_between_resets_the_count():
    health = PodHealth(max_fails=3, eject_seconds=10)
    assert fail(health, 2) == [False, False]
    health.succeeded(1.0)
    assert fail(health, 2) == [False, False] and health.state == HEALTHY
    assert health.failed("reset", 2.0) is True
    assert (health.state, health.ejected_until, health.last_failure.reason) == (EJECTED, 12.0, "reset")


def test_an_ejected_pod_takes_no_request_until_its_time_then_one_probe():
    health = PodHealth(max_fails=1, eject_seconds=10)
    health.failed("busy", 0.0)
    assert not health.available(9.9) and not health.probe(9.9)
    assert health.available(10.0) and health.probe(10.0)
    assert health.state == PROBING and not health.available(10.0) and not health.probe(10.0)  # one at a time
    health.succeeded(10.5)
    assert (health.state, health.fails) == (HEALTHY, 0) and health.available(10.5)


def test_an_answer_to_a_request_sent_before_the_ejection_does_not_end_it():
    health = PodHealth(max_fails=1, eject_seconds=10)
    health.failed("refused", 0.0)
    health.succeeded(1.0)
    assert (health.state, health.fails) == (EJECTED, 1) and not health.available(9.9)


def test_ejections_double_up_to_the_cap_while_probes_fail():
    health = PodHealth(max_fails=1, eject_seconds=10)
    now, lengths = 0.0, []
    for _ in range(7):
        health.failed("refused", now)
        lengths.append(health.ejected_until - now)
        now = health.ejected_until
        assert health.probe(now)
    assert lengths == [10, 20, 40, 80, 160, EJECTION_CAP, EJECTION_CAP]


def test_a_pod_healthy_long_enough_is_ejected_briefly_again():
    health = PodHealth(max_fails=1, eject_seconds=10)
    health.failed("refused", 0.0)
    health.probe(10.0)
    health.succeeded(10.0)
    health.failed("refused", 11.0)
    assert health.ejected_until == 11.0 + 20  # soon after its return: doubled
    health.probe(31.0)
    health.succeeded(31.0)
    health.succeeded(31.0 + EJECTION_CAP + 11.0)  # long after its last failure
    health.failed("refused", 400.0)
    assert health.ejected_until == 400.0 + 10


def test_a_probe_whose_client_left_leaves_the_next_request_to_probe():
    health = PodHealth(max_fails=1, eject_seconds=10)
    health.failed("refused", 0.0)
    assert health.probe(10.0)
    health.released()
    assert health.state == EJECTED and health.probe(10.1)
    health.released()
    health.released()  # nothing more to give back
    assert health.state == EJECTED
    healthy = PodHealth(max_fails=1, eject_seconds=10)
    healthy.released()
    assert healthy.state == HEALTHY
