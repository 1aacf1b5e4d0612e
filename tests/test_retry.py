"""When a request may go again, and the pool's retry budget."""

import pytest

from tornado_ollama_proxy.retry import BUDGET_SECONDS, Cause, RetryBudget, may_go_again


@pytest.mark.parametrize(
    "cause, method, inference, held, seen, allowed",
    [
        (Cause.NOT_RECEIVED, "POST", False, True, False, True),  # the pod never had it: any route
        (Cause.NOT_RECEIVED, "DELETE", False, True, False, True),
        (Cause.NOT_RECEIVED, "POST", False, False, False, False),  # but a streamed body cannot go twice
        (Cause.NOT_RECEIVED, "POST", True, True, True, False),  # nor anything once a pod's answer was seen
        (Cause.CLOSED, "POST", True, True, False, True),  # an inference call: no side effect
        (Cause.CLOSED, "GET", False, True, False, True),
        (Cause.CLOSED, "HEAD", False, True, False, True),
        (Cause.CLOSED, "POST", False, True, False, False),  # pull, create...: it may have happened
        (Cause.CLOSED, "DELETE", False, True, False, False),
        (Cause.BUSY, "POST", True, True, False, True),
        (Cause.BUSY, "POST", False, True, False, False),
        (Cause.NOT_FOUND, "POST", True, True, False, True),
        (Cause.NOT_FOUND, "POST", True, False, False, False),
        (Cause.BUSY, "POST", True, True, True, False),
    ],
)
def test_the_rules(cause, method, inference, held, seen, allowed):
    assert may_go_again(cause, method=method, inference=inference, body_held=held, answer_seen=seen) is allowed


def test_the_budget_allows_a_fifth_of_the_requests_plus_three():
    budget = RetryBudget()
    for _ in range(50):
        budget.request(100)
    assert [budget.allow(100) for _ in range(14)] == [True] * 13 + [False]  # 0.2 * 50 + 3


def test_the_budget_forgets_what_left_its_window():
    budget = RetryBudget()
    assert [budget.allow(0) for _ in range(4)] == [True] * 3 + [False]
    assert budget.allow(BUDGET_SECONDS - 1) is False
    assert budget.allow(BUDGET_SECONDS) is True  # the retries of second 0 are gone
