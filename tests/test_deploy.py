"""deploy/: the dashboard, the alert rules, Prometheus, compose and Kubernetes files.

Three layers:
1. Static: every PromQL expression in the Grafana dashboard and the alert rules names only
   series the gateway exports (contract §7 and §14, plus gateway_quota_usage_ratio,
   gateway_ready and Prometheus's own `up`), with labels those series carry; global store
   gauges and per-process relay states are never summed across replicas; the configs
   shipped in deploy/ load.
2. promtool: `check rules`, `check config`, the dashboard's expressions parsed as
   recording rules, and unit tests of the alert expressions on synthetic series.
3. Live: a real Prometheus scrapes a running gateway (with the bundled upstream simulator)
   and the dashboard's main queries return data.

promtool and prometheus come from Debian's `prometheus` package. Locally the tests that
need them skip when they are missing; with CI set they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import wait_until

from gateway.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "runway-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
K8S = DEPLOY / "k8s"

# --- what the gateway exports (contract §7, §14 and the agreed extras) -----------------

COUNTERS = {
    "gateway_requests_total": {"tenant", "route", "method", "status"},
    "gateway_upstream_requests_total": {"operation", "status", "relay"},  # relay: §14
    "gateway_auth_failures_total": {"reason"},
    "gateway_quota_rejections_total": {"tenant", "limit"},
    "gateway_tasks_created_total": {"tenant", "task_type"},
    "gateway_tasks_finished_total": {"tenant", "status"},
    "gateway_credits_charged_total": {"tenant"},
    "gateway_credits_refunded_total": {"tenant"},
    "gateway_callbacks_received_total": {"result"},
    "gateway_webhook_deliveries_total": {"tenant", "result"},
    # Not in the contract's table; exported for the refused-relay-key alert.
    "gateway_upstream_auth_failures_total": {"key_index"},
    # §14: the relay a create left for the next one, and why
    "gateway_relay_failovers_total": {"relay", "reason"},
}
HISTOGRAMS = {
    "gateway_request_duration_seconds": {"route", "method"},
    "gateway_upstream_request_duration_seconds": {"operation", "relay"},  # relay: §14
    "gateway_task_duration_seconds": {"task_type", "status"},
    "gateway_callback_lag_seconds": set(),
}
GAUGES = {
    "gateway_tasks_active": {"tenant"},
    "gateway_webhook_pending": set(),
    "gateway_build_info": {"version"},
    # Not in the contract's table; exported for the budget alerts and the readiness alert.
    "gateway_quota_usage_ratio": {"tenant", "limit"},
    "gateway_ready": set(),
    # §14: 1 closed, 0.5 half-open, 0 open or cooling, as each process sees the relay
    "gateway_relay_up": {"relay"},
}
TARGET_LABELS = {"job", "instance"}

SERIES: dict[str, set[str]] = {"up": set()}
SERIES.update(COUNTERS)
SERIES.update(GAUGES)
for _name, _labels in HISTOGRAMS.items():
    SERIES[f"{_name}_bucket"] = _labels | {"le"}
    SERIES[f"{_name}_sum"] = set(_labels)
    SERIES[f"{_name}_count"] = set(_labels)
SERIES = {name: labels | TARGET_LABELS for name, labels in SERIES.items()}

# Global store values: the same on every replica and worker, so max, never sum.
GLOBAL_GAUGES = ("gateway_tasks_active", "gateway_webhook_pending", "gateway_quota_usage_ratio", "gateway_ready")
# A state each process holds on its own: a sum or average over replicas means nothing.
STATE_GAUGES = ("gateway_relay_up",)

# Grafana's variables, replaced before PromQL sees an expression.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$tenant": ".*"}

IN_CI = bool(os.environ.get("CI"))


# --- reading the files ----------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels of collapsed rows
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of the dashboard."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", []) if t.get("expr")]


def panel_exprs(title: str) -> list[str]:
    matches = [p for p in dashboard_panels() if p.get("title") == title]
    assert len(matches) == 1, f"dashboard has {len(matches)} panels titled {title!r}"
    return [t["expr"] for t in matches[0]["targets"]]


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def yaml_block_values(text: str, key: str) -> list[str]:
    """The values of every `key:` in a YAML file: block scalars (| and >), quoted or plain.

    The rules file is YAML, and the project has no YAML parser among its dependencies;
    this reads exactly the forms the deploy files use and fails on anything else, and
    the count is cross-checked against promtool's.
    """
    lines = text.splitlines()
    values: list[str] = []
    pattern = re.compile(rf"^(\s*(?:-\s+)?){re.escape(key)}:(?:\s+(.*))?$")
    i = 0
    while i < len(lines):
        m = pattern.match(lines[i])
        if not m:
            i += 1
            continue
        indent, rest = len(m.group(1)), (m.group(2) or "").strip()  # the key's column
        i += 1
        if rest in ("|", "|-", "|+", ">", ">-", ">+"):
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                block.append(lines[i])
                i += 1
            body = textwrap.dedent("\n".join(block)).strip("\n")
            values.append(" ".join(body.split("\n")) if rest.startswith(">") else body + "\n")
        elif rest.startswith('"'):
            values.append(json.loads(rest))
        elif rest.startswith("'"):
            assert rest.endswith("'"), f"multi-line quoted {key} not supported: {rest!r}"
            values.append(rest[1:-1].replace("''", "'"))
        else:
            assert rest and not rest.startswith(("&", "*", "!", "[", "{")), f"unsupported YAML form for {key}: {rest!r}"
            values.append(rest.split(" #")[0].strip())
    return values


def alert_rules() -> list[tuple[str, str]]:
    """(alert name, expr) for every rule of alerts.yml."""
    text = ALERTS.read_text(encoding="utf-8")
    names = yaml_block_values(text, "alert")
    exprs = yaml_block_values(text, "expr")
    assert "record:" not in text, "alerts.yml holds alerts only; update this test for recording rules"
    assert len(names) == len(exprs) and names, f"{len(names)} alerts but {len(exprs)} exprs in {ALERTS}"
    return list(zip(names, exprs, strict=True))


# --- a small PromQL reader ------------------------------------------------------------

STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
IDENT_RE = re.compile(r"(?<![\w:$])[a-zA-Z_:][a-zA-Z0-9_:]*")
SELECTOR_RE = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def metric_names(expr: str) -> set[str]:
    """Identifiers that name the gateway's series (or `up`) in one expression."""
    bare = STRING_RE.sub('""', expr)
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range and subquery durations
    names = set()
    for ident in IDENT_RE.findall(bare):
        if ident.startswith("gateway_") or ident == "up":
            names.add(ident)
    return names


def selector_labels(expr: str) -> list[tuple[str, str]]:
    """(metric, label) for each label matcher inside metric{...}."""
    out = []
    for metric, body in SELECTOR_RE.findall(expr):
        consumed = 0
        for m in MATCHER_RE.finditer(body):
            assert m.start() == consumed, f"cannot read label matchers {body!r} in {expr!r}"
            out.append((metric, m.group(1)))
            consumed = m.end()
        assert body[consumed:].strip() == "", f"cannot read label matchers {body!r} in {expr!r}"
    return out


def grouping_labels(expr: str) -> set[str]:
    bare = STRING_RE.sub('""', expr)
    return {label.strip() for _, group in GROUPING_RE.findall(bare) for label in group.split(",") if label.strip()}


def check_expr(where: str, expr: str) -> list[str]:
    problems = []
    names = metric_names(expr)
    unknown = sorted(n for n in names if n not in SERIES)
    if unknown:
        problems.append(f"{where}: unknown series {unknown} in {expr!r}")
    if not names - set(unknown):
        problems.append(f"{where}: references no series the gateway exports: {expr!r}")
    for metric, label in selector_labels(expr):
        if metric in SERIES and label not in SERIES[metric]:
            problems.append(f"{where}: {metric} has no label {label!r} (has {sorted(SERIES[metric])})")
    available = set().union(*(SERIES[n] for n in names if n in SERIES)) if names else set()
    for label in sorted(grouping_labels(expr) - available):
        problems.append(f"{where}: groups by {label!r}, which none of {sorted(names)} carries")
    for gauge in GLOBAL_GAUGES:
        if re.search(rf"\b(?:sum|avg)\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(\s*{gauge}\b", expr):
            problems.append(f"{where}: {gauge} is a global store value; take max, not sum/avg: {expr!r}")
    for gauge in STATE_GAUGES:
        if gauge in names and not re.search(rf"\b(?:max|min)\s*(?:by\s*\([^)]*\)\s*)?\(\s*{gauge}\b", expr):
            problems.append(f"{where}: {gauge} is each process's own state; take max (or min) over replicas: {expr!r}")
    return problems


def test_promql_reader_understands_its_inputs() -> None:
    expr = 'sum by (tenant) (rate(gateway_requests_total{tenant=~"$tenant", status=~"5.."}[5m])) / on() group_left up{job="x"}'
    assert metric_names(expr) == {"gateway_requests_total", "up"}
    assert selector_labels(expr) == [
        ("gateway_requests_total", "tenant"),
        ("gateway_requests_total", "status"),
        ("up", "job"),
    ]
    assert grouping_labels(expr) == {"tenant"}
    assert check_expr("x", "sum(rate(gateway_nope_total[5m]))")
    assert check_expr("x", "sum(gateway_tasks_active)")
    assert check_expr("x", 'sum by (route) (rate(gateway_quota_rejections_total{limit="x"}[1m]))')
    assert check_expr("x", 'rate(gateway_request_duration_seconds_count{tenant="a"}[1m])')
    assert check_expr("x", "vector(1)")
    assert check_expr("x", "sum by (relay) (gateway_relay_up)")
    assert check_expr("x", "gateway_relay_up < 1")
    assert check_expr("x", 'max by (relay) (gateway_relay_up{reason="x"})')
    assert not check_expr("x", "max by (relay) (gateway_relay_up) < 1")
    assert not check_expr("x", "max by (tenant) (gateway_tasks_active)")
    assert yaml_block_values("a:\n  - expr: |\n      up\n      == 0\n    for: 1m\n  - expr: 'x'\n", "expr") == [
        "up\n== 0\n",
        "x",
    ]


# --- 1. static checks -----------------------------------------------------------------


def test_dashboard_queries_name_only_exported_series() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    problems = [p for title, expr in exprs for p in check_expr(f"panel {title!r}", expr)]
    assert not problems, "\n".join(problems)


def test_alert_rules_name_only_exported_series() -> None:
    rules = alert_rules()
    problems = [p for name, expr in rules for p in check_expr(f"alert {name}", expr)]
    assert not problems, "\n".join(problems)


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    d = dashboard()
    assert d["uid"] == "runway-gateway" and d["title"]
    assert 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    tenant = variables["tenant"]
    query = tenant["query"] if isinstance(tenant["query"], str) else tenant["query"]["query"]
    assert query == "label_values(gateway_requests_total, tenant)"
    assert tenant["includeAll"] and tenant["multi"] and tenant["allValue"] == ".*"
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"

    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert len(rows) >= 6
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"panel {p['title']!r} has no unit"
        assert p.get("description"), f"panel {p['title']!r} has no description"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            if "histogram_quantile" in t["expr"]:
                assert re.search(r"histogram_quantile\(0\.\d+, sum by \(le\b", t["expr"]), t["expr"]
                assert "_bucket" in t["expr"] and "$__rate_interval" in t["expr"], t["expr"]

    every = " ".join(e for _, e in dashboard_exprs())
    # issue 6: everything the ops team must see is on the dashboard
    for series in [
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_upstream_requests_total",
        "gateway_upstream_request_duration_seconds_bucket",
        "gateway_quota_rejections_total",
        "gateway_tasks_active",
        "gateway_tasks_finished_total",
        "gateway_task_duration_seconds_bucket",
        "gateway_credits_charged_total",
        "gateway_credits_refunded_total",
        "gateway_webhook_pending",
        "gateway_webhook_deliveries_total",
        "gateway_callback_lag_seconds_bucket",
        "gateway_tasks_created_total",
        "gateway_quota_usage_ratio",
    ]:
        assert series in every, f"dashboard shows nothing of {series}"
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(gateway_request_duration_seconds_bucket" in every


def test_alert_rules_cover_the_issue_and_are_actionable() -> None:
    text = ALERTS.read_text(encoding="utf-8")
    rules = dict(alert_rules())
    fors = yaml_block_values(text, "for")
    severities = yaml_block_values(text, "severity")
    summaries = yaml_block_values(text, "summary")
    descriptions = yaml_block_values(text, "description")
    runbooks = yaml_block_values(text, "runbook")
    n = len(rules)
    assert len(severities) == len(summaries) == len(descriptions) == len(runbooks) == n
    assert set(severities) <= {"critical", "warning", "info"} and "critical" in severities
    assert len(fors) >= n - 1, "every alert but the one-shot event alert waits with for:"
    exprs = " ".join(rules.values())
    assert 'gateway_upstream_requests_total{status!~"2.."}' in exprs  # upstream error ratio
    assert "histogram_quantile(0.95" in exprs and "gateway_request_duration_seconds_bucket" in exprs  # latency
    assert "deriv(max(gateway_webhook_pending)" in exprs  # backlog growing
    assert "gateway_quota_usage_ratio" in exprs  # tenant near budget
    assert "gateway_ready" in exprs and 'up{job="runway-gateway"} == 0' in exprs  # not ready / down
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8").lower()
    for name in rules:
        assert name.lower() in docs, f"docs/operations.md does not explain {name}"
    for anchor in runbooks:
        assert anchor.startswith("docs/operations.md#") and anchor.split("#")[1] in docs


def test_dashboard_has_a_relays_row() -> None:
    """Contract §14: relay up per relay, failovers by relay and reason, upstream calls and
    latency by relay; each of these queries keeps the relay apart."""
    panels = dashboard_panels()
    [row] = [p for p in panels if p["type"] == "row" and p["title"] == "Relays"]
    below = sorted(
        (p for p in panels if p["type"] != "row" and p["gridPos"]["y"] > row["gridPos"]["y"]),
        key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]),
    )
    next_rows = [p["gridPos"]["y"] for p in panels if p["type"] == "row" and p["gridPos"]["y"] > row["gridPos"]["y"]]
    in_row = [p for p in below if not next_rows or p["gridPos"]["y"] < min(next_rows)]
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in in_row}
    assert exprs == {
        "Relay state by relay": ["max by (relay) (gateway_relay_up)"],
        "Failovers per minute by relay and reason": [
            "60 * sum by (relay, reason) (rate(gateway_relay_failovers_total[$__rate_interval]))"
        ],
        "Upstream calls/s by relay and status": [
            "sum by (relay, status) (rate(gateway_upstream_requests_total[$__rate_interval]))"
        ],
        "Upstream error ratio by relay": [
            'sum by (relay) (rate(gateway_upstream_requests_total{status!~"2.."}[$__rate_interval]))'
            " / sum by (relay) (rate(gateway_upstream_requests_total[$__rate_interval]))"
        ],
        "Upstream create latency by relay": [
            f"histogram_quantile({q}, sum by (le, relay) (rate(gateway_upstream_request_duration_seconds_bucket"
            '{operation="create"}[$__rate_interval])))'
            for q in ("0.5", "0.95")
        ],
    }
    [state] = [p for p in in_row if p["title"] == "Relay state by relay"]
    shown = {k: v["text"] for m in state["fieldConfig"]["defaults"]["mappings"] for k, v in m["options"].items()}
    assert shown == {"1": "closed", "0.5": "half-open", "0": "open / cooling"}
    assert {"type": "panel", "id": "state-timeline", "name": "State timeline", "version": ""} in dashboard()[
        "__requires"
    ]
    # no panel overlaps another: the row was added below the others, not on top of them
    cells = [
        (x, y)
        for p in panels
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells))


def test_shipped_gateway_configs_load(tmp_path: Path) -> None:
    """deploy/gateway.toml with .env.example, and the k8s ConfigMap with the example Secret."""
    env = {}
    for line in (DEPLOY / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    cfg = load_config(DEPLOY / "gateway.toml", env)
    assert cfg.store.url == "redis://redis:6379/0"
    assert cfg.upstream.base_url == "http://upstream:8090"
    assert [t.id for t in cfg.tenants] == ["demo"]
    # the demo key written in .env.example matches its hash
    demo_key = re.search(r"Demo tenant key:\s+(\S+)", (DEPLOY / ".env.example").read_text()).group(1)
    assert cfg.tenants[0].keys == ("sha256:" + hashlib.sha256(demo_key.encode()).hexdigest(),)

    secret = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    env = {}
    for m in re.finditer(r'^  ([A-Z_]+): "(.*)"$', secret, re.M):
        env[m.group(1)] = m.group(2)
    assert {"UPSTREAM_API_KEY", "GATEWAY_STORE_URL", "GATEWAY_SIGNING_SECRET"} <= env.keys()
    cfg = load_config(K8S / "gateway.toml", env)
    assert cfg.store.url.startswith("redis://")


def test_compose_runs_two_replicas_on_redis_with_aof() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text(encoding="utf-8")
    services = re.findall(r"^  ([a-z0-9-]+):\s*$", text.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0], re.M)
    assert {"gateway-1", "gateway-2", "upstream", "redis", "prometheus", "grafana"} <= set(services)
    assert '"--appendonly", "yes"' in text
    assert "simulate-upstream" in text and "./gateway.toml:/etc/runway-gateway/gateway.toml:ro" in text
    prom = PROM_CONFIG.read_text(encoding="utf-8")
    assert "job_name: runway-gateway" in prom and '"gateway-1:8080", "gateway-2:8080"' in prom
    assert "alerts.yml" in prom
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert "url: http://prometheus:9090" in (provisioning / "datasources" / "prometheus.yml").read_text()
    assert "path: /etc/grafana/dashboards" in (provisioning / "dashboards" / "dashboards.yml").read_text()
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in text


def test_kubernetes_manifests() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", "secret.example.yaml"))
    listed = kustomization()["resources"]
    assert sorted(listed) == files, "kustomization.yaml must list every manifest but the example Secret"
    kinds = {re.search(r"^kind: (\w+)$", (K8S / f).read_text(), re.M).group(1) for f in files}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    } <= kinds

    deployment = (K8S / "deployment.yaml").read_text(encoding="utf-8")
    for needle in [
        "path: /readyz",
        "path: /healthz",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        'drop: ["ALL"]',
        "allowPrivilegeEscalation: false",
        "mountPath: /tmp",
        "emptyDir:",
        "requests:",
        "limits:",
        "runAsUser: 10001",
        "type: RuntimeDefault",
    ]:
        assert needle in deployment, f"deployment.yaml lacks {needle!r}"

    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("\nkind: ") + out.stdout.startswith("kind: ") >= len(files) - 1


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))


def manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text(encoding="utf-8"))


def kustomize(directory: Path) -> list[dict[str, Any]] | None:
    """`kubectl kustomize` of a directory, or None without kubectl."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomization_never_applies_the_example_secret() -> None:
    """A re-apply must not overwrite the real Secret with the example's placeholders."""
    k = kustomization()
    assert "secret.example.yaml" not in k["resources"]
    assert not k.get("secretGenerator")
    rendered = kustomize(K8S)
    if rendered is not None:
        assert "Secret" not in {d["kind"] for d in rendered}
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "create secret generic runway-gateway-secrets" in docs
    assert "remove secret.example.yaml from kustomization.yaml" not in docs


def _config_map_name(rendered: list[dict[str, Any]]) -> str:
    (cm,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    (dep,) = [d for d in rendered if d["kind"] == "Deployment"]
    (volume,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    return cm["metadata"]["name"]


def test_a_config_change_rolls_the_pods(tmp_path: Path) -> None:
    """gateway.toml becomes a ConfigMap named after its content: a change is a new name in
    the Deployment's pod template, which rolls the pods."""
    (gen,) = kustomization()["configMapGenerator"]
    assert gen["name"] == "runway-gateway-config" and gen["files"] == ["gateway.toml"]
    assert not gen.get("options", {}).get("disableNameSuffixHash")
    volumes = manifest("deployment.yaml")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": "runway-gateway-config"}} in volumes
    before = kustomize(K8S)
    if before is None:
        pytest.skip("kubectl not installed: the rendered names are not checked")
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    with (copy / "gateway.toml").open("a", encoding="utf-8") as f:
        f.write("\n# an edit\n")
    first, second = _config_map_name(before), _config_map_name(kustomize(copy))
    assert first.startswith("runway-gateway-config-") and second.startswith("runway-gateway-config-")
    assert first != second


def test_pods_drain_before_they_stop() -> None:
    """preStop waits while the endpoint removal spreads; the grace period then covers the
    longest request in flight (an upstream call of upstream.timeout_seconds)."""
    spec = manifest("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(command[1])
    assert 3 <= drain <= 15
    upstream_timeout = load_config(
        K8S / "gateway.toml",
        {
            "UPSTREAM_API_KEY": "k",
            "GATEWAY_STORE_URL": "redis://r:6379/0",
            "GATEWAY_SIGNING_SECRET": "s" * 32,
            "ADMIN_KEY_HASH": "sha256:" + "0" * 64,
            "SEARCH_TEAM_HOOK_SECRET": "x",
        },
    ).upstream.timeout_seconds
    assert spec["terminationGracePeriodSeconds"] >= drain + upstream_timeout + 5


def test_network_policy_admits_only_the_gateway_port_and_walls_off_metadata() -> None:
    policy = manifest("networkpolicy.yaml")
    pod_labels = manifest("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = spec["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    blocks = [peer["ipBlock"] for rule in spec["egress"] for peer in rule["to"] if "ipBlock" in peer]
    v4 = [b for b in blocks if b["cidr"] == "0.0.0.0/0"]
    assert v4 and all("169.254.169.254/32" in b.get("except", []) for b in v4)


def test_kubernetes_manifests_match_the_api_schema() -> None:
    """kubernetes-validate (strict: no unknown field) on what `kubectl apply -k` would send,
    or on each manifest without kubectl. The ServiceMonitor is a CRD: no schema here."""
    import kubernetes_validate

    docs = kustomize(K8S) or [manifest(f) for f in kustomization()["resources"]]
    docs.append(manifest("secret.example.yaml"))
    checked = set()
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue
        for version in ("1.29.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
        checked.add(doc["kind"])
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Secret",
    } <= checked


# --- compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))


def test_compose_passes_the_public_url_to_the_gateways() -> None:
    services = compose()["services"]
    for name in ("gateway-1", "gateway-2"):
        assert services[name]["environment"]["GATEWAY_PUBLIC_URL"].startswith("${GATEWAY_PUBLIC_URL")
    assert "${GATEWAY_PUBLIC_URL" in (DEPLOY / "gateway.toml").read_text(encoding="utf-8")
    assert "GATEWAY_PUBLIC_URL=" in (DEPLOY / ".env.example").read_text(encoding="utf-8")


def test_compose_publishes_nothing_beyond_this_host_by_default() -> None:
    """Prometheus without its lifecycle API, every port on 127.0.0.1 (the gateways' port,
    which also serves /metrics, unless the operator sets GATEWAY_BIND_ADDRESS)."""
    text = (DEPLOY / "docker-compose.yml").read_text(encoding="utf-8")
    services = compose()["services"]
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
    for name, service in services.items():
        for port in service.get("ports", []):
            host = port.rsplit(":", 2)[0]
            assert host in ("127.0.0.1", "${GATEWAY_BIND_ADDRESS:-127.0.0.1}"), f"{name} publishes {port}"
    env_example = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    assert "does not publish it" not in env_example and "GATEWAY_BIND_ADDRESS" in env_example
    assert "Compose v2" in text.split("\nname:", 1)[0]


# --- the image --------------------------------------------------------------------------


def test_image_base_is_pinned_and_dependencies_come_from_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert froms and set(froms) == {"${PYTHON_IMAGE}"}
    installs = [line for line in dockerfile.splitlines() if re.search(r"\bpip install\b", line)]
    assert any("--require-hashes" in line and "-r requirements.lock" in line for line in installs)
    assert all("--no-deps" in line for line in installs), "every install takes exactly what the lock says"
    assert re.search(r'^CMD \["serve", "--config"', dockerfile, re.M), (
        "the image's command is `serve` (its limits apply)"
    )


def _lock_pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    pins = {}
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+) \\\n", block)
        if m:
            assert "--hash=sha256:" in block, f"{m.group(1)} has no hash in requirements.lock"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_lock_file_pins_every_dependency_of_pyproject() -> None:
    """requirements.lock is pip-compile's output for pyproject.toml: a dependency added to
    pyproject without regenerating the lock fails here."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pins = _lock_pins()
    wanted = [Requirement(r) for r in project["project"]["dependencies"] + project["build-system"]["requires"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: regenerate it (command at its top)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject wants {req}"
        )
    assert {"httptools", "uvloop", "cryptography"} <= pins.keys()  # the extras [standard] and [crypto]


def test_dockerignore_sends_only_what_the_image_copies() -> None:
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*", "an allowlist: nothing enters the build context unless named"
    included = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    copied = {
        src.rstrip("/") for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M) for src in line.split()[:-1]
    }
    assert copied == included
    assert "**/__pycache__" in rules


# --- 2. promtool ----------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} not found; CI must install Debian's prometheus package (apt-get install -y prometheus)")
    pytest.skip(f"{name} not installed (Debian: apt-get install prometheus)")


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool")


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def test_promtool_check_rules(promtool: str) -> None:
    out = _run([promtool, "check", "rules", str(ALERTS)])
    assert out.returncode == 0, out.stdout + out.stderr
    found = int(re.search(r"SUCCESS: (\d+) rules found", out.stdout).group(1))
    assert found == len(alert_rules()), "the YAML reader of this test missed rules"


def test_promtool_check_config(promtool: str) -> None:
    out = _run([promtool, "check", "config", str(PROM_CONFIG)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")  # JSON is YAML
    out = _run([promtool, "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_expressions_on_synthetic_series(promtool: str, tmp_path: Path) -> None:
    """`promtool test rules`: the alert expressions fire on bad series and stay quiet on good ones."""
    rules = dict(alert_rules())
    cases = [
        # (alert, input series, eval time, expected samples)
        (
            "RunwayGatewayReplicaDown",
            [
                ('up{job="runway-gateway", instance="gw-1:8080"}', "1x10"),
                ('up{job="runway-gateway", instance="gw-2:8080"}', "1 1 0x8"),
            ],
            "5m",
            [('up{job="runway-gateway", instance="gw-2:8080"}', 0)],
        ),
        (
            "RunwayGatewayDown",
            [
                ('up{job="runway-gateway", instance="gw-1:8080"}', "0x10"),
                ('up{job="runway-gateway", instance="gw-2:8080"}', "0x10"),
            ],
            "5m",
            [("{}", 0)],
        ),
        (
            "RunwayGatewayNotReady",
            [
                ('gateway_ready{job="runway-gateway", instance="gw-1:8080"}', "1x10"),
                ('gateway_ready{job="runway-gateway", instance="gw-2:8080"}', "0x10"),
            ],
            "5m",
            [('{job="runway-gateway", instance="gw-2:8080"}', 0)],
        ),
        (
            "RunwayUpstreamErrorRatioHigh",  # 30 of 60 calls a minute fail
            [
                ('gateway_upstream_requests_total{operation="create", status="200", instance="gw-1:8080"}', "0+30x20"),
                ('gateway_upstream_requests_total{operation="create", status="502", instance="gw-1:8080"}', "0+30x20"),
                ('gateway_upstream_requests_total{operation="status", status="200", instance="gw-1:8080"}', "0+60x20"),
            ],
            "15m",
            [('{operation="create"}', 0.5)],
        ),
        (
            "RunwayUpstreamErrorRatioHigh",  # one failure in very little traffic pages nobody
            [
                ('gateway_upstream_requests_total{operation="create", status="200"}', "0+0x20"),
                ('gateway_upstream_requests_total{operation="create", status="502"}', "0 1x20"),
            ],
            "15m",
            [],
        ),
        (
            "RunwayUpstreamKeyRefused",  # key 1 refused on two replicas; key 0 fine
            [
                ('gateway_upstream_auth_failures_total{key_index="0", instance="gw-1:8080"}', "0x10"),
                ('gateway_upstream_auth_failures_total{key_index="1", instance="gw-1:8080"}', "0+3x10"),
                ('gateway_upstream_auth_failures_total{key_index="1", instance="gw-2:8080"}', "0+1x10"),
            ],
            "5m",
            [('{key_index="1"}', 20)],
        ),
        (
            "RunwayUpstreamKeyRefused",  # refused once, long ago: quiet again
            [('gateway_upstream_auth_failures_total{key_index="0", instance="gw-1:8080"}', "0 1x30")],
            "20m",
            [],
        ),
        (
            "RunwayWebhookBacklogGrowing",
            [
                ('gateway_webhook_pending{instance="gw-1:8080"}', "0+2x60"),
                ('gateway_webhook_pending{instance="gw-2:8080"}', "0+2x60"),
            ],
            "40m",
            [("{}", 80)],
        ),
        (
            "RunwayWebhookBacklogGrowing",  # large but draining
            [('gateway_webhook_pending{instance="gw-1:8080"}', "200-2x60")],
            "40m",
            [],
        ),
        (
            "RunwayTenantNearBudget",
            [
                ('gateway_quota_usage_ratio{tenant="a", limit="credits_per_day", instance="gw-1:8080"}', "0.9x10"),
                ('gateway_quota_usage_ratio{tenant="a", limit="credits_per_day", instance="gw-2:8080"}', "0.9x10"),
                ('gateway_quota_usage_ratio{tenant="b", limit="credits_per_day", instance="gw-1:8080"}', "0.5x10"),
                ('gateway_quota_usage_ratio{tenant="a", limit="max_active_tasks", instance="gw-1:8080"}', "1x10"),
            ],
            "5m",
            [('{tenant="a", limit="credits_per_day"}', 0.9)],
        ),
        (
            "RunwayGatewayTenantErrors",
            [
                ('gateway_requests_total{tenant="a", route="/runway/tasks", method="POST", status="200"}', "0+60x20"),
                ('gateway_requests_total{tenant="a", route="/runway/tasks", method="POST", status="503"}', "0+60x20"),
                ('gateway_requests_total{tenant="b", route="/runway/tasks", method="POST", status="200"}', "0+60x20"),
            ],
            "15m",
            [('{tenant="a"}', 0.5)],
        ),
    ]
    assert {c[0] for c in cases} <= set(rules)

    tests = []
    for alert, series, at, expected in cases:
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": rules[alert],
                        "eval_time": at,
                        "exp_samples": [{"labels": labels, "value": value} for labels, value in expected],
                    }
                ],
            }
        )
    path = tmp_path / "alerts-test.yml"
    path.write_text(
        json.dumps({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}), encoding="utf-8"
    )
    out = _run([promtool, "test", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def alert_annotations(alert: str, **labels: str) -> dict[str, str]:
    """An alert's annotations as Prometheus renders them for `labels` (the relay alerts'
    templates use `$labels` only)."""
    rules = [r for g in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"] for r in g["rules"]]
    [rule] = [r for r in rules if r.get("alert") == alert]
    out = {}
    for name, text in rule["annotations"].items():
        for label, value in labels.items():
            text = text.replace(f"{{{{ $labels.{label} }}}}", value)
        assert "{{" not in text, f"{alert}.{name}: a template this helper does not render: {text}"
        out[name] = text
    return out


def test_relay_alerts_on_synthetic_series(promtool: str, tmp_path: Path) -> None:
    """`promtool test rules` with alert_rule_test: RunwayRelayDown fires for one relay that
    no replica sees up for 5 minutes (not before; not while one replica sees it up; half-open
    counts as not up); RunwayNoRelayUp fires when no relay is up anywhere for 1 minute."""
    team = {"severity": "warning", "service": "runway-gateway"}
    down = [
        # a: down on both replicas from minute 2
        ('gateway_relay_up{relay="a", instance="gw-1:8080", job="runway-gateway"}', "1 1 0x14"),
        ('gateway_relay_up{relay="a", instance="gw-2:8080", job="runway-gateway"}', "1 1 0x14"),
        # b: one replica sees it open, the other closed: max says up
        ('gateway_relay_up{relay="b", instance="gw-1:8080", job="runway-gateway"}', "0x16"),
        ('gateway_relay_up{relay="b", instance="gw-2:8080", job="runway-gateway"}', "1x16"),
        # c: half-open from minute 2 to 4, then closed again: a blip shorter than 5 minutes
        ('gateway_relay_up{relay="c", instance="gw-1:8080", job="runway-gateway"}', "1 1 0.5 0.5 0.5 1x11"),
        # d: half-open (its probes keep failing) from minute 0
        ('gateway_relay_up{relay="d", instance="gw-1:8080", job="runway-gateway"}', "0.5x16"),
    ]

    def fired(alert: str, **labels: str) -> dict[str, Any]:
        severity = {"severity": "critical"} if alert == "RunwayNoRelayUp" else {}
        return {"exp_labels": {**team, **severity, **labels}, "exp_annotations": alert_annotations(alert, **labels)}

    tests = [
        {
            "interval": "1m",
            "input_series": [{"series": k, "values": v} for k, v in down],
            "alert_rule_test": [
                {"alertname": "RunwayRelayDown", "eval_time": "4m", "exp_alerts": []},  # all still pending
                {
                    "alertname": "RunwayRelayDown",
                    "eval_time": "6m",
                    "exp_alerts": [fired("RunwayRelayDown", relay="d")],
                },
                {
                    "alertname": "RunwayRelayDown",
                    "eval_time": "8m",
                    "exp_alerts": [fired("RunwayRelayDown", relay="a"), fired("RunwayRelayDown", relay="d")],
                },
                {"alertname": "RunwayNoRelayUp", "eval_time": "10m", "exp_alerts": []},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                # every relay goes: a open at minute 2, b half-open at 3 and open at 4
                {"series": 'gateway_relay_up{relay="a", instance="gw-1:8080"}', "values": "1 1 0x10"},
                {"series": 'gateway_relay_up{relay="b", instance="gw-1:8080"}', "values": "1 1 1 0.5 0x8"},
                {"series": 'gateway_relay_up{relay="b", instance="gw-2:8080"}', "values": "1 1 1 0 0x8"},
            ],
            "alert_rule_test": [
                {"alertname": "RunwayNoRelayUp", "eval_time": "3m", "exp_alerts": []},  # pending
                {"alertname": "RunwayNoRelayUp", "eval_time": "5m", "exp_alerts": [fired("RunwayNoRelayUp")]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [  # one relay recovers after 30 s of nothing: never a page
                {"series": 'gateway_relay_up{relay="a", instance="gw-1:8080"}', "values": "1 1 0 1x10"},
                {"series": 'gateway_relay_up{relay="b", instance="gw-1:8080"}', "values": "1 1 0x10"},
            ],
            "alert_rule_test": [{"alertname": "RunwayNoRelayUp", "eval_time": "10m", "exp_alerts": []}],
        },
    ]
    path = tmp_path / "relay-alerts-test.yml"
    path.write_text(
        json.dumps({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}), encoding="utf-8"
    )
    out = _run([promtool, "test", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


# --- 3. live: a real Prometheus scrapes a running gateway ------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not up in time:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


class Prom:
    def __init__(self, base: str):
        self.base = base

    def query(self, expr: str) -> dict[str, Any]:
        r = httpx.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=5)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {r.status_code} {body}"
        return body["data"]

    def vector(self, expr: str) -> list[tuple[dict[str, str], float]]:
        data = self.query(expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        assert data["resultType"] == "vector", data
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"port {port}: process exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"nothing listens on {port}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


CREATE_BODY = {
    "taskType": "gen2",
    "internal": False,
    "options": {
        "name": "x",
        "gen2Options": {
            "mode": "gen2",
            "seed": 1,
            "interpolate": False,
            "upscale": False,
            "watermark": False,
            "motion_score": 22,
            "use_motion_score": True,
            "use_motion_vectors": False,
            "text_prompt": "a cat",
        },
        "exploreMode": False,
        "assetGroupName": "Generative Video",
    },
}


class Live:
    """A gateway (SQLite store, one tenant) on the simulator, scraped every second."""

    def __init__(self, prom: Prom, base: str, key: str):
        self.prom = prom
        self.client = httpx.Client(base_url=base, timeout=10)
        self.auth = {"Authorization": f"Bearer {key}"}

    def traffic(self) -> None:
        """A create, a read of it, a list and a refused request."""
        r = self.client.post("/runway/tasks", json=CREATE_BODY, headers=self.auth)
        assert r.status_code == 200, r.text
        task_id = r.json()["task"]["id"]
        assert self.client.get(f"/runway/tasks/{task_id}", headers=self.auth).status_code == 200
        assert self.client.get("/runway/tasks", headers=self.auth).status_code == 200
        assert self.client.get("/runway/tasks").status_code == 401


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus = _tool("prometheus")
    tmp = tmp_path_factory.mktemp("live")
    procs: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + 60  # three processes and a first scrape, on a busy CI machine
    try:
        sim_port, gw_port, prom_port = _free_port(), _free_port(), _free_port()
        key = "sk-gw-" + secrets.token_urlsafe(32)
        (tmp / "gateway.toml").write_text(
            textwrap.dedent(f"""\
            [server]
            public_url = ""
            [upstream]
            base_url = "http://127.0.0.1:{sim_port}"
            api_keys = ["sk-sim-upstream"]
            poll_interval_seconds = 1
            [store]
            url = "sqlite:///{tmp}/gw.db"
            [[tenants]]
            id = "team-a"
            keys = ["sha256:{hashlib.sha256(key.encode()).hexdigest()}"]
            [tenants.limits]
            tasks_per_day = 1000
            credits_per_day = 100000
            """),
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "GATEWAY_CONFIG")}

        def start(name: str, cmd: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
            log = tmp / f"{name}.log"
            with log.open("wb") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tmp, env=env)
            procs.append(proc)
            return proc, log

        sim, sim_log = start(
            "upstream",
            [
                sys.executable,
                "-m",
                "gateway",
                "simulate-upstream",
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--seconds-to-finish",
                "120",
            ],
        )
        gw, gw_log = start(
            "gateway",
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(tmp / "gateway.toml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(gw_port),
            ],
        )
        (tmp / "prometheus.yml").write_text(
            json.dumps(
                {  # JSON is YAML
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "runway-gateway", "static_configs": [{"targets": [f"127.0.0.1:{gw_port}"]}]}
                    ],
                }
            ),
            encoding="utf-8",
        )
        prom, prom_log = start(
            "prometheus",
            [
                prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
        )
        _wait_port(sim_port, sim, sim_log, deadline)
        _wait_http(f"http://127.0.0.1:{gw_port}/healthz", gw, gw_log, deadline)
        _wait_http(f"http://127.0.0.1:{prom_port}/-/ready", prom, prom_log, deadline)
        p = Prom(f"http://127.0.0.1:{prom_port}")
        # a scrape before the traffic, so that rates have a baseline
        while not [v for _, v in p.vector('up{job="runway-gateway"}') if v == 1]:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Prometheus never scraped the gateway:\n{prom_log.read_text(errors='replace')[-2000:]}\n"
                    f"gateway:\n{gw_log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.2)
        live = Live(p, f"http://127.0.0.1:{gw_port}", key)
        try:
            yield live
        finally:
            live.client.close()
    finally:
        for proc in reversed(procs):
            _stop(proc)


LIVE_QUERIES = [
    # (panel title, target index, predicate on the sample values, what it means)
    ("Requests/s by tenant", 0, lambda v: v > 0, "request rate"),
    ("Request latency (all routes)", 1, lambda v: math.isfinite(v) and v > 0, "p95 latency"),
    ("Upstream calls/s by operation and status", 0, lambda v: v > 0, "upstream calls"),
    ("Upstream latency by operation", 1, lambda v: math.isfinite(v) and v > 0, "upstream p95"),
    ("Active tasks by tenant", 0, lambda v: v >= 1, "active tasks (simulator takes 120 s)"),
    ("Credits charged per hour by tenant", 0, lambda v: v > 0, "credits charged"),
    ("Tasks created per minute", 0, lambda v: v > 0, "tasks created"),
    ("Budget used by tenant and limit", 0, lambda v: 0 < v <= 1, "quota usage"),
    ("Quota rejections/s by tenant and limit", 0, lambda v: v == 0, "zero children per tenant and limit"),
    ("Store ready", 0, lambda v: v == 1, "gateway_ready"),
    ("Replicas up", 0, lambda v: v == 1, "up"),
]


def test_prometheus_scrapes_gateway_and_dashboard_queries_return_data(live: Live) -> None:
    deadline = time.monotonic() + 45
    pending = list(LIVE_QUERIES)
    last: dict[str, Any] = {}
    while pending:
        # keep traffic flowing, so that every rate() has an increase between two scrapes
        # even for a label child that first appears with the traffic
        live.traffic()
        still = []
        for title, index, ok, meaning in pending:
            expr = grafana_to_promql(panel_exprs(title)[index])
            samples = live.prom.vector(expr)
            last[meaning] = (expr, samples)
            if not samples or not any(ok(v) for _, v in samples):
                still.append((title, index, ok, meaning))
        pending = still
        if pending and time.monotonic() > deadline:
            pytest.fail(
                "dashboard queries without the expected data:\n"
                + "\n".join(f"- {m}: {last[m][0]} -> {last[m][1]}" for _, _, _, m in pending)
            )
        if pending:
            time.sleep(0.5)


def test_every_dashboard_and_alert_query_evaluates_on_live_data(live: Live) -> None:
    """Beyond parsing: no query fails at evaluation (e.g. many-to-many matching) on real series."""
    live.traffic()  # series of its own, whether or not the test above ran

    def tenants() -> list[str]:
        r = httpx.get(
            f"{live.prom.base}/api/v1/label/tenant/values", params={"match[]": "gateway_requests_total"}, timeout=5
        )
        return r.json()["data"]

    # the dashboard's tenant variable lists the configured tenant
    wait_until(lambda: "team-a" in tenants(), 45, 0.5, "gateway_requests_total{tenant=team-a} in Prometheus")
    for _, expr in dashboard_exprs():
        live.prom.query(grafana_to_promql(expr))
    for _, expr in alert_rules():
        live.prom.query(expr)


def test_relays_row_returns_data_on_live_data(live: Live) -> None:
    """The relays row on a real scrape: the one relay of an `[upstream]` config, `default`,
    closed (1), with its calls counted under its id.

    LEAD: the relay series come with the relays-core branch (contract §14); on a gateway
    that does not export gateway_relay_up yet this test skips, and runs once it does."""
    if "gateway_relay_up" not in live.client.get("/metrics").text:
        pytest.skip("this gateway does not export gateway_relay_up yet (contract §14, relays-core)")

    def shown() -> bool:
        live.traffic()
        up = live.prom.vector(grafana_to_promql(panel_exprs("Relay state by relay")[0]))
        calls = live.prom.vector(grafana_to_promql(panel_exprs("Upstream calls/s by relay and status")[0]))
        return up == [({"relay": "default"}, 1.0)] and any(m.get("relay") == "default" and v > 0 for m, v in calls)

    wait_until(shown, 45, 0.5, "the relays row's data for relay default")
