"""The admin API v1 through a real gateway process: tenants, keys, the audit trail, admin
authentication, every refusal with its `param`, and no secret or hash ever shown twice."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import ADMIN_KEY, GatewayProcess, Simulator, TenantSpec, gen2_body, key_hash, wait_until

JWT_SECRET = "admin-api-test-jwt-secret-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ADMIN_ACTOR = {"type": "admin_key", "id": "adm_" + hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:12]}
V1 = "/admin/v1"
LIMITS = (
    "requests_per_minute",
    "tasks_per_minute",
    "max_active_tasks",
    "tasks_per_day",
    "credits_per_day",
    "credits_per_month",
)


@pytest.fixture(scope="module")
def admin_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("admin-api")
    sim = Simulator(tmp)
    sim.start()
    tenants = [TenantSpec("cfg-a", limits={"max_active_tasks": 5}), TenantSpec("cfg-off", enabled=False)]
    jwt_toml = f'[auth.jwt]\nalgorithms = ["HS256"]\nsecret = "{JWT_SECRET}"\n'
    g = GatewayProcess(tmp, sim.url, tenants, extra_toml=jwt_toml)
    g.start()
    yield g
    g.stop()
    sim.stop()


@pytest.fixture
def api(admin_gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=admin_gw.url + V1, headers=ADMIN, timeout=10) as client:
        yield client


def token(**claims: Any) -> str:
    return jwt.encode({"exp": int(time.time()) + 300, **claims}, JWT_SECRET, algorithm="HS256")


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def error_of(resp: httpx.Response, status: int, code: str, param: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    return error


def make_tenant(api: httpx.Client, **fields: Any) -> dict[str, Any]:
    resp = api.post("/tenants", json={"id": new_id(), **fields})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def mint(api: httpx.Client, tenant: str, name: str = "svc", **fields: Any) -> dict[str, Any]:
    resp = api.post(f"/tenants/{tenant}/keys", json={"name": name, **fields})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def audit_of(api: httpx.Client, tenant: str, **params: Any) -> list[dict[str, Any]]:
    resp = api.get("/audit", params={"tenant": tenant, **params})
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


# --- authentication ----------------------------------------------------------------------


def test_admin_routes_refuse_a_missing_unknown_or_tenant_credential(admin_gw: GatewayProcess) -> None:
    url = admin_gw.url + V1 + "/tenants"
    cases = [
        ({}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer sk-gw-not-an-admin-key"}, 401, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {token(sub='x', roles=['other'], tenant='nobody')}"}, 401, "invalid_api_key"),
        (admin_gw.tenants["cfg-a"].headers(), 403, "permission_denied"),
        (admin_gw.tenants["cfg-off"].headers(), 403, "permission_denied"),
        ({"Authorization": f"Bearer {token(sub='svc', tenant='cfg-a')}"}, 403, "permission_denied"),
        ({"Authorization": f"Bearer {token(sub='svc', tenant='cfg-a', roles=['viewer'])}"}, 403, "permission_denied"),
    ]
    for headers, status, code in cases:
        resp = httpx.get(url, headers=headers, timeout=5)
        assert resp.status_code == status, (headers, resp.text)
        assert resp.json()["error"]["code"] == code


def test_an_admin_jwt_role_is_an_admin_named_by_its_sub(admin_gw: GatewayProcess, api: httpx.Client) -> None:
    for roles in (["reader", "runway-gateway-admin"], "runway-gateway-admin"):
        headers = {"Authorization": f"Bearer {token(sub='alice@example.com', roles=roles)}"}
        tenant_id = new_id()
        resp = httpx.post(admin_gw.url + V1 + "/tenants", json={"id": tenant_id}, headers=headers, timeout=5)
        assert resp.status_code == 201, resp.text
        (entry,) = audit_of(api, tenant_id)
        assert entry["actor"] == {"type": "jwt", "id": "alice@example.com"}


ROLE = "runway-gateway-admin"  # the default `[admin] jwt_role`
NEAR_MISSES = [
    "runway-gateway-admin-readonly",
    "notrunway-gateway-admin",
    "runway-gateway",
    "runway-gateway-admi",
    "runway",
    "Runway-Gateway-Admin",
    "RUNWAY-GATEWAY-ADMIN",
    "runway-gateway-admin,reader",
    "runway-gateway-admin\u200b",
    "",
]


@pytest.mark.parametrize(
    "roles",
    [*NEAR_MISSES, *([miss] for miss in NEAR_MISSES), ["reader", f"{ROLE} reader"], [[ROLE]], {ROLE: True}, True],
)
def test_an_admin_role_that_is_almost_the_role_is_refused(admin_gw: GatewayProcess, roles: Any) -> None:
    """The role is matched exactly: one word of a string claim, or one element of a list
    claim. A tenant's JWT whose role claim is a near miss stays a tenant's: 403."""
    headers = {"Authorization": f"Bearer {token(sub='mallory', tenant='cfg-a', roles=roles)}"}
    resp = httpx.get(admin_gw.url + V1 + "/tenants", headers=headers, timeout=5)
    error_of(resp, 403, "permission_denied", None)


@pytest.mark.parametrize("roles", [ROLE, [ROLE], f"reader {ROLE}", f" {ROLE} ", ["reader", ROLE]])
def test_the_exact_admin_role_passes(admin_gw: GatewayProcess, roles: Any) -> None:
    headers = {"Authorization": f"Bearer {token(sub='alice', tenant='cfg-a', roles=roles)}"}
    resp = httpx.get(admin_gw.url + V1 + "/tenants", headers=headers, timeout=5)
    assert resp.status_code == 200, resp.text


def test_the_admin_claim_and_role_are_configurable(tmp_path: Path) -> None:
    sim = Simulator(tmp_path)
    sim.start()
    jwt_toml = f'[auth.jwt]\nalgorithms = ["HS256"]\nsecret = "{JWT_SECRET}"\n'
    admin_toml = 'jwt_claim = "groups"\njwt_role = "platform-ops"\n'
    g = GatewayProcess(tmp_path, sim.url, [TenantSpec("cfg-z")], extra_toml=jwt_toml)
    g.config_path.write_text(g.config_path.read_text().replace("[admin]\n", "[admin]\n" + admin_toml))
    try:
        g.start()
        url = g.url + V1 + "/tenants"
        ops = httpx.get(url, headers={"Authorization": f"Bearer {token(sub='ops', groups='staff platform-ops')}"})
        assert ops.status_code == 200, ops.text
        default = httpx.get(url, headers={"Authorization": f"Bearer {token(sub='x', roles=['runway-gateway-admin'])}"})
        assert default.status_code == 401 and default.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url, headers=ADMIN).status_code == 200
    finally:
        g.stop()
        sim.stop()


# --- tenants -----------------------------------------------------------------------------


def test_tenants_list_config_and_api_tenants_by_id_with_pages(api: httpx.Client) -> None:
    created = [make_tenant(api)["id"] for _ in range(3)]
    everything = api.get("/tenants", params={"limit": 1000}).json()
    assert everything["object"] == "list" and everything["has_more"] is False
    ids = [t["id"] for t in everything["data"]]
    assert ids == sorted(ids) and {"cfg-a", "cfg-off", *created} <= set(ids)
    config = next(t for t in everything["data"] if t["id"] == "cfg-a")
    assert config["source"] == "config" and config["created_at"] is None and config["limits"]["max_active_tasks"] == 5
    assert "webhook_secret" not in config
    pages, after = [], None
    while True:
        page = api.get("/tenants", params={"limit": 2, **({"after": after} if after else {})}).json()
        pages += [t["id"] for t in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert pages == ids
    assert len(api.get("/tenants").json()["data"]) == min(len(ids), 100)


def test_create_show_and_update_a_tenant(api: httpx.Client) -> None:
    tenant_id = new_id()
    body = {
        "id": tenant_id,
        "name": "Search",
        "limits": {"requests_per_minute": 600, "max_active_tasks": 10, "credits_per_day": None},
        "policy": {"force": {"watermark": True}, "defaults": {"motion_score": 7}, "hook_hosts": ["Hooks.Example.com"]},
    }
    resp = api.post("/tenants", json=body)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["webhook_secret"].startswith("whsec_") and len(created["webhook_secret"]) > 40
    assert created["object"] == "tenant" and created["source"] == "api" and created["enabled"] is True
    assert created["limits"] == {**dict.fromkeys(LIMITS), "requests_per_minute": 600, "max_active_tasks": 10}
    assert created["policy"] == {
        "force": {"watermark": True},
        "defaults": {"motion_score": 7},
        "hook_hosts": ["hooks.example.com"],
    }
    assert isinstance(created["created_at"], int) and abs(created["created_at"] - time.time()) < 60

    shown = api.get(f"/tenants/{tenant_id}").json()
    assert "webhook_secret" not in shown
    assert {"active", "tasks_today", "credits_today", "credits_this_month"} <= set(shown["usage"])
    assert shown["limits"] == created["limits"]

    patch = {"name": "Search 2", "enabled": False, "limits": {"requests_per_minute": None, "tasks_per_day": 50}}
    updated = api.patch(f"/tenants/{tenant_id}", json=patch).json()
    assert updated["name"] == "Search 2" and updated["enabled"] is False
    assert updated["limits"] == {**dict.fromkeys(LIMITS), "max_active_tasks": 10, "tasks_per_day": 50}
    assert api.patch(f"/tenants/{tenant_id}", json={"policy": {"hook_hosts": []}}).json()["policy"] == {
        "force": {},
        "defaults": {},
        "hook_hosts": [],
    }
    assert api.get(f"/tenants/{tenant_id}").json()["enabled"] is False

    config = api.get("/tenants/cfg-a").json()
    assert config["source"] == "config" and config["usage"]["active"] == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"id": "Bad!"}, "id"),
        ({"id": ""}, "id"),
        ({"id": "a" * 65}, "id"),
        ({"id": "ok\n"}, "id"),
        ({"id": 7}, "id"),
        ({"id": "ok", "limits": {"max_active_tasks": -1}}, "limits.max_active_tasks"),
        ({"id": "ok", "limits": {"credits_per_day": 0}}, "limits.credits_per_day"),
        ({"id": "ok", "limits": {"tasks_per_day": 1.5}}, "limits.tasks_per_day"),
        ({"id": "ok", "limits": {"tasks_per_day": "5"}}, "limits.tasks_per_day"),
        ({"id": "ok", "limits": {"tasks_per_day": True}}, "limits.tasks_per_day"),
        ({"id": "ok", "limits": {"tasks_per_day": 2**63}}, "limits.tasks_per_day"),
        ({"id": "ok", "limits": {"per_hour": 5}}, "limits.per_hour"),
        ({"id": "ok", "limits": []}, "limits"),
        ({"id": "ok", "policy": {"hook_hosts": ["not a host!"]}}, "policy.hook_hosts"),
        ({"id": "ok", "policy": {"hook_hosts": ["0.0.0.0/0"]}}, "policy.hook_hosts"),
        ({"id": "ok", "policy": {"hook_hosts": ["hooks.example.com", "::/0"]}}, "policy.hook_hosts"),
        ({"id": "ok", "policy": {"force": {"seed": "x"}}}, "policy.force.seed"),
        ({"id": "ok", "policy": {"force": {"seed": 2**32}}}, "policy.force.seed"),
        ({"id": "ok", "policy": {"defaults": {"motion_score": 101}}}, "policy.defaults.motion_score"),
        ({"id": "ok", "policy": {"force": {"mode": "gen3"}}}, "policy.force.mode"),
        ({"id": "ok", "policy": {"force": {"init_image": "https://a b/c.png"}}}, "policy.force.init_image"),
        ({"id": "ok", "policy": {"defaults": {"colour": "red"}}}, "policy.defaults.colour"),
        ({"id": "ok", "policy": {"extra": {}}}, "policy.extra"),
        ({"id": "ok", "enabled": "yes"}, "enabled"),
        ({"id": "ok", "name": ""}, "name"),
        ({"id": "ok", "name": "red \x1b[31m"}, "name"),
        ({"id": "ok", "name": "nul\x00"}, "name"),
        ({"id": "ok", "name": "invoice\u202egpj.exe"}, "name"),  # right-to-left override
        ({"id": "ok", "name": "a\u2066b\u2069"}, "name"),  # isolates
        ({"id": "ok", "name": "\u200b\u200c"}, "name"),  # zero-width only
        ({"id": "ok", "name": " \u2060\ufeff "}, "name"),
        ({"id": "ok", "name": "line\u2028break"}, "name"),
        ({"id": "ok", "name": "para\u2029break"}, "name"),
        ({"id": "ok", "surprise": 1}, "surprise"),
        ({"name": "no id"}, "id"),
    ],
)
def test_a_bad_tenant_is_refused_with_its_param(api: httpx.Client, body: dict[str, Any], param: str) -> None:
    resp = api.post("/tenants", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert api.get("/tenants/ok").status_code == 404


def test_the_largest_limit_is_2_pow_63_minus_1(api: httpx.Client) -> None:
    created = make_tenant(api, limits={"credits_per_month": 2**63 - 1})
    assert created["limits"]["credits_per_month"] == 2**63 - 1


def test_bad_json_and_non_objects_are_400(api: httpx.Client) -> None:
    error_of(api.post("/tenants", content=b"{not json"), 400, "invalid_json", None)
    error_of(api.post("/tenants", json=[1]), 400, "invalid_body", None)
    tenant = make_tenant(api)["id"]
    error_of(api.patch(f"/tenants/{tenant}", content=b"nope"), 400, "invalid_json", None)
    error_of(
        api.patch(f"/tenants/{tenant}", json={"limits": {"max_active_tasks": -3}}),
        400,
        "invalid_value",
        "limits.max_active_tasks",
    )
    error_of(api.patch(f"/tenants/{tenant}", json={"id": "renamed"}), 400, "unknown_parameter", "id")


def test_tenant_conflicts_and_unknown_tenants(api: httpx.Client) -> None:
    tenant = make_tenant(api)["id"]
    error_of(api.post("/tenants", json={"id": tenant}), 409, "tenant_exists", "id")
    error_of(api.post("/tenants", json={"id": "cfg-a"}), 409, "tenant_exists", "id")
    error_of(api.patch("/tenants/cfg-a", json={"enabled": False}), 409, "tenant_managed_by_config", "id")
    error_of(api.post("/tenants/cfg-a/webhook-secret", json={}), 409, "tenant_managed_by_config", "id")
    for method, path in [
        ("GET", "/tenants/nobody-here"),
        ("PATCH", "/tenants/nobody-here"),
        ("POST", "/tenants/nobody-here/webhook-secret"),
        ("GET", "/tenants/nobody-here/keys"),
        ("POST", "/tenants/nobody-here/keys"),
    ]:
        json_body = {"name": "x"} if method != "GET" else None
        error_of(api.request(method, path, json=json_body), 404, "tenant_not_found", "id")
    assert api.get("/tenants/cfg-a").json()["enabled"] is True


def test_webhook_secret_rotation_shows_the_new_secret_once(api: httpx.Client) -> None:
    created = make_tenant(api)
    tenant = created["id"]
    rotated = api.post(f"/tenants/{tenant}/webhook-secret", json={"grace_seconds": 600})
    assert rotated.status_code == 200, rotated.text
    secret = rotated.json()["webhook_secret"]
    assert secret.startswith("whsec_") and secret != created["webhook_secret"]
    assert rotated.json()["id"] == tenant and "previous_webhook_secret" not in rotated.json()
    default = api.post(f"/tenants/{tenant}/webhook-secret", content=b"").json()["webhook_secret"]
    assert default not in (secret, created["webhook_secret"])
    entries = audit_of(api, tenant, action="tenant.webhook_secret.rotate")
    assert [e["changes"] for e in entries] == [{"grace_seconds": 86400}, {"grace_seconds": 600}]
    for bad in (-1, 1.5, "60", 10**12):
        error_of(
            api.post(f"/tenants/{tenant}/webhook-secret", json={"grace_seconds": bad}),
            400,
            "invalid_value",
            "grace_seconds",
        )


# --- keys --------------------------------------------------------------------------------


def test_mint_list_show_update_rotate_and_revoke_a_key(api: httpx.Client) -> None:
    tenant = make_tenant(api)["id"]
    first = mint(api, tenant, "first")
    second = mint(api, tenant, "billing-svc", expires_in_seconds=3600)
    for key in (first, second):
        assert key["id"].startswith("key_") and key["object"] == "api_key" and key["source"] == "api"
        assert key["secret"].startswith("sk-gw-") and len(key["secret"]) == 6 + 43
        assert key["secret"].isascii() and key["secret"][6:].isalnum()
        assert key["prefix"] == key["secret"][:10] and key["tenant"] == tenant
        assert key["revoked_at"] is None and key["last_used_at"] is None
    assert first["expires_at"] is None
    assert abs(second["expires_at"] - (time.time() + 3600)) < 60

    listed = api.get(f"/tenants/{tenant}/keys").json()
    assert [k["id"] for k in listed["data"]] == [second["id"], first["id"]] and not listed["has_more"]
    assert all("secret" not in k for k in listed["data"])
    page = api.get(f"/tenants/{tenant}/keys", params={"limit": 1}).json()
    assert [k["id"] for k in page["data"]] == [second["id"]] and page["has_more"]
    rest = api.get(f"/tenants/{tenant}/keys", params={"limit": 1, "after": second["id"]}).json()
    assert [k["id"] for k in rest["data"]] == [first["id"]] and not rest["has_more"]
    error_of(api.get(f"/tenants/{tenant}/keys", params={"after": "key_nope"}), 400, "invalid_value", "after")

    shown = api.get(f"/keys/{first['id']}").json()
    assert shown.pop("usage")["active"] == 0  # next to its limits (contract §15)
    assert shown == {k: v for k, v in first.items() if k != "secret"}

    later = int(time.time()) + 7200
    updated = api.patch(f"/keys/{first['id']}", json={"name": "renamed", "expires_at": later}).json()
    assert (updated["name"], updated["expires_at"]) == ("renamed", later)
    assert api.patch(f"/keys/{first['id']}", json={"expires_at": None}).json()["expires_at"] is None

    rotated = api.post(f"/keys/{first['id']}/rotate", json={"grace_seconds": 3600}).json()
    assert rotated["id"] == first["id"] and rotated["secret"] != first["secret"]
    assert rotated["prefix"] == rotated["secret"][:10]
    assert abs(rotated["previous_secret_expires_at"] - (time.time() + 3600)) < 60
    no_grace = api.post(f"/keys/{first['id']}/rotate", json={"grace_seconds": 0}).json()
    assert no_grace["id"] == first["id"]  # the first rotation's old secret keeps its hour
    assert no_grace["previous_secret_expires_at"] == rotated["previous_secret_expires_at"]
    default = api.post(f"/keys/{first['id']}/rotate").json()
    assert abs(default["previous_secret_expires_at"] - (time.time() + 86400)) < 60

    revoked = api.delete(f"/keys/{first['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    again = api.delete(f"/keys/{first['id']}").json()
    assert again["revoked_at"] == revoked.json()["revoked_at"]
    error_of(api.post(f"/keys/{first['id']}/rotate"), 409, "key_revoked", "key_id")
    assert len(audit_of(api, tenant, action="key.revoke")) == 1


def test_the_admin_api_on_redis(tmp_path: Path, redis_store_url: str) -> None:
    """The same routes over the Redis store: a tenant, a key's life, the audit trail."""
    sim = Simulator(tmp_path)
    sim.start()
    g = GatewayProcess(tmp_path, sim.url, [TenantSpec("cfg-r")], store_url=redis_store_url)
    try:
        g.start()
        with httpx.Client(base_url=g.url + V1, headers=ADMIN, timeout=10) as api:
            tenant = make_tenant(api, limits={"max_active_tasks": 3})["id"]
            assert [t["id"] for t in api.get("/tenants").json()["data"]] == sorted(["cfg-r", tenant])
            key = mint(api, tenant)["id"]
            assert api.post(f"/keys/{key}/rotate", json={"grace_seconds": 60}).json()["id"] == key
            assert api.delete(f"/keys/{key}").json()["revoked_at"] is not None
            assert [k["id"] for k in api.get(f"/tenants/{tenant}/keys").json()["data"]] == [key]
            actions = [e["action"] for e in audit_of(api, tenant)]
            assert actions == ["key.revoke", "key.rotate", "key.create", "tenant.create"]
            error_of(api.post("/tenants", json={"id": tenant}), 409, "tenant_exists", "id")
    finally:
        g.stop()
        sim.stop()


def test_config_keys_are_listed_after_api_keys_and_are_read_only(admin_gw: GatewayProcess, api: httpx.Client) -> None:
    minted = mint(api, "cfg-a", "for-a-config-tenant")
    listed = api.get("/tenants/cfg-a/keys").json()["data"]
    configured = key_hash(admin_gw.tenants["cfg-a"].key)
    config_id = "key_cfg_" + hashlib.sha256(configured.encode()).hexdigest()[:12]
    assert listed[0]["id"] == minted["id"]
    assert listed[-1] == {
        "object": "api_key",
        "id": config_id,
        "tenant": "cfg-a",
        "name": None,
        "prefix": None,
        "source": "config",
        "created_at": None,
        "expires_at": None,
        "last_used_at": None,
        "revoked_at": None,
        "previous_secret_expires_at": None,
        "limits": dict.fromkeys(LIMITS),  # contract §15: a config key has its tenant's limits only
        "scopes": ["create", "read", "delete"],
        "allowed_cidrs": None,
    }
    shown = api.get(f"/keys/{config_id}").json()
    assert shown.pop("usage")["tasks_today"] == 0 and shown == listed[-1]
    error_of(api.patch(f"/keys/{config_id}", json={"name": "x"}), 409, "key_managed_by_config", "key_id")
    error_of(api.post(f"/keys/{config_id}/rotate"), 409, "key_managed_by_config", "key_id")
    error_of(api.delete(f"/keys/{config_id}"), 409, "key_managed_by_config", "key_id")


def test_key_errors_carry_their_param(api: httpx.Client) -> None:
    tenant = make_tenant(api)["id"]
    key = mint(api, tenant)["id"]
    for method, path in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/rotate")]:
        json_body = {} if method in ("PATCH", "POST") else None
        error_of(
            api.request(method, f"/keys/key_0123456789abcdef01234567{path}", json=json_body),
            404,
            "key_not_found",
            "key_id",
        )
    base = f"/tenants/{tenant}/keys"
    error_of(api.post(base, json={}), 400, "missing_required_parameter", "name")
    error_of(api.post(base, json={"name": ""}), 400, "invalid_value", "name")
    error_of(api.post(base, json={"name": "x", "expires_in_seconds": -5}), 400, "invalid_value", "expires_in_seconds")
    error_of(api.post(base, json={"name": "x", "expires_in_seconds": 0}), 400, "invalid_value", "expires_in_seconds")
    error_of(api.post(base, json={"name": "x", "expires_at": 1000}), 400, "invalid_value", "expires_at")
    both = {"name": "x", "expires_at": int(time.time()) + 60, "expires_in_seconds": 60}
    error_of(api.post(base, json=both), 400, "invalid_value", "expires_in_seconds")
    error_of(api.post(base, json={"name": "x", "scope": "all"}), 400, "unknown_parameter", "scope")
    error_of(api.patch(f"/keys/{key}", json={"expires_at": "soon"}), 400, "invalid_value", "expires_at")
    error_of(api.patch(f"/keys/{key}", json={"tenant": "other"}), 400, "unknown_parameter", "tenant")
    error_of(api.post(f"/keys/{key}/rotate", json={"grace_seconds": -1}), 400, "invalid_value", "grace_seconds")
    assert [k["id"] for k in api.get(base).json()["data"]] == [key]


# --- audit trail -------------------------------------------------------------------------


def test_every_change_is_in_the_audit_trail_newest_first(api: httpx.Client) -> None:
    resp = api.post(
        "/tenants", json={"id": new_id(), "limits": {"max_active_tasks": 2}}, headers={"X-Request-Id": "req-audit-1"}
    )
    tenant = resp.json()["id"]
    api.patch(f"/tenants/{tenant}", json={"limits": {"max_active_tasks": None}})
    api.post(f"/tenants/{tenant}/webhook-secret", json={"grace_seconds": 0})
    key = mint(api, tenant, expires_in_seconds=60)["id"]
    api.patch(f"/keys/{key}", json={"name": "renamed"})
    api.post(f"/keys/{key}/rotate", json={"grace_seconds": 30})
    api.delete(f"/keys/{key}")
    entries = audit_of(api, tenant)
    assert [e["action"] for e in entries] == [
        "key.revoke",
        "key.rotate",
        "key.update",
        "key.create",
        "tenant.webhook_secret.rotate",
        "tenant.update",
        "tenant.create",
    ]
    for e in entries:
        assert e["object"] == "audit_event" and e["id"].startswith("aud_")
        assert e["actor"] == ADMIN_ACTOR and e["ip"] == "127.0.0.1" and e["request_id"]
        assert e["target"]["tenant"] == tenant and abs(e["time"] - time.time()) < 60
    assert all(e["target"]["key_id"] == key for e in entries[:4])
    assert entries[-1]["request_id"] == "req-audit-1"
    assert entries[-1]["changes"]["limits"]["max_active_tasks"] == 2
    assert entries[-2]["changes"] == {"limits": {"max_active_tasks": None}}
    assert entries[3]["changes"]["name"] == "svc" and entries[2]["changes"] == {"name": "renamed"}

    only = audit_of(api, tenant, action="key.rotate")
    assert [e["id"] for e in only] == [entries[1]["id"]]
    first_two = api.get("/audit", params={"tenant": tenant, "limit": 2}).json()
    assert [e["id"] for e in first_two["data"]] == [e["id"] for e in entries[:2]] and first_two["has_more"]
    after = api.get("/audit", params={"tenant": tenant, "after": entries[1]["id"], "limit": 2}).json()
    assert [e["id"] for e in after["data"]] == [e["id"] for e in entries[2:4]]


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "ten", "1.5"])
def test_list_limits_outside_1_to_1000_are_400(api: httpx.Client, limit: str) -> None:
    for path in ("/tenants", "/audit", "/tenants/cfg-a/keys"):
        error_of(api.get(path, params={"limit": limit}), 400, "invalid_value", "limit")


def test_an_unknown_audit_action_is_400(api: httpx.Client) -> None:
    error_of(api.get("/audit", params={"action": "key.explode"}), 400, "invalid_value", "action")
    assert api.get("/audit", params={"limit": 1000}).status_code == 200


# --- secrets -----------------------------------------------------------------------------


def test_no_secret_or_hash_in_any_list_audit_entry_or_log_line(admin_gw: GatewayProcess, api: httpx.Client) -> None:
    created = make_tenant(api)
    tenant = created["id"]
    minted = mint(api, tenant)
    rotated = api.post(f"/keys/{minted['id']}/rotate").json()
    rotated_hook = api.post(f"/tenants/{tenant}/webhook-secret").json()
    config_minted = mint(api, "cfg-a")
    secrets_shown = [
        created["webhook_secret"],
        rotated_hook["webhook_secret"],
        minted["secret"],
        rotated["secret"],
        config_minted["secret"],
        admin_gw.tenants["cfg-a"].key,
        ADMIN_KEY,
    ]
    forbidden = set(secrets_shown)
    for s in secrets_shown:
        digest = hashlib.sha256(s.encode()).hexdigest()
        forbidden |= {digest, digest[:16], digest[-16:]}
    texts = [
        api.get("/tenants", params={"limit": 1000}).text,
        api.get(f"/tenants/{tenant}").text,
        api.get(f"/tenants/{tenant}/keys").text,
        api.get("/tenants/cfg-a/keys").text,
        api.get(f"/keys/{minted['id']}").text,
        api.get("/audit", params={"limit": 1000}).text,
    ]
    wait_until(lambda: minted["id"] in admin_gw.log_text() or "/admin/v1/keys" in admin_gw.log_text(), message="log")
    texts.append(admin_gw.log_text())
    for text in texts:
        for value in forbidden:
            assert value not in text


def test_the_usage_route_still_answers_for_config_and_api_tenants(admin_gw: GatewayProcess, api: httpx.Client) -> None:
    assert admin_gw.usage("cfg-a")["active"] == 0
    tenant = make_tenant(api)["id"]
    assert admin_gw.usage(tenant) == {
        "active": 0,
        "tasks_today": 0,
        "credits_today": 0,
        "credits_this_month": 0,
        "tasks_this_month": 0,
    }


def test_a_minted_key_works_on_the_tenant_api_until_rotated_out_or_revoked(
    admin_gw: GatewayProcess, api: httpx.Client
) -> None:
    tenant = make_tenant(api, limits={"max_active_tasks": 5})["id"]
    key = mint(api, tenant)
    headers = {"Authorization": f"Bearer {key['secret']}"}

    def created() -> httpx.Response | None:
        resp = httpx.post(admin_gw.url + "/runway/tasks", json=gen2_body(), headers=headers, timeout=10)
        return resp if resp.status_code == 200 else None

    resp = wait_until(created, timeout=5, message="the minted key to authenticate")
    task_id = resp.json()["task"]["id"]
    request_id = resp.headers["x-request-id"]
    line = wait_until(
        lambda: [x for x in admin_gw.access_log() if x.get("request_id") == request_id], message="the access line"
    )
    assert (line[0]["tenant"], line[0]["key_id"], line[0]["task_id"]) == (tenant, key["id"], task_id)
    assert api.get(f"/tenants/{tenant}").json()["usage"]["tasks_today"] == 1

    def status(secret: str) -> int:
        auth = {"Authorization": f"Bearer {secret}"}
        return httpx.get(admin_gw.url + "/v1/models", headers=auth, timeout=5).status_code

    rotated = api.post(f"/keys/{key['id']}/rotate", json={"grace_seconds": 0}).json()["secret"]
    wait_until(lambda: status(rotated) == 200 and status(key["secret"]) == 401, 5, message="the rotation")
    api.delete(f"/keys/{key['id']}")
    wait_until(lambda: status(rotated) == 401, timeout=5, message="the revoked key to be refused")


@pytest.mark.parametrize("workers", [2])
def test_simultaneous_revocations_write_one_entry(tmp_path: Path, redis_store_url: str, workers: int) -> None:
    """20 DELETEs of one key at once, over real connections to two workers on one Redis:
    one revoked_at for all of them and one audit entry (the store revokes in one step; a
    route reading the key then writing let several see it unrevoked)."""
    sim = Simulator(tmp_path)
    sim.start()
    gw = GatewayProcess(tmp_path, sim.url, [], store_url=redis_store_url, workers=2)
    gw.start()
    try:
        with httpx.Client(base_url=gw.url + V1, headers=ADMIN, timeout=10) as api:
            tenant = make_tenant(api)["id"]
            key_id = mint(api, tenant)["id"]

            async def race() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=gw.url + V1, headers=ADMIN, timeout=10) as c:
                    return list(await asyncio.gather(*(c.delete(f"/keys/{key_id}") for _ in range(20))))

            answers = asyncio.run(race())
            assert {r.status_code for r in answers} == {200}
            assert len({r.json()["revoked_at"] for r in answers}) == 1
            assert len(audit_of(api, tenant, action="key.revoke")) == 1
    finally:
        gw.stop()
        sim.stop()


@pytest.mark.parametrize("entry", ["0.0.0.0/0", "::/0", "0.0.0.0/7", "::/6"])
def test_a_catch_all_hook_host_is_refused_on_update(api: httpx.Client, entry: str) -> None:
    """A catch-all would let the tenant's webhooks reach anything the gateway can: refused
    with its param, the policy as it was."""
    tenant = make_tenant(api, policy={"hook_hosts": ["10.0.0.0/8"]})["id"]
    resp = api.patch(f"/tenants/{tenant}", json={"policy": {"hook_hosts": [entry]}})
    error_of(resp, 400, "invalid_value", "policy.hook_hosts")
    assert "catch-all" in resp.json()["error"]["message"]
    assert api.get(f"/tenants/{tenant}").json()["policy"]["hook_hosts"] == ["10.0.0.0/8"]


@pytest.mark.parametrize("name", ["svc\u202e", "\u200d", "a\u2028b", "\u2067x"])
def test_a_key_name_is_refused_like_a_tenant_name(api: httpx.Client, name: str) -> None:
    tenant = make_tenant(api)["id"]
    error_of(api.post(f"/tenants/{tenant}/keys", json={"name": name}), 400, "invalid_value", "name")
    key = mint(api, tenant, "zero\u200dwidth inside is fine")
    error_of(api.patch(f"/keys/{key['id']}", json={"name": name}), 400, "invalid_value", "name")
    assert [k["name"] for k in api.get(f"/tenants/{tenant}/keys").json()["data"]] == ["zero\u200dwidth inside is fine"]


def test_answers_carrying_a_secret_are_not_stored_by_caches(api: httpx.Client) -> None:
    created = api.post("/tenants", json={"id": new_id()})
    tenant = created.json()["id"]
    minted = api.post(f"/tenants/{tenant}/keys", json={"name": "svc"})
    key_id = minted.json()["id"]
    with_secret = [
        created,
        api.post(f"/tenants/{tenant}/webhook-secret", json={}),
        minted,
        api.post(f"/keys/{key_id}/rotate", json={}),
    ]
    assert [r.status_code for r in with_secret] == [201, 200, 201, 200]
    assert [r.headers.get("cache-control") for r in with_secret] == ["no-store"] * 4
    assert "cache-control" not in api.get(f"/keys/{key_id}").headers


def test_overlapping_rotations_keep_the_first_secrets_grace(admin_gw: GatewayProcess, api: httpx.Client) -> None:
    """A rotation with a day's grace, then one with none: the first secret keeps its day
    (a second rotation used to drop it), the second stops at once; revoking ends both."""
    tenant = make_tenant(api)["id"]
    key = mint(api, tenant)

    def status(secret: str) -> int:
        auth = {"Authorization": f"Bearer {secret}"}
        return httpx.get(admin_gw.url + "/v1/models", headers=auth, timeout=5).status_code

    second = api.post(f"/keys/{key['id']}/rotate", json={"grace_seconds": 86400}).json()["secret"]
    third = api.post(f"/keys/{key['id']}/rotate", json={"grace_seconds": 0}).json()
    wait_until(lambda: status(third["secret"]) == 200, 5, message="the third secret")
    assert (status(key["secret"]), status(second), status(third["secret"])) == (200, 401, 200)
    assert abs(third["previous_secret_expires_at"] - (time.time() + 86400)) < 60  # when the first one stops
    api.delete(f"/keys/{key['id']}")
    wait_until(lambda: status(third["secret"]) == 401, 5, message="the revocation")
    assert status(key["secret"]) == 401


def test_a_key_minted_here_works_here_at_once(admin_gw: GatewayProcess, api: httpx.Client) -> None:
    """The replica that made a change applies it before answering: a key used right after
    its mint is never refused (the background refresh alone left up to 250 ms of 401s),
    and a revoked one never accepted."""
    tenant = make_tenant(api)["id"]
    with httpx.Client(base_url=admin_gw.url, timeout=5) as tenant_api:
        answers = []
        for _ in range(20):
            key = mint(api, tenant)
            answers.append(tenant_api.get("/v1/models", headers={"Authorization": f"Bearer {key['secret']}"}))
        assert [r.status_code for r in answers] == [200] * 20
        api.delete(f"/keys/{key['id']}")
        assert tenant_api.get("/v1/models", headers={"Authorization": f"Bearer {key['secret']}"}).status_code == 401
        other = make_tenant(api, enabled=False)["id"]
        off = mint(api, other)
        assert tenant_api.get("/v1/models", headers={"Authorization": f"Bearer {off['secret']}"}).status_code == 403
        api.patch(f"/tenants/{other}", json={"enabled": True})
        assert tenant_api.get("/v1/models", headers={"Authorization": f"Bearer {off['secret']}"}).status_code == 200


def test_a_config_keys_last_use_is_tracked(tmp_path: Path) -> None:
    """A config key's last use is noted like a store key's (batched, no write per request):
    after a use and a flush, the admin API shows it, not "never" forever."""
    sim = Simulator(tmp_path)
    sim.start()
    spec = TenantSpec("cfg-used")
    gw = GatewayProcess(tmp_path, sim.url, [spec], env={"GATEWAY_LAST_USED_FLUSH_SECONDS": "0.3"})
    gw.start()
    try:
        with httpx.Client(base_url=gw.url + V1, headers=ADMIN, timeout=10) as api:
            (before,) = api.get("/tenants/cfg-used/keys").json()["data"]
            assert before["source"] == "config" and before["last_used_at"] is None
            used_at = time.time()
            with gw.client("cfg-used") as c:
                assert c.get("/v1/models").status_code == 200

            def shown() -> int | None:
                (key,) = api.get("/tenants/cfg-used/keys").json()["data"]
                return key["last_used_at"]  # type: ignore[no-any-return]

            last = wait_until(shown, 10, 0.1, "the config key's last_used_at")
            assert used_at - 1 <= last <= time.time() + 1
            assert api.get(f"/keys/{before['id']}").json()["last_used_at"] == last
    finally:
        gw.stop()
        sim.stop()
