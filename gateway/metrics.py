"""Every Prometheus series the gateway exports, declared in one place.

Labels are bounded: tenant ids from the config, route templates, status codes, fixed
result names. Never a key, task id or prompt. Labelled series get a zero child for every
configured tenant and known label value at start, so dashboards see them from the first
scrape (in multiprocess mode a series exists only once a child was touched).

Gauges that describe global state (active tasks, pending webhooks, budget usage) are read
from the store at scrape time, so every replica and worker reports the same value.

The series every request touches (requests, durations, upstream calls, creates, credits)
are buffered in plain dicts and pushed into prometheus_client every FLUSH_SECONDS and before
each scrape, as Envoy flushes its stats: a buffered update is a dict update, where
prometheus_client takes a lock and, across workers, writes an mmapped file (the costs are in
docs/benchmarks.md). A histogram's buffer counts per bucket, as `observe()` would, and the
flush adds each non-empty bucket's count and the sum once: one locked write per cell, not
two per observation. prometheus_client has no public way to do that (its maintainers point
to custom collectors, which multiprocess mode does not aggregate), so `_HistogramCells` is
the one place that reads its histogram internals; should they ever change shape, the
buffer keeps the values and replays them through `observe()` instead.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import __version__
from gateway.store.base import ALL_LIMITS, Store, Usage

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TASK_BUCKETS = (10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
TASK_STATUSES = ("SUCCEEDED", "FAILED", "CANCELLED")
CALLBACK_RESULTS = ("applied", "duplicate", "stale", "adopted", "unknown", "bad_token", "invalid")
WEBHOOK_RESULTS = ("delivered", "failed", "gave_up")
AUTH_REASONS = (
    "missing",
    "malformed",
    "unknown_key",
    "unknown_tenant",
    "jwt_expired",
    "jwt_audience",
    "jwt_issuer",
    "jwt_algorithm",
    "jwt_invalid",
    "tenant_disabled",
)
UPSTREAM_OPERATIONS = ("create", "status", "artifact")
UPSTREAM_OUTCOMES = ("200", "error", "timeout", "circuit_open")  # plus any HTTP status seen
FAILOVER_REASONS = ("not_sent", "rate_limited", "error", "key_refused")  # gateway_relay_failovers_total
BUDGET_LIMITS = ("max_active_tasks", "tasks_per_day", "credits_per_day", "credits_per_month")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_SECONDS = 1.0  # the most another worker's request counts can lag on /metrics


class Metrics:
    def __init__(self, tenant_ids: Iterable[str], registry: CollectorRegistry | None = None, upstream_keys: int = 1):
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        # In multiprocess mode values live in files; this registry only keeps names unique.
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by tenant, route template, method and status.",
            ["tenant", "route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time to answer a request.",
            ["route", "method"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "gateway_upstream_requests_total",
            "Calls to the upstream relays, by relay, operation and outcome.",
            ["relay", "operation", "status"],
            registry=r,
        )
        self.upstream_auth_failures = Counter(
            "gateway_upstream_auth_failures_total",
            "Upstream answers 401/403 (the relay refused the key), by index in upstream.api_keys.",
            ["key_index"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_request_duration_seconds",
            "Time the upstream took to answer, by relay and operation.",
            ["relay", "operation"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.relay_up = Gauge(
            "gateway_relay_up",
            "A relay as this process sees it: 1 closed, 0.5 half-open, 0 open or cooling after a 429.",
            ["relay"],
            multiprocess_mode="min",
            registry=r,
        )
        self.relay_failovers = Counter(
            "gateway_relay_failovers_total",
            "Creates that left a relay for the next one, by the relay they left and why.",
            ["relay", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures_total", "Rejected credentials, by reason.", ["reason"], registry=r
        )
        self.quota_rejections = Counter(
            "gateway_quota_rejections_total",
            "Requests refused by a quota, by tenant and limit.",
            ["tenant", "limit"],
            registry=r,
        )
        self.tasks_created = Counter(
            "gateway_tasks_created_total", "Tasks the upstream accepted.", ["tenant", "task_type"], registry=r
        )
        self.tasks_finished = Counter(
            "gateway_tasks_finished_total", "Tasks that reached a terminal state.", ["tenant", "status"], registry=r
        )
        self.credits_charged = Counter(
            "gateway_credits_charged_total", "Credits charged at admission.", ["tenant"], registry=r
        )
        self.credits_refunded = Counter("gateway_credits_refunded_total", "Credits given back.", ["tenant"], registry=r)
        self.callbacks = Counter(
            "gateway_callbacks_received_total", "Upstream callbacks, by what they did.", ["result"], registry=r
        )
        self.webhook_deliveries = Counter(
            "gateway_webhook_deliveries_total",
            "Tenant webhook delivery attempts, by result.",
            ["tenant", "result"],
            registry=r,
        )
        self.task_duration = Histogram(
            "gateway_task_duration_seconds",
            "Task creation to terminal state.",
            ["task_type", "status"],
            buckets=TASK_BUCKETS,
            registry=r,
        )
        self.callback_lag = Histogram(
            "gateway_callback_lag_seconds", "Upstream updatedAt to callback receipt.", buckets=LAG_BUCKETS, registry=r
        )
        self.config_reloads = Counter(
            "gateway_config_reloads_total", "Config file reloads (SIGHUP), by result.", ["result"], registry=r
        )
        self.build_info = Gauge(
            "gateway_build_info", "Build information.", ["version"], multiprocess_mode="max", registry=r
        )
        self.build_info.labels(__version__).set(1)
        self._tenant_ids = tuple(tenant_ids)
        self._relay_ids: tuple[str, ...] = ()
        self._upstream_keys = upstream_keys
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._counts: dict[tuple[Counter, tuple[str, ...]], float] = {}
        # per histogram child: its cells and [sum, count in bucket 0, 1, ...], or no cells and
        # the values in order when its internals are not the expected ones (`_HistogramCells`)
        self._observed: dict[tuple[Histogram, tuple[str, ...]], tuple[_HistogramCells | None, list[float]]] = {}
        self._cells: dict[tuple[Histogram, tuple[str, ...]], _HistogramCells | None] = {}
        self._zero_children()

    def add_tenants(self, tenant_ids: Iterable[str]) -> None:
        """Tenants that appeared since start (the store's directory, a reloaded config):
        their series exist at zero from now on, and the store gauges cover them."""
        new = [t for t in tenant_ids if t not in self._tenant_ids]
        if new:
            self._tenant_ids = (*self._tenant_ids, *new)
            self._zero_tenants(new)

    def add_relays(self, relay_ids: Iterable[str]) -> None:
        """Relays configured (at start or by a reload): their series exist at zero from now on."""
        new = [r for r in relay_ids if r not in self._relay_ids]
        if new:
            self._relay_ids = (*self._relay_ids, *new)
            self._zero_relays(new)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: labels() takes a lock and rebuilds the label
        tuple on every call; the values here are bounded (configured tenants, route
        templates, status codes, fixed names)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def count(self, counter: Counter, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """`counter.labels(*labels).inc(amount)` at the next `flush`."""
        key = (counter, labels)
        pending = self._counts.get(key)
        if pending is None:
            self.child(counter, *labels)  # the series exists from its first update on, in every worker's view
            pending = 0.0
        self._counts[key] = pending + amount

    def observe(self, histogram: Histogram, labels: tuple[str, ...], value: float) -> None:
        """`histogram.labels(*labels).observe(value)` at the next `flush`."""
        key = (histogram, labels)
        entry = self._observed.get(key)
        if entry is None:
            entry = self._observed[key] = self._empty_buffer(key)
        cells, slots = entry
        if cells is None:
            slots.append(value)
        else:
            slots[0] += value
            slots[1 + bisect_left(cells.bounds, value)] += 1  # the first bucket whose bound is >= value

    def _empty_buffer(self, key: tuple[Histogram, tuple[str, ...]]) -> tuple[_HistogramCells | None, list[float]]:
        if key not in self._cells:
            # as in count(): the series exists from its first update on
            self._cells[key] = _HistogramCells.of(self.child(key[0], *key[1]))
        cells = self._cells[key]
        return cells, [0.0] * (len(cells.bounds) + 1) if cells else []

    def flush(self) -> None:
        """Push the buffered updates into prometheus_client (its values, or the worker's file)."""
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, {}
        for (counter, labels), amount in counts.items():
            self.child(counter, *labels).inc(amount)
        for (histogram, labels), (cells, slots) in observed.items():
            if cells is not None:
                cells.add(slots)
                continue
            observe = self.child(histogram, *labels).observe
            for value in slots:
                observe(value)

    def _zero_children(self) -> None:
        self._zero_tenants(self._tenant_ids)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)
        self._zero_fixed()

    def _zero_tenants(self, tenant_ids: Iterable[str]) -> None:
        for tenant in tenant_ids:
            for limit in ALL_LIMITS:
                self.quota_rejections.labels(tenant, limit)
            self.tasks_created.labels(tenant, "gen2")
            for status in TASK_STATUSES:
                self.tasks_finished.labels(tenant, status)
            self.credits_charged.labels(tenant)
            self.credits_refunded.labels(tenant)
            for result in WEBHOOK_RESULTS:
                self.webhook_deliveries.labels(tenant, result)

    def _zero_fixed(self) -> None:
        for result in CALLBACK_RESULTS:
            self.callbacks.labels(result)
        for reason in AUTH_REASONS:
            self.auth_failures.labels(reason)
        for status in TASK_STATUSES:
            self.task_duration.labels("gen2", status)
        for index in range(self._upstream_keys):
            self.upstream_auth_failures.labels(str(index))

    def _zero_relays(self, relay_ids: Iterable[str]) -> None:
        for relay in relay_ids:
            for op in UPSTREAM_OPERATIONS:
                self.upstream_duration.labels(relay, op)
                for status in UPSTREAM_OUTCOMES:
                    self.upstream_requests.labels(relay, op, status)
            for reason in FAILOVER_REASONS:
                self.relay_failovers.labels(relay, reason)
            self.relay_up.labels(relay).set(1.0)

    async def render(self, store: Store, limits: dict[str, dict[str, int | None]], now: float) -> bytes:
        """One scrape: this process's (or every worker's) series plus the store's gauges."""
        self.flush()
        ready = 1.0
        try:
            await store.ping()  # what /readyz asks: can the store take writes (reads alone pass on a demoted Redis)
            active = await store.active_by_tenant()
            pending = await store.webhook_pending()
            usage = {t: await store.usage(t, now) for t in self._tenant_ids}
        except Exception:  # the store is down: say so, still export the rest
            ready, active, pending, usage = 0.0, {}, 0, {}
        if self.multiprocess:
            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # registers itself
        else:
            registry = self.registry
        gauges = _StoreGauges(self._tenant_ids, active, pending, usage, limits, ready)
        registry.register(gauges)
        try:
            return generate_latest(registry)
        finally:
            registry.unregister(gauges)


@dataclass(frozen=True)
class _HistogramCells:
    """A histogram child's cells as its `observe()` updates them: the sum, and one counter per
    upper bound (+Inf last; an observation counts in the first bucket whose bound is >= it,
    the exposition accumulates them). `of` returns None for a prometheus_client whose
    histograms are not built this way."""

    bounds: Sequence[float]
    total: Any  # the _sum value (a lock-guarded float, or a cell of the worker's mmapped file)
    buckets: Sequence[Any]

    @classmethod
    def of(cls, child: Any) -> _HistogramCells | None:
        bounds = getattr(child, "_upper_bounds", None)
        total = getattr(child, "_sum", None)
        buckets = getattr(child, "_buckets", None)
        if not isinstance(bounds, list) or not isinstance(buckets, list) or len(bounds) != len(buckets):
            return None
        if not all(hasattr(cell, "inc") for cell in [total, *buckets]):
            return None
        return cls(tuple(bounds), total, tuple(buckets))

    def add(self, slots: list[float]) -> None:
        """Add a buffer of [sum, count per bucket]: one write per non-empty cell."""
        self.total.inc(slots[0])
        for cell, n in zip(self.buckets, slots[1:], strict=True):
            if n:
                cell.inc(n)


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, as the registry keys collectors
class _StoreGauges:
    """Scrape-time gauges read from the store (the same value on every replica)."""

    tenants: tuple[str, ...]
    active: dict[str, int]
    pending: int
    usage: dict[str, Usage]
    limits: dict[str, dict[str, int | None]]
    ready: float

    def collect(self) -> Iterable[Metric]:
        active = GaugeMetricFamily(
            "gateway_tasks_active", "Tasks created and not yet terminal (store-wide).", labels=["tenant"]
        )
        for t in self.tenants:
            active.add_metric([t], float(self.active.get(t, 0)))
        yield active
        yield GaugeMetricFamily(
            "gateway_webhook_pending",
            "Tenant webhook events not yet delivered (store-wide).",
            value=float(self.pending),
        )
        yield GaugeMetricFamily(
            "gateway_ready", "1 when the store answered and took a write at this scrape.", value=self.ready
        )
        ratio = GaugeMetricFamily(
            "gateway_quota_usage_ratio", "Used share of a tenant's budget (0..1).", labels=["tenant", "limit"]
        )
        for t, u in self.usage.items():
            used = {
                "max_active_tasks": u.active,
                "tasks_per_day": u.tasks_today,
                "credits_per_day": u.credits_today,
                "credits_per_month": u.credits_this_month,
            }
            for limit in BUDGET_LIMITS:
                cap = self.limits.get(t, {}).get(limit)
                if cap:
                    ratio.add_metric([t, limit], min(1.0, used[limit] / cap))
        yield ratio
