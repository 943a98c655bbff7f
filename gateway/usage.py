"""The usage ledger's report: `GET /admin/v1/usage` and `runway-gateway admin usage`.

The store keeps one ledger row per UTC day, tenant, key and relay (`Store.ledger`); this module
reads a request's `from`, `to`, `tenant`, `key_id`, `group_by` and `format`, sums the
rows into the groups asked for, and renders them as the API's JSON rows or as CSV. A
field not grouped by is left out of every row (not summed into a meaningless value).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.errors import bad_request
from gateway.store.base import LEDGER_COUNTERS, LedgerRow, Store, Usage
from gateway.store.rules import day_key

MAX_DAYS = 366  # the longest range, `from` and `to` included
DEFAULT_DAYS = 30  # `from` defaults to this many days before `to`
GROUP_FIELDS = {"day": "date", "tenant": "tenant", "key": "key_id", "relay": "relay"}  # group_by part -> row field
DEFAULT_GROUP_BY = ("day", "tenant")
FORMATS = ("json", "csv")
DAY_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
# A text cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class UsageQuery:
    """A checked request for the report. `group_by` is in row order (day, tenant, key, relay)."""

    from_day: str
    to_day: str
    tenant: str | None = None
    key_id: str | None = None
    group_by: tuple[str, ...] = DEFAULT_GROUP_BY
    format: str = "json"

    @property
    def fields(self) -> list[str]:
        """The columns of a row: the grouped fields, then the counters."""
        return [GROUP_FIELDS[part] for part in self.group_by] + list(LEDGER_COUNTERS)


def today(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


def parse_day(text: str, param: str) -> date:
    """A `YYYY-MM-DD` date (only that form: ISO's other spellings are refused)."""
    try:
        if DAY_RE.match(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise bad_request("invalid_value", f"`{param}` must be a date as YYYY-MM-DD (UTC), got {text!r}.", param)


def parse_group_by(text: str) -> tuple[str, ...]:
    """`day,tenant,key,relay` or any non-empty subset, in any order; returned in row order."""
    parts = {part.strip() for part in text.split(",")}
    unknown = sorted(parts - GROUP_FIELDS.keys())
    if not text.strip() or unknown:
        shown = f": {', '.join(repr(p) for p in unknown)} unknown" if text.strip() else ""
        raise bad_request(
            "invalid_value",
            f"`group_by` must be one or more of day, tenant, key, relay, comma-separated{shown}.",
            "group_by",
        )
    return tuple(part for part in GROUP_FIELDS if part in parts)


def parse_query(params: Mapping[str, str], now: float) -> UsageQuery:
    """The report a request asks for: `to` defaults to today (UTC) and `from` to 30 days
    before `to`; the range is at most MAX_DAYS days. Raises the 400 of the first bad one."""
    to_text, from_text = params.get("to"), params.get("from")
    to_day = parse_day(to_text, "to") if to_text is not None else today(now)
    if from_text is not None:
        from_day = parse_day(from_text, "from")
    else:
        try:
            from_day = to_day - timedelta(days=DEFAULT_DAYS)
        except OverflowError:
            raise bad_request("invalid_value", "`to` is too early for the default range: give `from`.", "to") from None
    if from_day > to_day:
        raise bad_request("invalid_value", f"`from` ({from_day}) is after `to` ({to_day}).", "from")
    if (to_day - from_day).days + 1 > MAX_DAYS:
        raise bad_request(
            "invalid_value", f"The range from `from` to `to` is at most {MAX_DAYS} days (both included).", "from"
        )
    fmt = params.get("format") or "json"
    if fmt not in FORMATS:
        raise bad_request("invalid_value", "`format` must be json or csv.", "format")
    group_text = params.get("group_by")
    return UsageQuery(
        from_day.isoformat(),
        to_day.isoformat(),
        params.get("tenant") or None,
        params.get("key_id") or None,
        DEFAULT_GROUP_BY if group_text is None else parse_group_by(group_text),
        fmt,
    )


def group(rows: list[LedgerRow], group_by: tuple[str, ...], first_relay: str = "") -> list[dict[str, Any]]:
    """The ledger rows summed per group, as the API's rows, sorted by (date, tenant,
    key_id, relay) with no key (a JWT's) first. A row booked before relays had ids is the
    first relay's (`first_relay`: the one relay there was)."""
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in rows:
        values = {"date": row.day, "tenant": row.tenant_id, "key_id": row.key_id, "relay": row.relay or first_relay}
        shown = {GROUP_FIELDS[part]: values[GROUP_FIELDS[part]] for part in group_by}
        sums = groups.setdefault(
            tuple(str(v or "") for v in shown.values()), {**shown, **dict.fromkeys(LEDGER_COUNTERS, 0)}
        )
        for counter in LEDGER_COUNTERS:
            sums[counter] += getattr(row, counter)
    return [groups[k] for k in sorted(groups)]


async def key_usage(store: Store, key_id: str, now: float) -> Usage:
    """A key's usage now (`GET /admin/v1/keys/{id}`, contract §15): tasks and credits
    today and this UTC month from the ledger's rows of the key (credits net of refunds:
    what a budget counts), active tasks from the key's own quota (counted while the key
    has limits; 0 for a key without)."""
    today = day_key(now)
    rows, quota = await store.ledger(today[:8] + "01", today, key_id=key_id), await store.key_usage(key_id, now)
    month = Usage(active=quota.active)
    for row in rows:
        credits = row.credits_charged - row.credits_refunded
        month.tasks_this_month += row.tasks_created
        month.credits_this_month += credits
        if row.day == today:
            month.tasks_today += row.tasks_created
            month.credits_today += credits
    return month


def to_csv(rows: list[dict[str, Any]], query: UsageQuery) -> str:
    """The same rows as CSV (RFC 4180 line ends), a header row first; no key is an empty cell.
    Text cells are made safe for spreadsheets (`csv_cell`); the counters stay numbers."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([csv_cell(f) for f in query.fields])
    for row in rows:
        writer.writerow([csv_cell(row[f]) for f in query.fields])
    return out.getvalue()


def csv_cell(value: Any) -> Any:
    """A cell as a spreadsheet should read it: text that would start a formula (a tenant id
    like `-1-1` or `=HYPERLINK(...)`) gets a leading `'` (OWASP's rule), so Excel shows it
    instead of computing it; numbers the gateway counted are written as they are; None is ''."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
