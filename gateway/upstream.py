"""The relay client's old home: one relay's client now lives in `gateway.relays.client`
(and the set of relays in `gateway.relays`); these names stay importable from here."""

from __future__ import annotations

from gateway.relays.circuit import CIRCUIT_FAILURES, CIRCUIT_OPEN_SECONDS, CircuitBreaker, KeyHealth
from gateway.relays.client import Outcome, RelayClient, UpstreamFailure, retry_after_seconds

Upstream = RelayClient

__all__ = [
    "CIRCUIT_FAILURES",
    "CIRCUIT_OPEN_SECONDS",
    "CircuitBreaker",
    "KeyHealth",
    "Outcome",
    "RelayClient",
    "Upstream",
    "UpstreamFailure",
    "retry_after_seconds",
]
