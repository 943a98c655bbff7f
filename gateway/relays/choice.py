"""Which relays a new task may go to, in the order to try them (contract §14).

Among the enabled relays the tenant's policy allows, those whose circuit is open (or whose
one probe is out) or that cool after a 429 are skipped; the rest are tried by `priority`
(lower first), and within one priority in a random order drawn by `weight`. When every
allowed relay is skipped, they are tried anyway, by priority: each answers for itself (an
open circuit refuses at once, without a connection), which is what the one relay of old did.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class Candidate(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def weight(self) -> int: ...

    @property
    def available(self) -> bool: ...


def by_weight(items: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
    """A random order in which each next item is drawn with probability weight / the sum
    of the weights left (so the first is picked in proportion to its weight)."""
    left = list(items)
    order: list[Candidate] = []
    while left:
        pick = rng.uniform(0, sum(c.weight for c in left))
        for i, c in enumerate(left):
            pick -= c.weight
            if pick <= 0 or i == len(left) - 1:
                order.append(left.pop(i))
                break
    return order


def plan(allowed: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
    """The order to try `allowed` (enabled, under the tenant's policy) in."""
    if len(allowed) < 2:  # the one relay of old: nothing to choose (the create path's usual case)
        return list(allowed)
    ready = [c for c in allowed if c.available] or list(allowed)
    order: list[Candidate] = []
    for priority in sorted({c.priority for c in ready}):
        order += by_weight([c for c in ready if c.priority == priority], rng)
    return order
