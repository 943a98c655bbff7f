"""`runway-gateway admin ...`: the admin API from a shell, for operators and scripts.

Tables for people, `--json` for scripts (the API's own JSON). Exit 0 on success, 1 when
the gateway answered an error (its message on stderr) or could not be reached, 2 for a
usage error (argparse's own exit code). The URL and admin key come from flags or from
RUNWAY_GATEWAY_URL and RUNWAY_GATEWAY_ADMIN_KEY, so the key need not be on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from gateway.errors import GatewayError
from gateway.store.base import ALL_LIMITS, SCOPES
from gateway.usage import parse_day, parse_group_by

URL_ENV, KEY_ENV = "RUNWAY_GATEWAY_URL", "RUNWAY_GATEWAY_ADMIN_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_RE = re.compile(r"^(\d+)([smhdw]?)$")
V1 = "/admin/v1"
WEBHOOK_STATUSES = ("pending", "dead")


class ApiError(Exception):
    """The gateway answered an error, or could not be reached: exit 1."""


# --- argument types --------------------------------------------------------------------


def duration(text: str) -> int:
    """`30d`, `1h`, `15m`, `45s`, `2w` or plain seconds, as whole seconds."""
    m = DURATION_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 30d, 12h, 15m, 45s or seconds)")
    return int(m.group(1)) * UNITS[m.group(2) or "s"]


def page_size(text: str) -> int:
    """`--limit` of a list: 1 to 1000, as the API takes it."""
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer from 1 to 1000")
    return int(text)


def day(text: str) -> str:
    """`--from`/`--to`: a UTC date as YYYY-MM-DD."""
    try:
        return parse_day(text, "date").isoformat()
    except GatewayError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date as YYYY-MM-DD") from None


def group_by(text: str) -> str:
    """`--group-by`: day, tenant, key, relay or a comma-separated set of them (the API's
    own rule, `usage.parse_group_by`), in row order."""
    try:
        return ",".join(parse_group_by(text))
    except GatewayError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected day, tenant, key, relay or a comma-separated set of them"
        ) from None


def limit_setting(text: str) -> tuple[str, int | None]:
    """`NAME=VALUE` or `NAME=none` (no limit)."""
    name, sep, value = text.partition("=")
    if not sep or name not in ALL_LIMITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE with NAME one of {', '.join(ALL_LIMITS)}")
    if value.lower() == "none":
        return name, None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: VALUE must be a positive integer or none")
    return name, int(value)


def scope_setting(text: str) -> str:
    """`--scope`: create, read, delete, or (on update) all."""
    if text not in (*SCOPES, "all"):
        raise argparse.ArgumentTypeError(f"{text!r}: a scope is one of {', '.join(SCOPES)} (or all)")
    return text


def _key_access_arguments(p: argparse.ArgumentParser, *, update: bool) -> None:
    """A key's own limits, scopes and networks (contract §15), repeatable."""
    limit_help = "the key's own limit, on top of its tenant's" + ("; NAME=none removes it" if update else "")
    p.add_argument(
        "--limit",
        type=limit_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE|NAME=none" if update else "NAME=VALUE",
        help=limit_help,
    )
    p.add_argument(
        "--scope",
        type=scope_setting,
        action="append",
        default=[],
        metavar="SCOPE",
        help=f"what the key may do: {', '.join(SCOPES)} (repeat; default all{'; all restores all' if update else ''})",
    )
    p.add_argument(
        "--allow-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="a client network the key works from (repeat; default anywhere"
        + ("; any restores it)" if update else ")"),
    )


def _key_access_body(a: argparse.Namespace) -> dict[str, Any]:
    """The API body's limits, scopes and allowed_cidrs from the options given."""
    body: dict[str, Any] = {}
    if a.limit:
        body["limits"] = dict(a.limit)
    if a.scope:
        body["scopes"] = None if "all" in a.scope else a.scope
    if a.allow_cidr:
        body["allowed_cidrs"] = None if "any" in a.allow_cidr else a.allow_cidr
    return body


# --- the parser --------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """`admin` under `runway-gateway`'s subcommands."""
    p = sub.add_parser(
        "admin", help="manage tenants, keys, the audit trail and webhook deliveries of a running gateway; its relays"
    )
    _add_connection_options(p, url=os.environ.get(URL_ENV, DEFAULT_URL), admin_key=os.environ.get(KEY_ENV), json=False)
    groups = p.add_subparsers(dest="group", required=True, metavar="GROUP")

    tenants = groups.add_parser("tenants", help="list, show, create and update tenants")
    tv = tenants.add_subparsers(dest="verb", required=True, metavar="VERB")
    tv.add_parser("list", help="every tenant (config and API)").set_defaults(run=tenants_list)
    show = tv.add_parser("show", help="one tenant, with its usage today and this month")
    show.add_argument("id")
    show.set_defaults(run=tenants_show)
    create = tv.add_parser("create", help="a new tenant; prints its webhook secret once")
    create.add_argument("id")
    create.add_argument("--name")
    create.add_argument("--limit", type=limit_setting, action="append", default=[], metavar="NAME=VALUE")
    create.add_argument("--disabled", action="store_true", help="create it disabled")
    create.set_defaults(run=tenants_create)
    update = tv.add_parser("update", help="change a tenant's name, limits or state")
    update.add_argument("id")
    update.add_argument("--name")
    update.add_argument("--limit", type=limit_setting, action="append", default=[], metavar="NAME=VALUE|NAME=none")
    state = update.add_mutually_exclusive_group()
    state.add_argument("--enable", dest="enabled", action="store_const", const=True)
    state.add_argument("--disable", dest="enabled", action="store_const", const=False)
    update.set_defaults(run=tenants_update)

    keys = groups.add_parser("keys", help="mint, list, show, rotate and revoke API keys")
    kv = keys.add_subparsers(dest="verb", required=True, metavar="VERB")
    klist = kv.add_parser("list", help="a tenant's keys (config ones included)")
    klist.add_argument("tenant")
    klist.set_defaults(run=keys_list)
    kcreate = kv.add_parser("create", help="mint a key; prints its secret once")
    kcreate.add_argument("tenant")
    kcreate.add_argument("--name", required=True)
    kcreate.add_argument("--expires-in", type=duration, metavar="DURATION", help="e.g. 30d, 12h")
    _key_access_arguments(kcreate, update=False)
    kcreate.set_defaults(run=keys_create)
    kupdate = kv.add_parser("update", help="change a key's name, limits, scopes or networks")
    kupdate.add_argument("key_id")
    kupdate.add_argument("--name")
    _key_access_arguments(kupdate, update=True)
    kupdate.set_defaults(run=keys_update)
    kshow = kv.add_parser("show", help="one key")
    kshow.add_argument("key_id")
    kshow.set_defaults(run=keys_show)
    krotate = kv.add_parser("rotate", help="a new secret for the same key id; prints it once")
    krotate.add_argument("key_id")
    krotate.add_argument("--grace", type=duration, metavar="DURATION", help="the old secret works this long (1d)")
    krotate.set_defaults(run=keys_rotate)
    krevoke = kv.add_parser("revoke", help="revoke a key (at once, on every replica)")
    krevoke.add_argument("key_id")
    krevoke.set_defaults(run=keys_revoke)

    audit = groups.add_parser("audit", help="the audit trail, newest first")
    audit.add_argument("--limit", type=page_size, default=20, help="how many entries (20)")
    audit.add_argument("--tenant")
    audit.add_argument("--action", help="e.g. key.revoke")
    audit.set_defaults(run=audit_list)

    webhooks = groups.add_parser("webhooks", help="undelivered webhook events; redeliver dead ones")
    wv = webhooks.add_subparsers(dest="verb", required=True, metavar="VERB")
    wlist = wv.add_parser("list", help="pending and dead events, newest first")
    wlist.add_argument("--tenant")
    wlist.add_argument("--status", choices=WEBHOOK_STATUSES, help="only pending or only dead events")
    wlist.add_argument("--limit", type=page_size, default=100, help="how many events (100)")
    wlist.set_defaults(run=webhooks_list)
    wredeliver = wv.add_parser("redeliver", help="queue a dead event again (before its task's later events)")
    wredeliver.add_argument("event_id")
    wredeliver.set_defaults(run=webhooks_redeliver)
    relays = groups.add_parser(
        "relays",
        help="the relays: state, priority, weight, refused keys, failovers",
        description="The relays as the answering gateway process sees them (GET /admin/v1/relays):"
        " circuit state (closed, open, half_open, cooling) and until when, priority, weight, whether"
        " it takes new tasks, its refused keys, failovers and last error. Never a key.",
    )
    relays.set_defaults(run=relays_list)

    usage = groups.add_parser(
        "usage",
        help="the usage ledger: tasks and credits per UTC day, tenant, key and relay",
        description="Rows of the usage ledger between two UTC dates (both included, at most 366 days):"
        " tasks created, succeeded and failed, credits charged and refunded. The API's JSON with"
        " --json, its CSV with --csv.",
    )
    usage.add_argument(
        "--from", dest="from_day", type=day, metavar="DATE", help="first day (default: 30 days before --to)"
    )
    usage.add_argument("--to", dest="to_day", type=day, metavar="DATE", help="last day (default: today, UTC)")
    usage.add_argument("--tenant", help="one tenant only")
    usage.add_argument("--key-id", help="one API key only")
    usage.add_argument(
        "--group-by", type=group_by, metavar="day,tenant,key,relay", help="what a row sums over (day,tenant)"
    )
    usage.add_argument("--csv", action="store_true", help="print the API's CSV")
    usage.set_defaults(run=usage_report)
    _accept_connection_options_everywhere(p)


def _add_connection_options(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """--url, --admin-key and --json on `p`, with these defaults."""
    p.add_argument("--url", default=defaults["url"], help=f"the gateway (or {URL_ENV})")
    p.add_argument("--admin-key", default=defaults["admin_key"], help=f"an admin key (or {KEY_ENV})")
    p.add_argument(
        "--json", action="store_true", default=defaults["json"], help="print the API's JSON instead of tables"
    )


def _accept_connection_options_everywhere(admin: argparse.ArgumentParser) -> None:
    """The options of `admin` accepted after any group or verb too (`admin keys create T
    --name x --json`), as people type them. Below `admin` they default to SUPPRESS: given
    there they override, absent they leave `admin`'s value (or its environment default)."""
    for action in admin._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in set(action.choices.values()):
            suppress = argparse.SUPPRESS
            _add_connection_options(child, url=suppress, admin_key=suppress, json=suppress)
            _accept_connection_options_everywhere(child)


def run(args: argparse.Namespace) -> int:
    if not args.admin_key:
        print(f"admin: give --admin-key KEY or set {KEY_ENV}", file=sys.stderr)
        return 2
    client = Client(args.url, args.admin_key)
    command: Callable[[Client, argparse.Namespace], Any] = args.run
    try:
        data = command(client, args)
    except ApiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if isinstance(data, str):  # CSV, as the API sent it
        print(data, end="")
    elif args.json:
        print(json.dumps(data, indent=2))
    else:
        print(render(args, data))
    return 0


# --- talking to the gateway --------------------------------------------------------------


class Client:
    def __init__(self, url: str, admin_key: str):
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {admin_key}"}, timeout=15
        )

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        return self._answer(self._send(method, path, body, params), path)

    def text(self, path: str, **params: Any) -> str:
        """A GET whose success is not JSON (the usage CSV); an error is still the API's JSON."""
        resp = self._send("GET", path, None, params)
        if resp.status_code >= 400:
            self._answer(resp, path)  # raises ApiError
        return resp.text

    @staticmethod
    def _answer(resp: httpx.Response, path: str) -> Any:
        """The JSON of an answer; ApiError with the API's message for an error."""
        try:
            data = resp.json()
        except ValueError:
            raise ApiError(f"HTTP {resp.status_code} from {path}: not JSON") from None
        if resp.status_code >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            param = f" (param: {error['param']})" if error.get("param") else ""
            raise ApiError(f"{error.get('message', 'HTTP ' + str(resp.status_code))}{param} [{error.get('code')}]")
        return data

    def _send(self, method: str, path: str, body: dict[str, Any] | None, params: dict[str, Any]) -> httpx.Response:
        query = {k: v for k, v in params.items() if v is not None}
        try:
            return self._http.request(method, path, json=body, params=query)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the gateway at {self._http.base_url}: {exc}") from None

    def all_pages(self, path: str) -> dict[str, Any]:
        """Every item of a list, following `has_more` with `after`."""
        items: list[Any] = []
        after = None
        while True:
            page = self.call("GET", path, limit=1000, after=after)
            items += page["data"]
            if not page["has_more"] or not page["data"]:
                return {"object": "list", "data": items, "has_more": False}
            after = page["data"][-1]["id"]


def tenants_list(c: Client, a: argparse.Namespace) -> Any:
    return c.all_pages(f"{V1}/tenants")


def tenants_show(c: Client, a: argparse.Namespace) -> Any:
    return c.call("GET", f"{V1}/tenants/{a.id}")


def tenants_create(c: Client, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"id": a.id, "limits": dict(a.limit)}
    if a.name is not None:
        body["name"] = a.name
    if a.disabled:
        body["enabled"] = False
    return c.call("POST", f"{V1}/tenants", body)


def tenants_update(c: Client, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    if a.name is not None:
        body["name"] = a.name
    if a.limit:
        body["limits"] = dict(a.limit)
    if a.enabled is not None:
        body["enabled"] = a.enabled
    return c.call("PATCH", f"{V1}/tenants/{a.id}", body)


def keys_list(c: Client, a: argparse.Namespace) -> Any:
    return c.all_pages(f"{V1}/tenants/{a.tenant}/keys")


def keys_create(c: Client, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"name": a.name}
    if a.expires_in is not None:
        body["expires_in_seconds"] = a.expires_in
    return c.call("POST", f"{V1}/tenants/{a.tenant}/keys", {**body, **_key_access_body(a)})


def keys_update(c: Client, a: argparse.Namespace) -> Any:
    body = {"name": a.name} if a.name is not None else {}
    return c.call("PATCH", f"{V1}/keys/{a.key_id}", {**body, **_key_access_body(a)})


def keys_show(c: Client, a: argparse.Namespace) -> Any:
    return c.call("GET", f"{V1}/keys/{a.key_id}")


def keys_rotate(c: Client, a: argparse.Namespace) -> Any:
    body = {} if a.grace is None else {"grace_seconds": a.grace}
    return c.call("POST", f"{V1}/keys/{a.key_id}/rotate", body)


def keys_revoke(c: Client, a: argparse.Namespace) -> Any:
    return c.call("DELETE", f"{V1}/keys/{a.key_id}")


def audit_list(c: Client, a: argparse.Namespace) -> Any:
    return c.call("GET", f"{V1}/audit", limit=a.limit, tenant=a.tenant, action=a.action)


def webhooks_list(c: Client, a: argparse.Namespace) -> Any:
    return c.call("GET", f"{V1}/webhooks", limit=a.limit, tenant=a.tenant, status=a.status)


def webhooks_redeliver(c: Client, a: argparse.Namespace) -> Any:
    return c.call("POST", f"{V1}/webhooks/{a.event_id}/redeliver")


def relays_list(c: Client, a: argparse.Namespace) -> Any:
    return c.call("GET", f"{V1}/relays")


def usage_report(c: Client, a: argparse.Namespace) -> Any:
    params = {"from": a.from_day, "to": a.to_day, "tenant": a.tenant, "key_id": a.key_id, "group_by": a.group_by}
    if a.csv:
        return c.text(f"{V1}/usage", **params, format="csv")
    return c.call("GET", f"{V1}/usage", **params)


# --- tables ------------------------------------------------------------------------------


def when(t: int | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=False)).rstrip() for line in lines)


def limits_text(limits: dict[str, int | None]) -> str:
    return " ".join(f"{k}={v}" for k, v in limits.items() if v is not None) or "none"


def key_status(k: dict[str, Any]) -> str:
    now = time.time()
    if k.get("revoked_at") is not None:
        return "revoked"
    if k.get("expires_at") is not None and k["expires_at"] <= now:
        return "expired"
    if k.get("previous_secret_expires_at") is not None and k["previous_secret_expires_at"] > now:
        return "rotating"
    return "active"


def cell(name: str, value: Any) -> str:
    """A value for people: times in UTC, `-` for none, yes/no, JSON for the rest."""
    if name.endswith("_at") and isinstance(value, int):
        return when(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value if isinstance(value, str) else json.dumps(value)


def details(obj: dict[str, Any]) -> str:
    """One object as `field: value` lines, nested objects flattened (`limits.max_active_tasks`)."""
    lines: list[str] = []
    for name, value in obj.items():
        if name == "object":
            continue
        if isinstance(value, dict):
            lines += [f"{name}.{k}: {cell(k, v)}" for k, v in value.items()]
        else:
            lines.append(f"{name}: {cell(name, value)}")
    return "\n".join(lines)


def usage_table(rows: list[dict[str, Any]]) -> str:
    """The report's rows; the columns are the row's fields (those grouped by, then the counters)."""
    if not rows:
        return "no usage in this range"
    fields = list(rows[0])
    headers = [USAGE_HEADERS.get(f, f.upper()) for f in fields]
    return table(headers, [["-" if row[f] is None else str(row[f]) for f in fields] for row in rows])


def relays_table(relays: list[dict[str, Any]]) -> str:
    """One row per relay; `until` only means something while open or cooling. `failovers`
    may be missing from an answer (the contract does not require it): shown as `-`."""
    if not relays:
        return "no relays"
    rows = [
        [
            r["id"],
            r["host"],
            str(r["priority"]),
            str(r["weight"]),
            "yes" if r["enabled"] else "no",
            r["state"],
            when(r["until"]),
            f"{r['keys']['refused']}/{r['keys']['total']}",
            cell("failovers", r.get("failovers")),
            cell("last_error", r["last_error"]),
        ]
        for r in relays
    ]
    headers = ["ID", "HOST", "PRIORITY", "WEIGHT", "ENABLED", "STATE", "UNTIL", "KEYS REFUSED", "FAILOVERS"]
    return table([*headers, "LAST ERROR"], rows)


USAGE_HEADERS = {
    "date": "DATE",
    "tenant": "TENANT",
    "key_id": "KEY",
    "relay": "RELAY",
    "tasks_created": "CREATED",
    "tasks_succeeded": "SUCCEEDED",
    "tasks_failed": "FAILED",
    "credits_charged": "CHARGED",
    "credits_refunded": "REFUNDED",
}


def render(a: argparse.Namespace, data: Any) -> str:
    if a.group == "tenants" and a.verb == "list":
        rows = [
            [t["id"], t["name"], t["source"], "yes" if t["enabled"] else "no", limits_text(t["limits"])]
            for t in data["data"]
        ]
        return table(["ID", "NAME", "SOURCE", "ENABLED", "LIMITS"], rows)
    if a.group == "keys" and a.verb == "list":
        rows = [
            [
                k["id"],
                k["name"] or "-",
                k["prefix"] or "-",
                k["source"],
                key_status(k),
                when(k["created_at"]),
                when(k["expires_at"]),
                when(k["last_used_at"]),
            ]
            for k in data["data"]
        ]
        return table(["ID", "NAME", "PREFIX", "SOURCE", "STATUS", "CREATED", "EXPIRES", "LAST USED"], rows)
    if a.group == "audit":
        rows = [
            [
                when(e["time"]),
                f"{e['actor']['type']}:{e['actor']['id']}",
                e["action"],
                e["target"].get("tenant", "-"),
                e["target"].get("key_id", "-"),
                json.dumps(e["changes"]),
            ]
            for e in data["data"]
        ]
        return table(["TIME", "ACTOR", "ACTION", "TENANT", "KEY", "CHANGES"], rows)
    if a.group == "webhooks" and a.verb == "list":
        rows = [
            [
                e["id"],
                e["tenant"],
                e["task_id"] or "-",
                e["status"],
                str(e["attempts"]),
                when(e["next_attempt_at"]),
                e["last_error"] or "-",
                when(e["created_at"]),
            ]
            for e in data["data"]
        ]
        return table(["ID", "TENANT", "TASK", "STATUS", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR", "CREATED"], rows)
    if a.group == "usage":
        return usage_table(data["data"])
    if a.group == "relays":
        return relays_table(data["data"])
    text = details(data)
    for shown_once in ("secret", "webhook_secret"):
        if shown_once in data:
            text += f"\n\n{shown_once} is shown only now: store it safely."
    return text
