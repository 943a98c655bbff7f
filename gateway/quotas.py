"""Turning the store's admission decisions into HTTP: 429 errors and OpenAI rate headers.

The decisions themselves (token buckets, budgets, all-or-nothing) are made inside the
store, atomically; this module only words them.
"""

from __future__ import annotations

import math

from gateway.config import Tenant
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.store.base import KEY_LIMIT, Admission, KeyLimits, RateInfo

MESSAGES = {
    "requests_per_minute": "Rate limit reached for requests_per_minute ({limit}/min).",
    "tasks_per_minute": "Rate limit reached for tasks_per_minute ({limit}/min).",
    "max_active_tasks": "Concurrency limit reached: max_active_tasks is {limit}; wait for a task to finish.",
    "tasks_per_day": "Daily task budget exhausted (tasks_per_day = {limit}); it resets at 00:00 UTC.",
    "credits_per_day": "Daily credit budget exhausted (credits_per_day = {limit}); it resets at 00:00 UTC.",
    "credits_per_month": (
        "Monthly credit budget exhausted (credits_per_month = {limit}); it resets on the 1st, 00:00 UTC."
    ),
}


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `1h2m3s` (whole seconds, rounded up)."""
    total = max(0, math.ceil(seconds - 1e-9))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_headers(info: RateInfo | None) -> dict[str, str]:
    if info is None:
        return {}
    return {
        "x-ratelimit-limit-requests": str(info.limit),
        "x-ratelimit-remaining-requests": str(info.remaining),
        "x-ratelimit-reset-requests": format_duration(info.reset_seconds),
    }


def refused(admission: Admission, tenant: Tenant, metrics: Metrics, key: KeyLimits | None = None) -> GatewayError:
    """The 429 for a refused admission, counted (a key's limit as `key_<limit>`). It
    carries its own x-ratelimit headers (the bucket the refusal saw), so the request's
    context is left without a rate."""
    label = admission.limit or "requests_per_minute"
    metrics.count(metrics.quota_rejections, (tenant.id, label))
    headers = {"retry-after": str(max(1, math.ceil(admission.retry_after - 1e-9))), **rate_headers(admission.rate)}
    error_type = "insufficient_quota" if admission.code == "insufficient_quota" else "rate_limit_error"
    name = label.removeprefix(KEY_LIMIT)
    if name != label:  # the caller's key's own limit (contract §15)
        value = getattr(key.limits, name) if key is not None else None
        key_id = key.key_id if key is not None else "?"
        message = f"This API key's own limit ({key_id}), not its tenant's: " + MESSAGES[name].format(limit=value)
        return GatewayError(429, admission.code, message, error_type, None, headers)
    message = MESSAGES[name].format(limit=getattr(tenant.limits, name))
    return GatewayError(429, admission.code, message, error_type, None, headers)
