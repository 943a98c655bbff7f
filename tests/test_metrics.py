"""The request path's buffered metrics: what a flush pushes is exactly what direct
prometheus_client calls would have recorded, and a scrape always includes it."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from gateway.metrics import Metrics, _HistogramCells
from gateway.store.base import Usage

OBSERVATIONS = (0.0004, 0.001, 0.0011, 0.02, 0.02, 0.7, 3.0, 9.5, 120.0)


def exposition(m: Metrics) -> list[str]:
    """The text a scrape shows, without the _created timestamps (they differ per object)."""
    return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]


def test_flushed_updates_equal_direct_prometheus_calls() -> None:
    buffered = Metrics(["acme"], registry=CollectorRegistry())
    direct = Metrics(["acme"], registry=CollectorRegistry())
    for i, seconds in enumerate(OBSERVATIONS):
        status = "200" if i % 3 else "429"
        buffered.count(buffered.requests, ("acme", "/runway/tasks", "POST", status))
        buffered.observe(buffered.request_duration, ("/runway/tasks", "POST"), seconds)
        buffered.observe(buffered.upstream_duration, ("default", "create"), seconds * 2)
        buffered.count(buffered.credits_charged, ("acme",), 5)
        direct.requests.labels("acme", "/runway/tasks", "POST", status).inc()
        direct.request_duration.labels("/runway/tasks", "POST").observe(seconds)
        direct.upstream_duration.labels("default", "create").observe(seconds * 2)
        direct.credits_charged.labels("acme").inc(5)
    assert exposition(buffered) != exposition(direct)  # nothing pushed yet
    buffered.flush()
    assert exposition(buffered) == exposition(direct)
    assert 'gateway_request_duration_seconds_bucket{le="0.001",method="POST",route="/runway/tasks"} 2.0' in exposition(
        buffered
    )
    buffered.flush()  # a second flush adds nothing
    assert exposition(buffered) == exposition(direct)


def test_histograms_are_buffered_per_bucket_on_this_prometheus_client() -> None:
    """The buffer counts per bucket against prometheus_client's own cells: on the pinned
    version they are found (else every flush would replay each value, the slow path)."""
    m = Metrics(["acme"], registry=CollectorRegistry())
    m.observe(m.request_duration, ("/runway/tasks", "POST"), 0.003)
    m.observe(m.request_duration, ("/runway/tasks", "POST"), 0.004)
    cells, slots = m._observed[(m.request_duration, ("/runway/tasks", "POST"))]
    assert cells is not None
    assert list(cells.bounds[:3]) == [0.001, 0.0025, 0.005]
    assert slots[0] == 0.007 and slots[3] == 2 and sum(slots[1:]) == 2  # the sum, then both in the 0.005 bucket


def test_histograms_without_the_expected_cells_replay_their_values() -> None:
    """Should prometheus_client's histogram internals change shape, the flush falls back to
    observe() per value, with the same exposition."""
    assert _HistogramCells.of(object()) is None
    buffered = Metrics(["acme"], registry=CollectorRegistry())
    direct = Metrics(["acme"], registry=CollectorRegistry())
    buffered._cells[(buffered.upstream_duration, ("default", "create"))] = None  # as `of` answers for unknown internals
    for seconds in OBSERVATIONS:
        buffered.observe(buffered.upstream_duration, ("default", "create"), seconds)
        direct.upstream_duration.labels("default", "create").observe(seconds)
    buffered.flush()
    assert exposition(buffered) == exposition(direct)


class _Store:
    async def active_by_tenant(self) -> dict[str, int]:
        return {}

    async def webhook_pending(self) -> int:
        return 0

    async def usage(self, tenant_id: str, now: float) -> Usage:
        return Usage(0, 0, 0, 0)


def test_a_series_exists_from_its_first_update() -> None:
    """Another worker may scrape before this one flushes: the series must be there (at 0)."""
    m = Metrics(["acme"], registry=CollectorRegistry())
    m.count(m.requests, ("acme", "/runway/tasks", "POST", "200"))
    m.observe(m.request_duration, ("/runway/tasks", "POST"), 0.01)
    text = "\n".join(exposition(m))
    assert 'gateway_requests_total{method="POST",route="/runway/tasks",status="200",tenant="acme"} 0.0' in text
    assert 'gateway_request_duration_seconds_count{method="POST",route="/runway/tasks"} 0.0' in text


def test_a_scrape_includes_what_is_still_buffered() -> None:
    m = Metrics(["acme"], registry=CollectorRegistry())
    m.count(m.tasks_created, ("acme", "gen2"), 3)
    text = asyncio.run(m.render(_Store(), {}, 0.0)).decode()  # type: ignore[arg-type]
    assert 'gateway_tasks_created_total{task_type="gen2",tenant="acme"} 3.0' in text
