"""A relay's health as this process sees it: the circuit breaker, 429 cooling, key health.

Nothing here needs to agree across workers or replicas (docs/architecture.md): each
process learns a relay's state from its own calls, in at most a few failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CIRCUIT_FAILURES = 5
CIRCUIT_OPEN_SECONDS = 10.0
AUTH_LOG_INTERVAL_SECONDS = 60.0  # at most one error line per refused key per interval


class CircuitBreaker:
    """Closed -> open after N consecutive failures; open answers at once for
    `open_seconds`; then half-open lets one request through, whose success closes the
    circuit and whose failure opens it again.

    A verdict names when its call was sent (`sent_at`, this clock's time, taken at
    `allow`). Only calls sent since the circuit last opened or closed judge it: a late
    answer to a call sent before it opened (a slow create timing out) can neither close it
    nor end the half-open probe early and let a second one start. None: sent now."""

    def __init__(
        self,
        failures: int = CIRCUIT_FAILURES,
        open_seconds: float = CIRCUIT_OPEN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold, self.open_seconds, self.clock = failures, open_seconds, clock
        self.failures = 0
        self.opened_at: float | None = None
        self.changed_at = float("-inf")  # when it last opened or closed
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.open_seconds else "open"

    @property
    def ready(self) -> bool:
        """Whether `allow` would let a request through now (without taking the probe)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self.probing)

    @property
    def opens_until(self) -> float | None:
        """When an open circuit turns half-open (the clock's time); None unless open."""
        return None if self.opened_at is None else self.opened_at + self.open_seconds

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self, sent_at: float | None = None) -> None:
        if self._stale(sent_at):
            return
        if self.opened_at is not None:
            self.changed_at = self.clock()
        self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self, sent_at: float | None = None) -> None:
        if self._stale(sent_at):
            return
        self.failures += 1
        self.probing = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.changed_at = self.clock()

    def release(self, sent_at: float | None = None) -> None:
        """A probe let through ended without a verdict on the relay (it judged the request,
        e.g. a 400): the next request may probe."""
        if not self._stale(sent_at):
            self.probing = False

    def _stale(self, sent_at: float | None) -> bool:
        return sent_at is not None and sent_at < self.changed_at


class KeyHealth:
    """Which relay keys the relay refuses (401/403). A wrong, revoked or unfunded key fails
    every create that uses it, and no tenant can fix that: the operator must hear of it,
    but once per interval, not once per request. A key counts as failing from a refusal
    until the relay next accepts it (any other answer to a call made with it)."""

    def __init__(
        self, interval: float = AUTH_LOG_INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval, self.clock = interval, clock
        self.failing: set[int] = set()
        self._logged_at: dict[int, float] = {}
        self._unlogged: dict[int, int] = {}

    def refused(self, key_index: int) -> int | None:
        """Record a refusal. Returns the number of refusals the log line to write now
        stands for, or None while this key's last line is younger than the interval."""
        self.failing.add(key_index)
        count = self._unlogged.get(key_index, 0) + 1
        now = self.clock()
        last = self._logged_at.get(key_index)
        if last is not None and now - last < self.interval:
            self._unlogged[key_index] = count
            return None
        self._logged_at[key_index] = now
        self._unlogged[key_index] = 0
        return count

    def accepted(self, key_index: int) -> None:
        self.failing.discard(key_index)

    @property
    def state(self) -> str:
        return "failing" if self.failing else "ok"


class Cooling:
    """A relay that answered 429 is skipped for its `retry-after` (the clock's time)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.until = 0.0

    def start(self, seconds: float) -> None:
        self.until = max(self.until, self.clock() + seconds)

    @property
    def active(self) -> bool:
        return self.clock() < self.until
