"""The upstream's circuit breaker (gateway/upstream.py): after 5 consecutive failures the
gateway stops calling a relay that is down, answers at once for 10 s, then lets exactly one
request probe it; the probe's success closes the circuit, its failure opens it again.

The state machine with a fake clock (no waiting), then the same through the app: a relay
nobody listens on opens the circuit, the next create is refused without a connection
attempt, and /readyz reports it.
"""

from __future__ import annotations

from pathlib import Path

from conftest import gen2_body
from inprocess import AUTH, gateway_config, running

from gateway.upstream import CIRCUIT_FAILURES, CIRCUIT_OPEN_SECONDS, CircuitBreaker


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock) -> CircuitBreaker:
    breaker = CircuitBreaker(clock=clock)
    for _ in range(CIRCUIT_FAILURES):
        assert breaker.allow()
        breaker.failure()
    return breaker


def test_the_defaults_are_five_failures_and_ten_seconds() -> None:
    assert (CIRCUIT_FAILURES, CIRCUIT_OPEN_SECONDS) == (5, 10.0)
    breaker = CircuitBreaker()
    assert (breaker.threshold, breaker.open_seconds) == (5, 10.0)


def test_it_opens_after_five_consecutive_failures() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock=clock)
    for _ in range(4):
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(clock=Clock())
    for _ in range(4):
        breaker.failure()
    breaker.success()
    for _ in range(4):
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow()  # 8 failures, never 5 in a row


def test_open_answers_at_once_for_ten_seconds() -> None:
    clock = Clock()
    breaker = opened(clock)
    for elapsed in (0.0, 5.0, 9.999):
        clock.now = 1000.0 + elapsed
        assert breaker.state == "open" and not breaker.allow()
    clock.now = 1010.0
    assert breaker.state == "half_open"


def test_half_open_lets_exactly_one_request_through() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += CIRCUIT_OPEN_SECONDS
    assert breaker.allow()  # the probe
    assert [breaker.allow() for _ in range(5)] == [False] * 5  # everyone else while it runs
    clock.now += 60  # however long the probe takes
    assert not breaker.allow()


def test_the_probes_success_closes_the_circuit() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += CIRCUIT_OPEN_SECONDS
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and all(breaker.allow() for _ in range(10))
    for _ in range(4):
        breaker.failure()
    assert breaker.state == "closed"  # a fresh count: it takes five again


def test_the_probes_failure_opens_it_again_for_ten_seconds() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += CIRCUIT_OPEN_SECONDS + 3
    assert breaker.allow()
    failed_at = clock.now
    breaker.failure()  # one failure is enough while not closed
    assert breaker.state == "open" and not breaker.allow()
    clock.now = failed_at + CIRCUIT_OPEN_SECONDS - 0.001
    assert not breaker.allow()
    clock.now = failed_at + CIRCUIT_OPEN_SECONDS
    assert breaker.allow() and not breaker.allow()  # one probe again


def test_a_late_failure_of_a_call_sent_before_it_opened_does_not_end_the_probe() -> None:
    """A slow create sent while closed times out after the circuit opened and while the
    half-open probe runs: it says nothing new, so the probe stays the only request."""
    clock = Clock()
    sent_before = clock.now - 1
    breaker = opened(clock)
    clock.now += CIRCUIT_OPEN_SECONDS
    probe_sent = clock.now
    assert breaker.allow()
    breaker.failure(sent_before)
    breaker.release(sent_before)
    assert breaker.state == "half_open" and not breaker.allow()  # still one probe
    assert breaker.opens_until == 1000.0 + CIRCUIT_OPEN_SECONDS  # not re-opened by it
    breaker.failure(probe_sent)  # the probe's own verdict still decides
    assert breaker.state == "open" and breaker.opens_until == probe_sent + CIRCUIT_OPEN_SECONDS


def test_a_late_success_of_a_call_sent_before_it_opened_does_not_close_it() -> None:
    clock = Clock()
    sent_before = clock.now - 1
    breaker = opened(clock)
    clock.now += 2
    breaker.success(sent_before)
    assert breaker.state == "open" and not breaker.allow()
    clock.now += CIRCUIT_OPEN_SECONDS
    probe_sent = clock.now
    assert breaker.allow()
    breaker.success(probe_sent)
    assert breaker.state == "closed"


def test_failures_of_calls_sent_before_it_closed_do_not_count_towards_the_next_opening() -> None:
    clock = Clock()
    sent_while_open = clock.now - 1
    breaker = opened(clock)
    clock.now += CIRCUIT_OPEN_SECONDS
    probe_sent = clock.now
    assert breaker.allow()
    clock.now += 1
    breaker.success(probe_sent)
    for _ in range(CIRCUIT_FAILURES):
        breaker.failure(sent_while_open)
    assert breaker.state == "closed"
    for _ in range(CIRCUIT_FAILURES):
        breaker.failure(clock.now)  # sent after it closed: these count
    assert breaker.state == "open"


async def test_a_relay_that_is_down_opens_the_circuit_and_readyz_says_so(tmp_path: Path) -> None:
    async with running(gateway_config(tmp_path)) as run, run.client() as client:
        for _ in range(CIRCUIT_FAILURES):
            resp = await client.post("/runway/tasks", headers=AUTH, json=gen2_body())
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable"
            assert "connect" in resp.json()["error"]["message"]
        assert (await client.get("/readyz")).json()["upstream_circuit"] == "open"
        refused = await client.post("/runway/tasks", headers=AUTH, json=gen2_body())
        error = refused.json()["error"]
        assert (
            refused.status_code == 503 and error["code"] == "upstream_unavailable" and "not calling" in error["message"]
        )
        assert await run.usage() == {
            "active": 0,
            "tasks_today": 0,
            "credits_today": 0,
            "credits_this_month": 0,
            "tasks_this_month": 0,
        }
