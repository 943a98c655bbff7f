"""The relays behind the one endpoint (contract §14): each relay's client and health
(`client`, `circuit`), which relays a new task may go to (`choice`), and `Relays`, the set
of them with the failover rule: a create goes to a second relay only when the first one
certainly created nothing.

One relay configured (the old `[upstream]` table, or one `[[relays]]` block) behaves as
the gateway always did: its answer is the tenant's answer, its keys take turns.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.config import Config, RoutingConfig
from gateway.metrics import Metrics
from gateway.relays import choice
from gateway.relays.client import KEY_REFUSED_STATUSES, Outcome, RelayClient, UpstreamFailure

Switch = Callable[[str, int], Awaitable[None]]


@dataclass
class Routed:
    """A create a relay accepted: the task, where (relay, key index), how many relays it took."""

    task: dict[str, Any]
    relay: str
    key_index: int
    attempts: int


class RouteFailed(Exception):
    """No relay accepted the create. `failure` is the tenant's answer; `relay` and
    `key_index` are where the create was sent last (an unknown outcome stays there)."""

    def __init__(self, failure: UpstreamFailure, relay: str, key_index: int, attempts: int):
        super().__init__(failure.message)
        self.failure, self.relay, self.key_index, self.attempts = failure, relay, key_index, attempts


def failover_reason(failure: UpstreamFailure) -> str | None:
    """Why a create may move to the next relay (contract §14's table); None: it may not."""
    if failure.outcome is Outcome.NOT_SENT:
        return "not_sent"
    if failure.outcome is Outcome.UNKNOWN:
        return None  # never: the relay may have created the task
    status = failure.upstream_status
    if status == 429:
        return "rate_limited"
    if status in KEY_REFUSED_STATUSES:
        return "key_refused"
    if status is not None and status >= 500:
        return "error"
    return None  # another 4xx: the relay judged the request itself


class Relays:
    """Every configured relay's client, by id, kept across reloads (a relay keeps its
    circuit and counters while its id stays in the file)."""

    def __init__(self, config: Config, metrics: Metrics, rng: random.Random | None = None):
        self.metrics = metrics
        self._rng = rng or random.Random()
        self.clients: dict[str, RelayClient] = {}
        self._retired: list[RelayClient] = []
        self._started = False
        self.routing = RoutingConfig()
        self.default_id = ""
        self.reconfigure(config)

    # configuration ------------------------------------------------------------------
    def reconfigure(self, config: Config) -> None:
        """Take a (re)loaded config: new relays get a client, changed ones their settings,
        removed ones stop taking anything new (their client closes at shutdown)."""
        relays = config.relay_list
        self.routing = config.routing
        several = len(relays) > 1
        clients: dict[str, RelayClient] = {}
        for relay in relays:
            client = self.clients.get(relay.id)
            if client is None:
                client = RelayClient(
                    relay, self.metrics, relay_id=relay.id, cooldown_seconds=config.routing.cooldown_seconds
                )
                if self._started:
                    client.open()
            else:
                client.reconfigure(relay, config.routing.cooldown_seconds)
            client.answers_count = several
            clients[relay.id] = client
        self._retired += [c for rid, c in self.clients.items() if rid not in clients]
        self.clients = clients
        self.default_id = relays[0].id
        self.metrics.add_relays(list(clients))

    @property
    def several(self) -> bool:
        return len(self.clients) > 1

    def get(self, relay_id: str) -> RelayClient:
        """The relay a task belongs to; "" (a task recorded before relays had ids) is the
        first relay. A relay removed from the file is kept until shutdown, so its tasks
        still reach it (a reload refuses to remove one with active tasks)."""
        found = self.clients.get(relay_id or self.default_id)
        if found is not None:
            return found
        for client in self._retired:
            if client.id == relay_id:
                return client
        return self.clients[self.default_id]

    @property
    def default(self) -> RelayClient:
        return self.clients[self.default_id]

    async def start(self) -> None:
        self._started = True
        for client in self.clients.values():
            client.open()

    async def close(self) -> None:
        for client in [*self.clients.values(), *self._retired]:
            await client.close()

    # choice and failover ------------------------------------------------------------
    def plan(self, allowed: tuple[str, ...]) -> list[RelayClient]:
        """The relays a new task may go to, in the order to try them, at most
        `max_attempts` (choice.plan). Empty when every relay the tenant may use is drained."""
        candidates = [c for rid, c in self.clients.items() if c.enabled and (not allowed or rid in allowed)]
        order: list[RelayClient] = choice.plan(candidates, self._rng)  # type: ignore[assignment]
        return order[: self.routing.max_attempts]

    async def create(
        self, body: dict[str, Any], plan: list[RelayClient], key_index: int, request_id: str, switch: Switch
    ) -> Routed:
        """Send the create to `plan[0]` with `key_index` (the reservation's), then, while
        each relay certainly created nothing, to the next; `switch(relay, key_index)` is
        awaited before the create goes anywhere else than the reservation names (the store
        records it first). Raises RouteFailed."""
        relay, key = plan[0], key_index
        failure: UpstreamFailure | None = None
        attempts = 0
        for attempts, client in enumerate(plan, 1):
            first = key_index if attempts == 1 else client.pick_key()
            keys = [first, *(k for k in client.key_order(first) if k != first)] if self.several else [first]
            refused, since = 0, client.circuit.clock()
            for k in keys:
                if (client, k) != (relay, key):
                    try:
                        await switch(client.id, k)
                    except Exception:  # not recorded, so not sent: the answers so far stand
                        assert failure is not None  # only after an answer: the first send needs no switch
                        tried = attempts if client is relay else attempts - 1
                        raise RouteFailed(failure, relay.id, key, tried) from None
                    relay, key = client, k
                try:
                    task = await client.create(body, k, request_id)
                except UpstreamFailure as failed:
                    failure = failed
                    if self.several and failover_reason(failed) == "key_refused":
                        refused += 1
                        continue
                    break
                return Routed(task, client.id, k, attempts)
            assert failure is not None
            if refused == len(keys):
                client.refused_keys(since)
            reason = failover_reason(failure)
            if reason is None:
                raise RouteFailed(failure, relay.id, key, attempts)
            if attempts < len(plan):
                client.failovers += 1
                self.metrics.count(self.metrics.relay_failovers, (client.id, reason))
        assert failure is not None
        if self.several:  # the one relay of old answers for itself, as it always did
            failure = self.all_refused(plan)
        raise RouteFailed(failure, relay.id, key, attempts)

    def all_refused(self, tried: list[RelayClient]) -> UpstreamFailure:
        """Every relay the create could try refused it (none created anything): 503, retry
        when the first of them comes back."""
        seconds = max(1, math.ceil(min(c.seconds_until_ready() for c in tried)))
        return UpstreamFailure(
            503,
            "upstream_unavailable",
            f"Every relay refused the create (none created anything); retry after {seconds} s.",
            Outcome.REJECTED,
            headers={"retry-after": str(seconds)},
        )

    # operations ---------------------------------------------------------------------
    def export(self) -> None:
        """gateway_relay_up of every relay: 1 closed, 0.5 half-open, 0 open or cooling."""
        for client in self.clients.values():
            self.metrics.child(self.metrics.relay_up, client.id).set(UP[client.state])

    def readiness(self) -> dict[str, Any]:
        """/readyz's view of the relays: the best circuit among them (any relay closed:
        closed), whether any key is refused, and the refused key indices (of every relay)."""
        states = {c.circuit.state for c in self.clients.values()}
        best = next(s for s in ("closed", "half_open", "open") if s in states)
        failing = sorted({k for c in self.clients.values() for k in c.keys.failing})
        return {
            "upstream_circuit": best,
            "upstream_auth": "failing" if failing else "ok",
            "upstream_auth_failing_keys": failing,
        }

    def view(self, now: float) -> list[dict[str, Any]]:
        """GET /admin/v1/relays: each relay as this process sees it; never a key."""
        return [client.view(now) for client in self.clients.values()]


UP = {"closed": 1.0, "half_open": 0.5, "open": 0.0, "cooling": 0.0}
