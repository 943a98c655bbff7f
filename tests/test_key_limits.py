"""Keys with their own limits, scopes and networks (contract §15), through real gateways:
the admin API that sets them, each refusal on both faces, a key limit held exactly by two
replicas on one Redis, and a change in force on another replica within a second. The
store's side (key and tenant limits raced together, releases) is in test_store_contract.py."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN_KEY, GatewayProcess, Simulator, TenantSpec, gen2_body, probe, wait_until

from gateway.store.base import ALL_LIMITS

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
V1 = "/admin/v1"
NO_LIMITS = dict.fromkeys(ALL_LIMITS)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway behind a trusted proxy (127.0.0.1), tasks kept active for a minute."""
    tmp = tmp_path_factory.mktemp("key-limits")
    sim = Simulator(tmp, seconds_to_finish=60)
    sim.start()
    g = GatewayProcess(
        tmp,
        sim.url,
        [TenantSpec("cfg-k", limits={"max_active_tasks": 50})],
        server_toml='trusted_proxies = ["127.0.0.1/32"]',
    )
    g.start()
    yield g
    g.stop()
    sim.stop()


@pytest.fixture
def api(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url + V1, headers=ADMIN, timeout=10) as client:
        yield client


_ids = itertools.count()


def make_tenant(api: httpx.Client, **limits: int) -> str:
    tenant = f"kl-{next(_ids)}-{int(time.time() * 1000) % 100000}"
    resp = api.post("/tenants", json={"id": tenant, "limits": limits})
    assert resp.status_code == 201, resp.text
    return tenant


def mint(api: httpx.Client, tenant: str, **fields: Any) -> dict[str, Any]:
    resp = api.post(f"/tenants/{tenant}/keys", json={"name": "svc", **fields})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def bearer(key: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['secret']}", **extra}


def ready(gw: GatewayProcess, key: dict[str, Any]) -> None:
    """Wait for the minted key to reach the directory (a refresh, at most 250 ms)."""
    wait_until(
        lambda: (
            httpx.get(gw.url + "/v1/models", headers=bearer(key, **{"x-forwarded-for": "10.20.0.1"})).status_code != 401
        ),
        5,
        message="the key to authenticate",
    )


def error_of(resp: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    return error


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- the admin API ---------------------------------------------------------------------


def test_a_key_carries_limits_scopes_and_networks_through_mint_patch_and_rotation(api: httpx.Client) -> None:
    tenant = make_tenant(api)
    key = mint(
        api,
        tenant,
        limits={"requests_per_minute": 60, "max_active_tasks": 2, "tasks_per_day": None},
        scopes=["read", "create"],
        allowed_cidrs=["10.20.0.0/16", "10.30.1.7"],
    )
    assert key["limits"] == {**NO_LIMITS, "requests_per_minute": 60, "max_active_tasks": 2}
    assert key["scopes"] == ["create", "read"] and key["allowed_cidrs"] == ["10.20.0.0/16", "10.30.1.7/32"]
    plain = mint(api, tenant)
    assert (plain["limits"], plain["scopes"], plain["allowed_cidrs"]) == (NO_LIMITS, ["create", "read", "delete"], None)

    shown = api.get(f"/keys/{key['id']}").json()
    assert shown["usage"] == {
        "active": 0,
        "tasks_today": 0,
        "credits_today": 0,
        "credits_this_month": 0,
        "tasks_this_month": 0,
    }
    assert {k: v for k, v in shown.items() if k != "usage"} == {k: v for k, v in key.items() if k != "secret"}

    patched = api.patch(
        f"/keys/{key['id']}", json={"limits": {"max_active_tasks": None, "credits_per_day": 500}, "scopes": ["read"]}
    ).json()
    assert patched["limits"] == {**NO_LIMITS, "requests_per_minute": 60, "credits_per_day": 500}
    assert patched["scopes"] == ["read"] and patched["allowed_cidrs"] == ["10.20.0.0/16", "10.30.1.7/32"]
    rotated = api.post(f"/keys/{key['id']}/rotate", json={"grace_seconds": 0}).json()
    assert (rotated["limits"], rotated["scopes"], rotated["allowed_cidrs"]) == (
        patched["limits"],
        patched["scopes"],
        patched["allowed_cidrs"],
    )
    removed = api.patch(f"/keys/{key['id']}", json={"scopes": None, "allowed_cidrs": None}).json()
    assert removed["scopes"] == ["create", "read", "delete"] and removed["allowed_cidrs"] is None

    entries = api.get("/audit", params={"tenant": tenant}).json()["data"]
    changes = {(e["action"], e["target"].get("key_id")): e["changes"] for e in reversed(entries)}
    assert changes[("key.create", key["id"])]["allowed_cidrs"] == ["10.20.0.0/16", "10.30.1.7/32"]
    updates = [e["changes"] for e in entries if e["action"] == "key.update"]
    assert updates == [
        {"scopes": None, "allowed_cidrs": None},
        {"limits": {"max_active_tasks": None, "credits_per_day": 500}, "scopes": ["read"]},
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"limits": {"max_active_tasks": -1}}, "limits.max_active_tasks"),
        ({"limits": {"max_active_tasks": 0}}, "limits.max_active_tasks"),
        ({"limits": {"tasks_per_hour": 5}}, "limits.tasks_per_hour"),
        ({"limits": [1]}, "limits"),
        ({"scopes": ["read", "admin"]}, "scopes.1"),
        ({"scopes": []}, "scopes"),
        ({"scopes": "read"}, "scopes"),
        ({"allowed_cidrs": ["10.0.0.0/33"]}, "allowed_cidrs.0"),
        ({"allowed_cidrs": ["10.1.0.0/16", "not-a-network"]}, "allowed_cidrs.1"),
        ({"allowed_cidrs": [17]}, "allowed_cidrs.0"),
        ({"allowed_cidrs": []}, "allowed_cidrs"),
    ],
)
def test_bad_limits_scopes_and_cidrs_are_400_with_their_param_and_change_nothing(
    api: httpx.Client, body: dict[str, Any], param: str
) -> None:
    tenant = make_tenant(api)
    key = mint(api, tenant)
    for resp in (
        api.post(f"/tenants/{tenant}/keys", json={"name": "bad", **body}),
        api.patch(f"/keys/{key['id']}", json=body),
    ):
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert error["code"] in ("invalid_value", "invalid_type", "unknown_parameter"), error
    assert [k["id"] for k in api.get(f"/tenants/{tenant}/keys").json()["data"]] == [key["id"]]
    assert api.get(f"/keys/{key['id']}").json()["limits"] == NO_LIMITS


def test_config_keys_show_no_limits_and_all_scopes(gw: GatewayProcess, api: httpx.Client) -> None:
    keys = api.get("/tenants/cfg-k/keys").json()["data"]
    assert [(k["limits"], k["scopes"], k["allowed_cidrs"]) for k in keys] == [
        (NO_LIMITS, ["create", "read", "delete"], None)
    ]
    error_of(api.patch(f"/keys/{keys[0]['id']}", json={"scopes": ["read"]}), 409, "key_managed_by_config", "key_id")


# --- scopes ------------------------------------------------------------------------------


def _calls(task_id: str) -> dict[str, list[tuple[str, str, dict[str, Any] | None]]]:
    """Every tenant call by the scope it needs, on both faces."""
    return {
        "create": [("POST", "/runway/tasks", gen2_body("scoped")), ("POST", "/v1/videos", {"prompt": "scoped"})],
        "read": [
            ("GET", f"/runway/tasks/{task_id}", None),
            ("GET", "/runway/tasks", None),
            ("GET", "/v1/videos", None),
            ("GET", f"/v1/videos/{task_id}", None),
            ("GET", f"/v1/videos/{task_id}/content", None),
            ("GET", "/v1/models", None),
            ("GET", "/v1/models/gen2", None),
        ],
        "delete": [("DELETE", f"/v1/videos/{task_id}", None)],
    }


def test_every_call_outside_a_keys_scopes_is_403_naming_the_scope(gw: GatewayProcess, api: httpx.Client) -> None:
    tenant = make_tenant(api)
    full = mint(api, tenant)
    ready(gw, full)
    created = httpx.post(gw.url + "/runway/tasks", json=gen2_body("mine"), headers=bearer(full), timeout=10)
    assert created.status_code == 200, created.text
    task_id = created.json()["task"]["id"]
    for scope, calls in _calls(task_id).items():
        others = [s for s in ("create", "read", "delete") if s != scope]
        key = mint(api, tenant, scopes=others)
        ready(gw, key)
        for method, path, body in calls:
            resp = httpx.request(method, gw.url + path, json=body, headers=bearer(key), timeout=10)
            error = error_of(resp, 403, "permission_denied")
            assert f"`{scope}` scope" in error["message"] and error["type"] == "permission_error", (path, error)
    # within its scopes a key works: read-only reads, delete-only deletes
    reader = mint(api, tenant, scopes=["read"])
    ready(gw, reader)
    assert httpx.get(f"{gw.url}/runway/tasks/{task_id}", headers=bearer(reader)).status_code == 200
    assert httpx.get(f"{gw.url}/v1/models", headers=bearer(reader)).status_code == 200
    # a rotation keeps the scopes: the new secret and the old one (in its grace) read only
    rotated = api.post(f"/keys/{reader['id']}/rotate", json={"grace_seconds": 600}).json()
    ready(gw, rotated)
    for secret in (rotated, reader):
        resp = httpx.post(gw.url + "/runway/tasks", json=gen2_body("no"), headers=bearer(secret), timeout=10)
        assert "`create` scope" in error_of(resp, 403, "permission_denied")["message"]
        assert httpx.get(f"{gw.url}/runway/tasks/{task_id}", headers=bearer(secret)).status_code == 200
    deleter = mint(api, tenant, scopes=["delete"])
    ready(gw, deleter)
    assert httpx.delete(f"{gw.url}/v1/videos/{task_id}", headers=bearer(deleter)).status_code == 200


# --- networks ------------------------------------------------------------------------------


def test_allowed_cidrs_take_the_client_address_after_the_trusted_proxy(gw: GatewayProcess, api: httpx.Client) -> None:
    tenant = make_tenant(api)
    key = mint(api, tenant, allowed_cidrs=["10.20.0.0/16"])
    ready(gw, key)
    before = metric(gw, "gateway_auth_failures_total", reason="network")
    # the peer (127.0.0.1, the trusted proxy) forwards a client in the network: admitted
    inside = httpx.get(gw.url + "/v1/models", headers=bearer(key, **{"x-forwarded-for": "10.20.9.9"}))
    assert inside.status_code == 200, inside.text
    # a client outside it, or no forwarded client (the proxy itself): refused
    for headers in (bearer(key, **{"x-forwarded-for": "192.0.2.7"}), bearer(key)):
        resp = httpx.get(gw.url + "/v1/models", headers=headers)
        error = error_of(resp, 403, "permission_denied")
        assert "not allowed from this network" in error["message"]
    create = httpx.post(
        gw.url + "/v1/videos", json={"prompt": "x"}, headers=bearer(key, **{"x-forwarded-for": "8.8.8.8"})
    )
    error_of(create, 403, "permission_denied")
    wait_until(
        lambda: metric(gw, "gateway_auth_failures_total", reason="network") - before == 3, 5, message="the metric"
    )


def test_allowed_cidrs_read_every_forwarded_for_line_from_the_proxys_end(gw: GatewayProcess, api: httpx.Client) -> None:
    """A proxy that adds its own `X-Forwarded-For` line (HAProxy's `option forwardfor`)
    leaves the client's forged line before it: the hops of all lines, in order, are one
    list (RFC 9110 5.3), read from the proxy's end, so a forged first line is not believed."""
    tenant = make_tenant(api)
    key = mint(api, tenant, allowed_cidrs=["10.20.0.0/16"])
    ready(gw, key)
    auth = ("Authorization", f"Bearer {key['secret']}")
    forged = [auth, ("x-forwarded-for", "10.20.9.9"), ("x-forwarded-for", "192.0.2.7")]
    resp = httpx.get(gw.url + "/v1/models", headers=forged)
    assert "not allowed from this network" in error_of(resp, 403, "permission_denied")["message"]
    create = httpx.post(gw.url + "/runway/tasks", json=gen2_body(), headers=forged)
    error_of(create, 403, "permission_denied")
    # the client inside the network, named by the proxy's own (last) line: admitted
    honest = [auth, ("x-forwarded-for", "192.0.2.7"), ("x-forwarded-for", "10.20.9.9")]
    assert httpx.get(gw.url + "/v1/models", headers=honest).status_code == 200


# --- limits ------------------------------------------------------------------------------


def test_a_key_limit_refuses_with_its_name_headers_and_metric(gw: GatewayProcess, api: httpx.Client) -> None:
    tenant = make_tenant(api, max_active_tasks=10, requests_per_minute=100)
    key = mint(api, tenant, limits={"max_active_tasks": 1, "requests_per_minute": 5})
    other = mint(api, tenant)
    ready(gw, key)
    first = httpx.post(gw.url + "/runway/tasks", json=gen2_body("one"), headers=bearer(key), timeout=10)
    assert first.status_code == 200, first.text
    # the tightest bucket is the key's: 5 per minute, one taken by ready() and one by the create
    assert first.headers["x-ratelimit-limit-requests"] == "5"
    assert first.headers["x-ratelimit-remaining-requests"] == "3"
    refused = httpx.post(gw.url + "/runway/tasks", json=gen2_body("two"), headers=bearer(key), timeout=10)
    error = error_of(refused, 429, "rate_limit_exceeded")
    assert "API key's own limit" in error["message"] and "max_active_tasks is 1" in error["message"]
    assert key["id"] in error["message"] and int(refused.headers["retry-after"]) >= 1
    # the tenant's other key is not held back by this key's limit
    ready(gw, other)
    assert (
        httpx.post(gw.url + "/runway/tasks", json=gen2_body("3"), headers=bearer(other), timeout=10).status_code == 200
    )
    wait_until(
        lambda: metric(gw, "gateway_quota_rejections_total", tenant=tenant, limit="key_max_active_tasks") == 1,
        5,
        message="the rejection metric",
    )
    usage = api.get(f"/keys/{key['id']}").json()["usage"]
    assert usage == {
        "active": 1,
        "tasks_today": 1,
        "credits_today": 10,
        "credits_this_month": 10,
        "tasks_this_month": 1,
    }
    # the key's request bucket: the remaining tokens, then a 429 naming it on a read
    for _ in range(10):
        resp = httpx.get(gw.url + "/v1/models", headers=bearer(key))
        if resp.status_code == 429:
            break
    error = error_of(resp, 429, "rate_limit_exceeded")
    assert "requests_per_minute" in error["message"] and "API key's own limit" in error["message"]


# --- two replicas on one store ----------------------------------------------------------------


@pytest.fixture(params=["redis", "sqlite"])
def replica_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    """Two gateway processes on one private Redis, or on one SQLite file."""
    url = (
        request.getfixturevalue("redis_store_url")
        if request.param == "redis"
        else f"sqlite:///{tmp_path / 'shared.db'}"
    )
    sim = Simulator(tmp_path, seconds_to_finish=60)
    sim.start()
    pair = [GatewayProcess(tmp_path, sim.url, [], store_url=url) for _ in "ab"]
    for g in pair:
        g.start()
    yield pair
    for g in pair:
        g.stop()
    sim.stop()


def test_two_replicas_hold_a_key_limit_exactly_and_take_a_patch_within_a_second(
    replica_pair: list[GatewayProcess],
) -> None:
    a, b = replica_pair
    with httpx.Client(base_url=a.url + V1, headers=ADMIN, timeout=10) as api:
        tenant = make_tenant(api, max_active_tasks=10)
        key = mint(api, tenant, limits={"max_active_tasks": 3})
        for g in replica_pair:
            ready(g, key)
        barrier = threading.Barrier(20)

        def one(i: int) -> int:
            with httpx.Client(base_url=replica_pair[i % 2].url, headers=bearer(key), timeout=20) as c:
                barrier.wait()
                return c.post("/runway/tasks", json=gen2_body(f"race {i}")).status_code

        with ThreadPoolExecutor(20) as pool:
            statuses = sorted(pool.map(one, range(20)))
        assert statuses == [200] * 3 + [429] * 17
        assert api.get(f"/keys/{key['id']}").json()["usage"]["active"] == 3
        assert api.get(f"/tenants/{tenant}").json()["usage"]["active"] == 3

        # a PATCH through replica a is in force on replica b within a second
        since = time.monotonic()
        assert api.patch(f"/keys/{key['id']}", json={"scopes": ["create"]}).status_code == 200

        def refused_on_b() -> bool:
            return all(probe(b.url, "/v1/models", key["secret"]).status == 403 for _ in range(3))

        wait_until(refused_on_b, 3, 0.02, "the scope change on replica b")
        elapsed = time.monotonic() - since
        assert elapsed < 1.0, f"took {elapsed:.2f}s"
        error = error_of(httpx.get(b.url + "/v1/models", headers=bearer(key)), 403, "permission_denied")
        assert re.search(r"`read` scope", error["message"])
