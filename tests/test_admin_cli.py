"""`runway-gateway admin ...` as a subprocess against a live gateway: every verb, tables and
--json, the URL and key from flags or the environment, exit codes 0/1/2, --help everywhere."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from conftest import (
    ADMIN_KEY,
    ROOT,
    UPSTREAM_KEY,
    GatewayProcess,
    Simulator,
    TenantSpec,
    free_port,
    gen2_body,
    probe,
    wait_until,
)
from relay_stub import RelayStub, canned_relays, live_answers, relay_stub

from gateway.admin_cli import relays_table, when

VERBS = [
    ["tenants", "list"],
    ["tenants", "show"],
    ["tenants", "create"],
    ["tenants", "update"],
    ["keys", "list"],
    ["keys", "create"],
    ["keys", "update"],
    ["keys", "show"],
    ["keys", "rotate"],
    ["keys", "revoke"],
    ["audit"],
    ["webhooks", "list"],
    ["webhooks", "redeliver"],
    ["relays"],
]


@pytest.fixture(scope="module")
def cli_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("admin-cli")
    sim = Simulator(tmp)
    sim.start()
    # max_attempts lands in GatewayProcess's [webhooks] (written just before extra_toml):
    # an event whose hook is closed dies at its first attempt.
    g = GatewayProcess(
        tmp,
        sim.url,
        # usage-cli: the usage report's own tenant, so other tests' tasks never show in its rows
        [TenantSpec("cfg-cli", limits={"max_active_tasks": 4}), TenantSpec("usage-cli")],
        extra_toml="max_attempts = 1\n",
    )
    g.start()
    yield g
    g.stop()
    sim.stop()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNWAY_GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "admin", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=ROOT,
        timeout=60,
    )


class Cli:
    """The admin command pointed at one gateway (or its URL), by flags."""

    def __init__(self, gw: GatewayProcess | str):
        self.flags = ["--url", gw if isinstance(gw, str) else gw.url, "--admin-key", ADMIN_KEY]

    def ok(self, *args: str) -> str:
        done = run(*self.flags, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok("--json", *args))

    def fails(self, *args: str) -> str:
        done = run(*self.flags, *args)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert done.stdout == ""
        return done.stderr


@pytest.fixture
def cli(cli_gw: GatewayProcess) -> Cli:
    return Cli(cli_gw)


def test_every_verb_has_help() -> None:
    for verb in [[], ["tenants"], ["keys"], ["webhooks"], *VERBS]:
        done = run(*verb, "--help")
        assert done.returncode == 0 and "usage: runway-gateway admin" in done.stdout, (verb, done.stderr)


def test_tenants_create_list_show_update(cli: Cli) -> None:
    tenant = f"cli-{secrets.token_hex(3)}"
    created = cli.ok("tenants", "create", tenant, "--name", "Search", "--limit", "max_active_tasks=3")
    assert f"id: {tenant}" in created and "limits.max_active_tasks: 3" in created
    assert "webhook_secret: whsec_" in created and "shown only now" in created

    table = cli.ok("tenants", "list").splitlines()
    assert table[0].split() == ["ID", "NAME", "SOURCE", "ENABLED", "LIMITS"]
    row = next(line for line in table if line.startswith(tenant + " "))
    assert row.split() == [tenant, "Search", "api", "yes", "max_active_tasks=3"]
    assert any(line.split()[:3] == ["cfg-cli", "cfg-cli", "config"] for line in table)
    listed = cli.json("tenants", "list")
    assert listed["object"] == "list" and tenant in [t["id"] for t in listed["data"]]

    shown = cli.ok("tenants", "show", tenant)
    assert "usage.active: 0" in shown and "source: api" in shown and "webhook_secret" not in shown
    updated = cli.json(
        "tenants", "update", tenant, "--disable", "--limit", "max_active_tasks=none", "--limit", "tasks_per_day=9"
    )
    assert updated["enabled"] is False
    assert (updated["limits"]["max_active_tasks"], updated["limits"]["tasks_per_day"]) == (None, 9)
    assert cli.json("tenants", "update", tenant, "--enable", "--name", "Search 2")["enabled"] is True
    assert cli.json("tenants", "show", tenant)["name"] == "Search 2"


def test_keys_create_list_show_rotate_revoke(cli: Cli) -> None:
    tenant = cli.json("tenants", "create", f"cli-{secrets.token_hex(3)}")["id"]
    minted = cli.ok("keys", "create", tenant, "--name", "billing-svc", "--expires-in", "30d")
    lines = dict(line.split(": ", 1) for line in minted.splitlines() if ": " in line)
    key_id, secret = lines["id"], lines["secret"]
    assert key_id.startswith("key_") and secret.startswith("sk-gw-") and "shown only now" in minted
    key = cli.json("keys", "show", key_id)
    assert key["name"] == "billing-svc" and abs(key["expires_at"] - (time.time() + 30 * 86400)) < 120

    table = cli.ok("keys", "list", tenant).splitlines()
    assert table[0].split()[:5] == ["ID", "NAME", "PREFIX", "SOURCE", "STATUS"]
    assert table[1].split()[:5] == [key_id, "billing-svc", secret[:10], "api", "active"]
    assert secret not in "\n".join(table)
    config_keys = cli.json("keys", "list", "cfg-cli")["data"]
    assert [k["source"] for k in config_keys] == ["config"]

    rotated = cli.json("keys", "rotate", key_id, "--grace", "1h")
    assert rotated["id"] == key_id and rotated["secret"] != secret
    assert abs(rotated["previous_secret_expires_at"] - (time.time() + 3600)) < 120
    assert "rotating" in cli.ok("keys", "list", tenant)
    revoked = cli.ok("keys", "revoke", key_id)
    assert "revoked_at: 20" in revoked
    assert cli.ok("keys", "list", tenant).splitlines()[1].split()[4] == "revoked"


def test_keys_rotate_grace_0_ends_the_old_secret_at_once_and_grace_n_gives_n_seconds(
    cli: Cli, cli_gw: GatewayProcess
) -> None:
    def status(secret: str) -> int:
        return probe(cli_gw.url, "/v1/models", secret).status

    def within_a_second(secret: str, expected: int) -> None:
        since = time.monotonic()
        wait_until(lambda: status(secret) == expected, 3, 0.02, f"{expected} for a secret")
        assert time.monotonic() - since < 1.0

    tenant = cli.json("tenants", "create", f"cli-{secrets.token_hex(3)}")["id"]
    minted = cli.json("keys", "create", tenant, "--name", "svc")
    within_a_second(minted["secret"], 200)

    no_grace = cli.json("keys", "rotate", minted["id"], "--grace", "0")
    assert no_grace["previous_secret_expires_at"] is None
    within_a_second(no_grace["secret"], 200)
    within_a_second(minted["secret"], 401)
    assert status(no_grace["secret"]) == 200

    n = 5
    before = time.time()
    graced = cli.json("keys", "rotate", minted["id"], "--grace", f"{n}s")
    after = time.time()
    ends = graced["previous_secret_expires_at"]  # the rotation's time plus n, within 1 s
    assert before + n - 1 <= ends <= after + n + 1, (before, ends, after)
    within_a_second(graced["secret"], 200)
    assert status(no_grace["secret"]) == 200 and time.time() < ends  # the old secret, within its grace
    wait_until(lambda: time.time() >= ends, n + 1, 0.02, "the grace's end")
    assert status(no_grace["secret"]) == 401  # checked against the clock on every request
    assert status(graced["secret"]) == 200


def test_audit_lists_the_changes(cli: Cli) -> None:
    tenant = cli.json("tenants", "create", f"cli-{secrets.token_hex(3)}")["id"]
    key_id = cli.json("keys", "create", tenant, "--name", "a")["id"]
    cli.ok("keys", "revoke", key_id)
    table = cli.ok("audit", "--tenant", tenant).splitlines()
    assert table[0].split() == ["TIME", "ACTOR", "ACTION", "TENANT", "KEY", "CHANGES"]
    assert [line.split()[3] for line in table[1:]] == ["key.revoke", "key.create", "tenant.create"]
    entries = cli.json("audit", "--tenant", tenant, "--limit", "1")
    assert [e["action"] for e in entries["data"]] == ["key.revoke"] and entries["has_more"] is True
    only = cli.json("audit", "--tenant", tenant, "--action", "key.create")["data"]
    assert [e["target"]["key_id"] for e in only] == [key_id]


def test_webhooks_list_and_redeliver(cli: Cli, cli_gw: GatewayProcess) -> None:
    port = free_port()  # closed: the task's first event dies, the next waits behind it
    with cli_gw.client("cfg-cli") as c:
        body = {**gen2_body("cli hook"), "notify_hook": f"http://127.0.0.1:{port}/h"}
        task_id = c.post("/runway/tasks", json=body).json()["task"]["id"]

    def of_task(*args: str) -> list[dict[str, Any]]:
        return [e for e in cli.json("webhooks", "list", *args)["data"] if e["task_id"] == task_id]

    [dead] = wait_until(lambda: of_task("--status", "dead", "--tenant", "cfg-cli"), 30, message="a dead event")
    assert (dead["status"], dead["attempts"], dead["last_error"]) == ("dead", 1, "ConnectError")
    [waiting] = wait_until(lambda: of_task("--status", "pending"), 30, message="the next event")
    table = cli.ok("webhooks", "list", "--tenant", "cfg-cli").splitlines()
    assert table[0].split() == [
        "ID",
        "TENANT",
        "TASK",
        "STATUS",
        "ATTEMPTS",
        "NEXT",
        "ATTEMPT",
        "LAST",
        "ERROR",
        "CREATED",
    ]
    row = next(line.split() for line in table if line.startswith(dead["id"]))
    assert row[:5] == [dead["id"], "cfg-cli", task_id, "dead", "1"] and row[5] == "-" and row[6] == "ConnectError"
    assert "webhook_event_not_dead" in cli.fails("webhooks", "redeliver", waiting["id"])
    assert "webhook_event_not_found" in cli.fails("webhooks", "redeliver", "evt_nobody")
    redelivered = cli.ok("webhooks", "redeliver", dead["id"])
    assert f"id: {dead['id']}" in redelivered and "status: pending" in redelivered and "attempts: 0" in redelivered
    [entry] = cli.json("audit", "--tenant", "cfg-cli", "--action", "webhook.redeliver")["data"]
    assert entry["changes"] == {"event_id": dead["id"]}


def test_keys_create_and_update_take_limits_scopes_and_networks(cli: Cli) -> None:
    """Contract §15 on the command line: --limit, --scope, --allow-cidr (repeatable)."""
    tenant = cli.json("tenants", "create", f"cli-{secrets.token_hex(3)}")["id"]
    key = cli.json(
        "keys", "create", tenant, "--name", "dash", "--limit", "requests_per_minute=60", "--limit",
        "max_active_tasks=2", "--scope", "read", "--allow-cidr", "10.20.0.0/16", "--allow-cidr", "10.30.0.0/16",
    )  # fmt: skip
    assert (key["limits"]["requests_per_minute"], key["limits"]["max_active_tasks"]) == (60, 2)
    assert key["scopes"] == ["read"] and key["allowed_cidrs"] == ["10.20.0.0/16", "10.30.0.0/16"]
    shown = cli.ok("keys", "show", key["id"])
    assert "limits.max_active_tasks: 2" in shown and 'scopes: ["read"]' in shown and "usage.active: 0" in shown
    updated = cli.json(
        "keys", "update", key["id"], "--name", "dash-2", "--limit", "max_active_tasks=none", "--scope", "read",
        "--scope", "create", "--allow-cidr", "any",
    )  # fmt: skip
    assert updated["name"] == "dash-2" and updated["limits"]["max_active_tasks"] is None
    assert updated["limits"]["requests_per_minute"] == 60
    assert updated["scopes"] == ["create", "read"] and updated["allowed_cidrs"] is None
    assert cli.json("keys", "update", key["id"], "--scope", "all")["scopes"] == ["create", "read", "delete"]
    assert "allowed_cidrs.0" in cli.fails("keys", "update", key["id"], "--allow-cidr", "10.0.0.0/99")
    bad = run(*cli.flags, "keys", "create", tenant, "--name", "x", "--scope", "admin")
    assert bad.returncode == 2 and "scope" in bad.stderr


def test_api_errors_exit_1_with_the_message_on_stderr(cli: Cli) -> None:
    assert "No tenant with id 'nobody'" in cli.fails("tenants", "show", "nobody")
    assert "tenant_exists" in cli.fails("tenants", "create", "cfg-cli")
    assert "tenant_managed_by_config" in cli.fails("tenants", "update", "cfg-cli", "--disable")
    assert "param: id" in cli.fails("tenants", "create", "Not_Valid")
    assert "key_not_found" in cli.fails("keys", "revoke", "key_0000")


def test_url_and_key_from_the_environment_and_bad_credentials(cli_gw: GatewayProcess) -> None:
    env = {"RUNWAY_GATEWAY_URL": cli_gw.url, "RUNWAY_GATEWAY_ADMIN_KEY": ADMIN_KEY}
    done = run("--json", "tenants", "show", "cfg-cli", env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["id"] == "cfg-cli"
    wrong = run("tenants", "list", env={**env, "RUNWAY_GATEWAY_ADMIN_KEY": "sk-gw-wrong"})
    assert wrong.returncode == 1 and "invalid_api_key" in wrong.stderr
    tenant_key = run("--admin-key", cli_gw.tenants["cfg-cli"].key, "--url", cli_gw.url, "tenants", "list")
    assert tenant_key.returncode == 1 and "permission_denied" in tenant_key.stderr
    unreachable = run("--url", "http://127.0.0.1:9", "--admin-key", ADMIN_KEY, "tenants", "list")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_url_key_and_json_are_taken_after_the_group_and_verb_too(cli_gw: GatewayProcess) -> None:
    """As the README's commands are typed: the options at the end, given there they win over
    the environment; between the group and its verb as well."""
    tenant = f"cli-{secrets.token_hex(3)}"
    flags = ["--url", cli_gw.url, "--admin-key", ADMIN_KEY]
    created = run("tenants", "create", tenant, "--json", *flags)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["id"] == tenant
    minted = run("keys", "create", tenant, "--name", "x", "--json", *flags)
    assert minted.returncode == 0, minted.stderr
    assert json.loads(minted.stdout)["secret"].startswith("sk-gw-")
    listed = run("keys", "--json", "list", tenant, *flags)
    assert listed.returncode == 0, listed.stderr
    assert [k["name"] for k in json.loads(listed.stdout)["data"]] == ["x"]

    env = {"RUNWAY_GATEWAY_URL": "http://127.0.0.1:9", "RUNWAY_GATEWAY_ADMIN_KEY": "sk-gw-wrong"}
    overridden = run("tenants", "show", tenant, "--url", cli_gw.url, "--admin-key", ADMIN_KEY, "--json", env=env)
    assert overridden.returncode == 0, overridden.stderr
    assert json.loads(overridden.stdout)["id"] == tenant
    from_env = run("tenants", "show", tenant, "--json", env={**env, "RUNWAY_GATEWAY_URL": cli_gw.url})
    assert from_env.returncode == 1 and "invalid_api_key" in from_env.stderr  # absent at the end: the environment's
    table = run(*flags, "tenants", "show", tenant)
    assert table.returncode == 0 and f"id: {tenant}" in table.stdout  # no --json anywhere: a table


@pytest.mark.parametrize(
    "args",
    [
        ["tenants", "list"],  # no admin key
        ["--admin-key", "k", "tenants"],
        ["--admin-key", "k", "tenants", "explode"],
        ["--admin-key", "k", "keys", "create", "t"],  # --name is required
        ["--admin-key", "k", "keys", "create", "t", "--name", "n", "--expires-in", "soon"],
        ["--admin-key", "k", "keys", "rotate", "key_1", "--grace", "1y"],
        ["--admin-key", "k", "tenants", "create", "t", "--limit", "max_active_tasks"],
        ["--admin-key", "k", "tenants", "update", "t", "--limit", "speed=3"],
        ["--admin-key", "k", "tenants", "update", "t", "--enable", "--disable"],
        ["--admin-key", "k", "audit", "--limit", "5000"],
        ["--admin-key", "k", "webhooks", "list", "--status", "delivered"],
        ["--admin-key", "k", "webhooks", "redeliver"],
        ["--admin-key", "k", "relays", "extra"],
        ["--admin-key", "k", "usage", "--group-by", "day,relays"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr


# --- admin usage -------------------------------------------------------------------------


def test_usage_report_as_a_table_json_and_csv(cli: Cli, cli_gw: GatewayProcess) -> None:
    with httpx.Client(base_url=cli_gw.url, headers=cli_gw.tenants["usage-cli"].headers(), timeout=10) as c:
        for i in range(2):
            assert c.post("/runway/tasks", json=gen2_body(f"cli usage {i}")).status_code == 200
    day = datetime.now(UTC).date().isoformat()
    key_id = cli.json("keys", "list", "usage-cli")["data"][0]["id"]

    def ended() -> Any:  # both tasks finished (the simulator's 1 s): the rows stop moving
        api = httpx.get(
            f"{cli_gw.url}/admin/v1/usage",
            params={"tenant": "usage-cli", "group_by": "day,tenant,key", "from": day, "to": day},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=10,
        ).json()
        return api if sum(r["tasks_succeeded"] + r["tasks_failed"] for r in api["data"]) == 2 else None

    api = wait_until(ended, 15, 0.1, "both tasks ended")
    assert [(r["key_id"], r["tasks_created"], r["credits_charged"]) for r in api["data"]] == [(key_id, 2, 20)]
    args = ["usage", "--tenant", "usage-cli", "--group-by", "key,day,tenant", "--from", day, "--to", day]
    assert cli.json(*args) == api

    table = cli.ok(*args).splitlines()
    assert table[0].split() == ["DATE", "TENANT", "KEY", "CREATED", "SUCCEEDED", "FAILED", "CHARGED", "REFUNDED"]
    assert table[1].split()[:4] == [day, "usage-cli", key_id, "2"] and len(table) == 2
    assert cli.ok("usage", "--tenant", "usage-cli").splitlines()[0].split()[:3] == ["DATE", "TENANT", "CREATED"]
    assert cli.ok("usage", "--tenant", "nobody").strip() == "no usage in this range"

    csv_text = cli.ok(*args, "--csv")
    assert csv_text.splitlines() == [
        "date,tenant,key_id,tasks_created,tasks_succeeded,tasks_failed,credits_charged,credits_refunded",
        ",".join(str(v) for v in api["data"][0].values()),
    ]
    assert cli.ok("--json", *args, "--csv") == csv_text  # the CSV asked for, not JSON
    assert cli.ok("usage", "--tenant", "usage-cli", "--key-id", "key_nobody", "--csv").splitlines() == [
        "date,tenant,tasks_created,tasks_succeeded,tasks_failed,credits_charged,credits_refunded"
    ]


def test_usage_errors(cli: Cli) -> None:
    assert run("usage", "--help").returncode == 0
    assert "param: from" in cli.fails("usage", "--from", "2026-03-02", "--to", "2026-03-01")
    assert "param: from" in cli.fails("usage", "--from", "2020-01-01", "--to", "2026-01-01", "--csv")
    for bad in (["--from", "2026-02-30"], ["--to", "tomorrow"], ["--group-by", "week"], ["--group-by", ""]):
        done = run(*cli.flags, "usage", *bad)
        assert done.returncode == 2 and "usage: runway-gateway admin usage" in done.stderr, (bad, done.stderr)


# --- admin relays and usage by relay (contract §14) --------------------------------------
#
# LEAD: GET /admin/v1/relays and the ledger's group_by=relay are built on the relays-core
# branch. The two tests named `..._live_or_stub` ask the live gateway first and run against
# it once it serves them (after the merge: nothing to switch); until then they run against
# tests/relay_stub.py, a real HTTP server answering §14's shape. An answer other than 200
# or "route absent" (404, or 400 on group_by) fails them, so a broken route never falls
# back to the stub silently. The other tests here use the stub's canned states on purpose.

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def stub() -> Iterator[RelayStub]:
    with relay_stub(ADMIN_KEY) as s:
        yield s


def columns(table: list[str]) -> list[dict[str, str]]:
    """A table's rows as {header: cell}, cut at the header's column starts (cells and
    headers may hold spaces)."""
    header = table[0]
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", header)]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return [
        {n: line[a:b].strip() for n, a, b in zip(names, starts, [*starts[1:], None], strict=True)} for line in table[1:]
    ]


def test_admin_relays_live_or_stub(cli_gw: GatewayProcess, stub: RelayStub) -> None:
    live = live_answers(cli_gw.url, ADMIN_KEY, "/relays")
    url = cli_gw.url if live else stub.url
    api = httpx.get(url + "/admin/v1/relays", headers=ADMIN, timeout=10).json()
    assert api["object"] == "list" and api["data"]
    if live:  # one [upstream] table: one relay, `default`, healthy
        assert [(r["id"], r["state"], r["enabled"]) for r in api["data"]] == [("default", "closed", True)]
    cli = Cli(url)
    assert cli.json("relays") == api
    text = cli.ok("relays")
    assert UPSTREAM_KEY not in text
    table = text.splitlines()
    assert table[0].split() == [
        "ID",
        "HOST",
        "PRIORITY",
        "WEIGHT",
        "ENABLED",
        "STATE",
        "UNTIL",
        "KEYS",
        "REFUSED",
        "FAILOVERS",
        "LAST",
        "ERROR",
    ]
    rows = columns(table)
    assert [row["ID"] for row in rows] == [r["id"] for r in api["data"]]
    for row, r in zip(rows, api["data"], strict=True):
        assert (row["HOST"], row["PRIORITY"], row["WEIGHT"], row["STATE"]) == (
            r["host"],
            str(r["priority"]),
            str(r["weight"]),
            r["state"],
        )
        assert row["ENABLED"] == ("yes" if r["enabled"] else "no")
        assert row["KEYS REFUSED"] == f"{r['keys']['refused']}/{r['keys']['total']}"


def test_admin_relays_shows_each_state(stub: RelayStub) -> None:
    cli = Cli(stub.url)
    rows = {row["ID"]: row for row in columns(cli.ok("relays").splitlines())}
    expected = {r["id"]: r for r in canned_relays(stub.now)["data"]}
    assert list(rows) == ["chatgptsb", "backup", "cheap", "probe", "old"]
    assert rows["chatgptsb"] == {
        "ID": "chatgptsb",
        "HOST": "api.chatgptsb.com",
        "PRIORITY": "0",
        "WEIGHT": "3",
        "ENABLED": "yes",
        "STATE": "closed",
        "UNTIL": "-",
        "KEYS REFUSED": "0/2",
        "FAILOVERS": "0",
        "LAST ERROR": "-",
    }
    assert (rows["backup"]["STATE"], rows["backup"]["UNTIL"]) == ("open", when(expected["backup"]["until"]))
    assert (rows["backup"]["FAILOVERS"], rows["backup"]["LAST ERROR"]) == ("7", "http 503")
    assert (rows["cheap"]["STATE"], rows["cheap"]["KEYS REFUSED"], rows["cheap"]["LAST ERROR"]) == (
        "cooling",
        "1/2",
        "http 429",
    )
    assert rows["cheap"]["UNTIL"] == when(expected["cheap"]["until"])
    assert (rows["probe"]["STATE"], rows["probe"]["UNTIL"]) == ("half_open", "-")
    assert (rows["old"]["ENABLED"], rows["old"]["PRIORITY"]) == ("no", "2")
    assert stub.requests[-1] == ("/admin/v1/relays", {})

    # an answer without the optional `failovers`; and no relay at all
    bare = {k: v for k, v in expected["old"].items() if k != "failovers"}
    assert columns(relays_table([bare]).splitlines())[0]["FAILOVERS"] == "-"
    assert relays_table([]) == "no relays"


def test_admin_relays_errors_exit_1(stub: RelayStub) -> None:
    wrong = run("--url", stub.url, "--admin-key", "sk-gw-wrong", "relays")
    assert wrong.returncode == 1 and wrong.stdout == "" and "invalid_api_key" in wrong.stderr
    unreachable = run("--url", "http://127.0.0.1:9", "--admin-key", ADMIN_KEY, "relays")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_usage_by_relay_live_or_stub(cli: Cli, cli_gw: GatewayProcess, stub: RelayStub) -> None:
    day = datetime.now(UTC).date().isoformat()
    live = live_answers(cli_gw.url, ADMIN_KEY, "/usage", group_by="relay")
    if live:  # two tasks of a tenant of this test's own, through the one relay
        tenant = cli.json("tenants", "create", f"cli-relay-{secrets.token_hex(3)}")["id"]
        secret = cli.json("keys", "create", tenant, "--name", "r")["secret"]
        with httpx.Client(base_url=cli_gw.url, headers={"Authorization": f"Bearer {secret}"}, timeout=10) as c:
            for _ in range(2):  # the new key reaches the gateway's directory within a second
                assert wait_until(lambda: c.post("/runway/tasks", json=gen2_body("relay")).status_code == 200)
        url = cli_gw.url
    else:
        tenant, url = "search-team", stub.url
    query = {"tenant": tenant, "group_by": "day,relay", "from": day, "to": day}
    api = httpx.get(url + "/admin/v1/usage", params=query, headers=ADMIN, timeout=10).json()
    rows = api["data"]
    assert rows and all(set(r) >= {"date", "relay", "tasks_created"} and "tenant" not in r for r in rows)
    relays = [r["relay"] for r in rows]
    if live:
        ids = {r["id"] for r in httpx.get(url + "/admin/v1/relays", headers=ADMIN, timeout=10).json()["data"]}
        assert set(relays) <= ids and sum(r["tasks_created"] for r in rows) == 2
    else:
        assert [(r["relay"], r["tasks_created"], r["credits_charged"]) for r in rows] == [
            ("backup", 5, 50),
            ("chatgptsb", 12, 120),
        ]

    by_relay = Cli(url)
    args = ["usage", "--tenant", tenant, "--group-by", "relay,day", "--from", day, "--to", day]
    assert by_relay.json(*args) == api
    table = by_relay.ok(*args).splitlines()
    headers = {"date": "DATE", "relay": "RELAY", "tasks_created": "CREATED", "credits_charged": "CHARGED"}
    assert [headers[f] for f in rows[0] if f in headers] == [h for h in table[0].split() if h in headers.values()]
    cells = columns(table)
    assert [(c["RELAY"], c["CREATED"]) for c in cells] == [(r["relay"], str(r["tasks_created"])) for r in rows]
    csv_text = by_relay.ok(*args, "--csv").splitlines()
    assert csv_text[0] == ",".join(rows[0]) and "relay" in csv_text[0].split(",")
    assert len(csv_text) == 1 + len(rows)
    if not live:  # what the command sent: the parts in the ledger's order
        assert stub.requests[-1] == ("/admin/v1/usage", {**query, "format": "csv"})
