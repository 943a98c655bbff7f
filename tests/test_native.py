"""The native relay routes (`/runway/tasks`) through a real gateway and simulator."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import UPSTREAM_KEY, GatewayProcess, Simulator, TenantSpec, gen2_body, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import parse_config
from gateway.routes.hooks import MAX_CALLBACK_BYTES
from gateway.tokens import TokenSigner


def create(gw: GatewayProcess, tenant: str, body: Any = None, **kw: Any) -> httpx.Response:
    with gw.client(tenant) as c:
        return c.post("/runway/tasks", json=gen2_body() if body is None else body, **kw)


def sim_create_for(sim: Simulator, task_id: str) -> dict[str, Any]:
    return next(c for c in sim.requests()["creates"] if c["task_id"] == task_id)


def assert_error(resp: httpx.Response, status: int, code: str, param: Any = "__any__") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    if param != "__any__":
        assert err["param"] == param, err
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers.get("x-request-id")
    return err


# --- the rewrite -----------------------------------------------------------------------


def test_upstream_receives_relay_body_upstream_key_and_gateway_hook(gw: GatewayProcess, sim: Simulator) -> None:
    tenant = gw.tenants["team-a"]
    body = gen2_body(
        "a lighthouse at dusk", seed=1919715046, image_prompt="https://cdn.example.com/a.jpeg", init_image=""
    )
    body["notify_hook"] = "http://127.0.0.1:9/tenant-hook"
    resp = create(gw, "team-a", body)
    assert resp.status_code == 200, resp.text
    task = resp.json()["task"]
    assert task["status"] == "PENDING" and task["taskType"] == "gen2"

    sent = sim_create_for(sim, task["id"])
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert tenant.key not in str(sent)
    upstream_body = sent["body"]
    assert upstream_body["taskType"] == "gen2" and upstream_body["internal"] is False
    assert upstream_body["notify_hook"].startswith(gw.url + "/hooks/runway/")
    assert "tenant-hook" not in str(upstream_body)
    gen2 = upstream_body["options"]["gen2Options"]
    assert gen2["seed"] == 1919715046 and gen2["text_prompt"] == "a lighthouse at dusk"
    assert gen2["image_prompt"] == "https://cdn.example.com/a.jpeg"
    assert "init_image" not in gen2  # an empty URL is dropped, never sent
    assert upstream_body["options"]["assetGroupName"] == "Generative Video"
    assert sent["headers"]["x-request-id"] == resp.headers["x-request-id"]


def test_missing_seed_and_name_are_filled_and_policy_applies(gw: GatewayProcess, sim: Simulator) -> None:
    body = {"taskType": "gen2", "options": {"gen2Options": {"text_prompt": "policy check", "watermark": False}}}
    resp = create(gw, "team-policy", body)
    assert resp.status_code == 200, resp.text
    sent = sim_create_for(sim, resp.json()["task"]["id"])["body"]
    gen2 = sent["options"]["gen2Options"]
    assert 0 <= gen2["seed"] <= 4294967295
    assert sent["options"]["name"] == f"Gen-2 {gen2['seed']}"
    assert gen2["watermark"] is True  # forced over the tenant's false
    assert gen2["motion_score"] == 7  # default filled
    assert "notify_hook" in sent


def test_task_reaches_succeeded_through_callbacks_and_lists(gw: GatewayProcess) -> None:
    resp = create(gw, "team-a", gen2_body("callback journey"))
    task_id = resp.json()["task"]["id"]
    with gw.client("team-a") as c:
        done = wait_until(
            lambda: (t := c.get(f"/runway/tasks/{task_id}").json()["task"])["status"] == "SUCCEEDED" and t, 15
        )
        assert done["artifacts"] and done["artifacts"][0]["url"].endswith(".mp4")
        listed = c.get("/runway/tasks", params={"limit": 100}).json()
        assert task_id in [t["id"] for t in listed["data"]]
        assert listed["last_id"] == listed["data"][-1]["id"]
        only_done = c.get("/runway/tasks", params={"status": "SUCCEEDED", "limit": 100}).json()["data"]
        assert all(t["status"] == "SUCCEEDED" for t in only_done) and task_id in [t["id"] for t in only_done]


def test_list_pagination_newest_first(gw: GatewayProcess) -> None:
    ids = [create(gw, "team-b", gen2_body(f"page {i}")).json()["task"]["id"] for i in range(3)]
    with gw.client("team-b") as c:
        first = c.get("/runway/tasks", params={"limit": 2}).json()
        assert [t["id"] for t in first["data"]] == ids[::-1][:2] and first["has_more"] is True
        second = c.get("/runway/tasks", params={"limit": 2, "after": first["last_id"]}).json()
        assert second["data"][0]["id"] == ids[0]
        assert_error(c.get("/runway/tasks", params={"limit": 0}), 400, "invalid_value", "limit")


def test_another_tenants_task_is_not_found_exactly_like_a_missing_one(gw: GatewayProcess) -> None:
    task_id = create(gw, "team-a").json()["task"]["id"]
    with gw.client("team-b") as c:
        other = c.get(f"/runway/tasks/{task_id}")
        missing = c.get("/runway/tasks/00000000-0000-0000-0000-000000000000")
        listed = c.get("/runway/tasks", params={"limit": 100}).json()["data"]
    assert_error(other, 404, "task_not_found")
    assert other.json() == missing.json()
    assert task_id not in [t["id"] for t in listed]


# --- authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer sk-gw-not-a-real-key"},
    ],
    ids=["no-header", "wrong-scheme", "empty-bearer", "unknown-key"],
)
def test_bad_credentials_are_401(gw: GatewayProcess, headers: dict[str, str]) -> None:
    resp = httpx.post(gw.url + "/runway/tasks", json=gen2_body(), headers=headers)
    assert_error(resp, 401, "invalid_api_key")
    assert "x-ratelimit-limit-requests" not in resp.headers


def test_disabled_tenant_is_403(gw: GatewayProcess) -> None:
    with gw.client("team-off") as c:
        assert_error(c.get("/runway/tasks"), 403, "tenant_disabled")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwt_gateway(tmp_path_factory: pytest.TempPathFactory, sim: Simulator, rsa_key: rsa.RSAPrivateKey):
    tmp = tmp_path_factory.mktemp("jwt")
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp / "idp.pem").write_bytes(pem)
    extra = (
        '[auth.jwt]\nalgorithms = ["RS256"]\npublic_key_file = "idp.pem"\nissuer = "https://idp.test"\n'
        'audience = "runway-gateway"\ntenant_claim = "tenant"\nleeway_seconds = 0\n'
    )
    g = GatewayProcess(tmp, sim.url, [TenantSpec("jwt-team"), TenantSpec("jwt-off", enabled=False)], extra_toml=extra)
    g.start()
    yield g, pem
    g.stop()


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": "https://idp.test",
        "aud": "runway-gateway",
        "tenant": "jwt-team",
        "exp": now + 300,
        "iat": now,
        **over,
    }


def _hs256_signed_with(key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token whose secret is `key` (the IdP's public key: algorithm confusion);
    PyJWT refuses to build it itself."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    return signing + "." + b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())


def _get_with(g: GatewayProcess, token: str) -> httpx.Response:
    return httpx.get(g.url + "/runway/tasks", headers={"Authorization": f"Bearer {token}"})


def _auth_failures(g: GatewayProcess) -> dict[str, float]:
    """gateway_auth_failures_total by reason, as /metrics shows it."""
    text = httpx.get(g.url + "/metrics").text
    return {
        reason: float(value)
        for reason, value in re.findall(r'^gateway_auth_failures_total\{reason="([^"]*)"\} (\S+)$', text, re.M)
    }


def test_valid_jwt_authenticates(jwt_gateway, rsa_key) -> None:
    g, _ = jwt_gateway
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256")
    resp = _get_with(g, token)
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"] == []


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "wrong-aud",
        "wrong-iss",
        "alg-none",
        "hs256-with-public-key",
        "unknown-tenant",
        "not-yet-valid",
        "garbage",
    ],
)
def test_bad_jwts_are_401(jwt_gateway, rsa_key, case: str) -> None:
    g, pem = jwt_gateway
    now = int(time.time())
    if case == "expired":
        token = jwt.encode(_claims(exp=now - 10), rsa_key, algorithm="RS256")
    elif case == "wrong-aud":
        token = jwt.encode(_claims(aud="someone-else"), rsa_key, algorithm="RS256")
    elif case == "wrong-iss":
        token = jwt.encode(_claims(iss="https://evil.test"), rsa_key, algorithm="RS256")
    elif case == "alg-none":
        token = jwt.encode(_claims(), None, algorithm="none")
    elif case == "hs256-with-public-key":
        token = _hs256_signed_with(pem, _claims())
    elif case == "unknown-tenant":
        token = jwt.encode(_claims(tenant="nobody"), rsa_key, algorithm="RS256")
    elif case == "not-yet-valid":
        token = jwt.encode(_claims(nbf=now + 600), rsa_key, algorithm="RS256")
    else:
        token = "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln"
    resp = _get_with(g, token)
    err = assert_error(resp, 401, "invalid_api_key")
    assert token not in resp.text and token[:20] not in err["message"]


@pytest.mark.parametrize("alg", ["RS384", "none", "HS256"])
def test_jwt_with_an_algorithm_not_configured_is_refused_for_that_reason(jwt_gateway, rsa_key, alg: str) -> None:
    """Only RS256 is configured: a token valid in every other way is refused, and operators
    see why (the failure metric names the algorithm, not a generic invalid token)."""
    g, pem = jwt_gateway
    if alg == "HS256":
        token = _hs256_signed_with(pem, _claims())
    else:
        token = jwt.encode(_claims(), None if alg == "none" else rsa_key, algorithm=alg)
    before = _auth_failures(g)
    err = assert_error(_get_with(g, token), 401, "invalid_api_key")
    after = _auth_failures(g)
    assert "algorithm" in err["message"]
    assert {reason: n - before.get(reason, 0) for reason, n in after.items() if n != before.get(reason, 0)} == {
        "jwt_algorithm": 1
    }


def test_disabled_tenant_is_403_with_a_jwt_too(jwt_gateway, rsa_key) -> None:
    g, _ = jwt_gateway
    token = jwt.encode(_claims(tenant="jwt-off"), rsa_key, algorithm="RS256")
    assert_error(_get_with(g, token), 403, "tenant_disabled")


# --- bad input -------------------------------------------------------------------------


def _bad_bodies() -> list[tuple[str, Any, str, str | None]]:
    def with_gen2(**gen2: Any) -> dict[str, Any]:
        body = gen2_body()
        body["options"]["gen2Options"].update(gen2)
        return body

    def with_options(**opts: Any) -> dict[str, Any]:
        body = gen2_body()
        body["options"].update(opts)
        return body

    return [
        ("non-object", [1, 2], "invalid_body", None),
        ("unknown-task-type", {**gen2_body(), "taskType": "gen3"}, "unsupported_task_type", "taskType"),
        ("missing-task-type", {"options": gen2_body()["options"]}, "missing_required_parameter", "taskType"),
        ("missing-options", {"taskType": "gen2"}, "missing_required_parameter", "options"),
        (
            "missing-gen2options",
            {"taskType": "gen2", "options": {"name": "x"}},
            "missing_required_parameter",
            "options.gen2Options",
        ),
        ("seed-string", with_gen2(seed="42"), "invalid_type", "options.gen2Options.seed"),
        ("seed-bool", with_gen2(seed=True), "invalid_type", "options.gen2Options.seed"),
        ("seed-negative", with_gen2(seed=-1), "invalid_value", "options.gen2Options.seed"),
        ("seed-too-big", with_gen2(seed=4294967296), "invalid_value", "options.gen2Options.seed"),
        ("upscale-string", with_gen2(upscale="yes"), "invalid_type", "options.gen2Options.upscale"),
        ("options-not-object", {"taskType": "gen2", "options": "x"}, "invalid_type", "options"),
        (
            "http-image",
            with_gen2(image_prompt="http://cdn.example.com/a.jpg"),
            "invalid_url",
            "options.gen2Options.image_prompt",
        ),
        ("file-image", with_gen2(init_image="file:///etc/passwd"), "invalid_url", "options.gen2Options.init_image"),
        (
            "image-port-too-big",
            with_gen2(init_image="https://x.example:99999/a.png"),
            "invalid_url",
            "options.gen2Options.init_image",
        ),
        (
            "image-port-zero",
            with_gen2(image_prompt="https://x.example:0/a.png"),
            "invalid_url",
            "options.gen2Options.image_prompt",
        ),
        (
            "image-port-not-a-number",
            with_gen2(init_image="https://x.example:https/a.png"),
            "invalid_url",
            "options.gen2Options.init_image",
        ),
        (
            "image-control-characters",  # found by the fuzzer: the relay refused it, the tenant got a 502
            with_gen2(image_prompt="https://\u00f7)\u00a0\u001e\u00e2"),
            "invalid_url",
            "options.gen2Options.image_prompt",
        ),
        (
            "image-space",
            with_gen2(init_image="https://cdn.example/a b.png"),
            "invalid_url",
            "options.gen2Options.init_image",
        ),
        (
            "image-bad-host",
            with_gen2(image_prompt="https://\u00f7).example/a.png"),
            "invalid_url",
            "options.gen2Options.image_prompt",
        ),
        ("prompt-too-long", with_gen2(text_prompt="x" * 2001), "prompt_too_long", "options.gen2Options.text_prompt"),
        ("unknown-field", with_gen2(turbo=True), "unknown_parameter", "options.gen2Options.turbo"),
        ("seconds-12", with_options(seconds=12), "invalid_value", "options.seconds"),
        (
            "hook-loopback-not-listed",
            {**gen2_body(), "notify_hook": "http://[::1]/hook"},
            "invalid_notify_hook",
            "notify_hook",
        ),
        ("hook-file", {**gen2_body(), "notify_hook": "file:///etc/passwd"}, "invalid_notify_hook", "notify_hook"),
    ]


@pytest.mark.parametrize("name,body,code,param", _bad_bodies(), ids=[b[0] for b in _bad_bodies()])
def test_bad_bodies_are_400_and_never_reach_upstream(
    gw: GatewayProcess, sim: Simulator, name: str, body: Any, code: str, param: str | None
) -> None:
    before = sim.requests()["creates_total"]
    with gw.client("team-b") as c:
        ids_before = [t["id"] for t in c.get("/runway/tasks", params={"limit": 100}).json()["data"]]
        assert_error(c.post("/runway/tasks", json=body), 400, code, param)
        ids_after = [t["id"] for t in c.get("/runway/tasks", params={"limit": 100}).json()["data"]]
    assert sim.requests()["creates_total"] == before
    # Ids only: tasks of earlier tests may still be moving through their lifecycle.
    assert ids_after == ids_before


def test_invalid_json_is_400(gw: GatewayProcess, sim: Simulator) -> None:
    before = sim.requests()["creates_total"]
    with gw.client("team-b") as c:
        assert_error(
            c.post("/runway/tasks", content=b'{"taskType": "gen2",', headers={"content-type": "application/json"}),
            400,
            "invalid_json",
        )
    assert sim.requests()["creates_total"] == before


def test_body_over_limit_is_413(gw: GatewayProcess, sim: Simulator) -> None:
    before = sim.requests()["creates_total"]
    big = gen2_body("x" * 70_000)
    with gw.client("team-b") as c:
        assert_error(c.post("/runway/tasks", json=big), 413, "request_too_large")

        def chunks():
            yield b'{"taskType": "gen2", "pad": "'
            for _ in range(20):
                yield b"y" * 4096
            yield b'"}'

        assert_error(
            c.post("/runway/tasks", content=chunks(), headers={"content-type": "application/json"}),
            413,
            "request_too_large",
        )
    assert sim.requests()["creates_total"] == before


def _raw_exchange(gw: GatewayProcess, data: bytes) -> bytes:
    """Send bytes as they are and read the answer until the server closes."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",  # a TLS hello on the plain port
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon in this header\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["tls-hello", "bad-header", "not-http"],
)
def test_protocol_garbage_gets_uvicorns_plain_text_400(gw: GatewayProcess, garbage: bytes) -> None:
    """Bytes that are not HTTP never reach the app, so the answer is the server's own:
    a plain-text 400 and a closed connection (documented in README.md), not OpenAI JSON."""
    answer = _raw_exchange(gw, garbage)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"content-type: text/plain" in head.lower()
    assert body == b"Invalid HTTP request received."
    assert httpx.get(gw.url + "/healthz").status_code == 200  # and the server carries on


def test_unknown_route_and_method_are_openai_errors(gw: GatewayProcess) -> None:
    assert_error(httpx.get(gw.url + "/nope"), 404, "not_found")
    refused = httpx.delete(gw.url + "/runway/tasks")
    assert assert_error(refused, 405, "method_not_allowed")["type"] == "invalid_request_error"
    # RFC 9110: a 405 names every method of the path, here served by two routes
    assert refused.headers["allow"] == "GET, HEAD, POST"
    assert httpx.request("TRACE", gw.url + "/admin/v1/keys/key_x/rotate").headers["allow"] == "POST"


# --- upstream failures -----------------------------------------------------------------


@pytest.fixture
def failing(own_sim: Simulator, start_gateway) -> tuple[GatewayProcess, Simulator]:
    return start_gateway(own_sim.url, [TenantSpec("t", limits={"tasks_per_day": 100})]), own_sim


def test_upstream_500_is_502_without_raw_body(failing) -> None:
    g, s = failing
    s.control(create_status=500)
    err = assert_error(create(g, "t"), 502, "upstream_error")
    assert "500" in err["message"] and UPSTREAM_KEY not in err["message"]


def test_upstream_garbage_is_502_without_html(failing) -> None:
    g, s = failing
    s.control(garbage=True)
    err = assert_error(create(g, "t"), 502, "upstream_error")
    assert "<html" not in err["message"].lower() and "nginx" not in err["message"]


def test_upstream_slow_is_504(failing) -> None:
    g, s = failing
    s.control(latency_seconds=5)
    start = time.monotonic()
    assert_error(create(g, "t"), 504, "upstream_timeout")
    assert time.monotonic() - start < 4.9  # the 3 s timeout, not the 5 s upstream


@pytest.mark.parametrize("sent,answered", [(7, "7"), (0, "5")], ids=["upstream-retry-after", "default-retry-after"])
def test_upstream_429_is_503_rate_limited_with_retry_after_and_refunded(failing, sent: int, answered: str) -> None:
    g, s = failing
    s.control(create_status=429, retry_after=sent)  # 0: the upstream sends no retry-after
    resp = create(g, "t")
    err = assert_error(resp, 503, "upstream_rate_limited", None)
    assert resp.headers["retry-after"] == answered and f"{answered} s" in err["message"]
    assert UPSTREAM_KEY not in resp.text
    assert g.usage("t") == {
        "active": 0,
        "tasks_today": 0,
        "credits_today": 0,
        "credits_this_month": 0,
        "tasks_this_month": 0,
    }
    s.control(create_status=0)
    assert create(g, "t").status_code == 200  # the upstream's 429 opened no circuit


# --- secrets never leak ----------------------------------------------------------------


def test_no_secret_or_prompt_in_logs_or_errors(gw: GatewayProcess, jwt_gateway, rsa_key) -> None:
    tenant = gw.tenants["team-a"]
    secret_prompt = "zebra-violet-prompt-8812"
    run = secrets.token_hex(4)
    ids = {name: f"secrets-{run}-{name}" for name in ("ok", "bad-seed", "bad-key", "bad-jwt")}
    bodies = []
    resp = create(gw, "team-a", gen2_body(secret_prompt), headers={"x-request-id": ids["ok"]})
    assert resp.status_code == 200
    bodies.append(
        create(gw, "team-a", gen2_body(secret_prompt, seed=-5), headers={"x-request-id": ids["bad-seed"]}).text
    )
    bodies.append(
        httpx.post(
            gw.url + "/runway/tasks",
            headers={"Authorization": f"Bearer {tenant.key}x", "x-request-id": ids["bad-key"]},
            json=gen2_body(secret_prompt),
        ).text
    )
    g, _ = jwt_gateway
    token = jwt.encode(_claims(exp=int(time.time()) - 5), rsa_key, algorithm="RS256")
    bodies.append(
        httpx.get(
            g.url + "/runway/tasks", headers={"Authorization": f"Bearer {token}", "x-request-id": ids["bad-jwt"]}
        ).text
    )
    # every request's line is written (so its neighbours, e.g. a warning, are too)
    wait_until(lambda: all(i in gw.log_text() + g.log_text() for i in ids.values()), 5, message="the access lines")
    logs = gw.log_text() + g.log_text()
    assert any('"route":"/runway/tasks"' in line for line in logs.splitlines())
    for secret in (tenant.key, UPSTREAM_KEY, secret_prompt, token, tenant.webhook_secret):
        assert secret not in logs
        for body in bodies:
            assert secret not in body


def test_access_log_lines_are_json_with_request_fields(gw: GatewayProcess) -> None:
    resp = create(gw, "team-a", headers={"x-request-id": "trace-abc.123"})
    assert resp.headers["x-request-id"] == "trace-abc.123"
    evil = create(gw, "team-a", headers={"x-request-id": "bad id\twith spaces"})
    assert evil.headers["x-request-id"].startswith("req_")

    def line() -> dict[str, Any] | None:
        return next((line for line in gw.access_log() if line.get("request_id") == "trace-abc.123"), None)

    entry = wait_until(line, 5)
    assert entry["tenant"] == "team-a" and entry["route"] == "/runway/tasks" and entry["status"] == 200
    assert entry["method"] == "POST" and entry["task_id"] == resp.json()["task"]["id"]
    assert entry["duration_ms"] >= entry["upstream_ms"] >= 0 and entry["level"] == "info" and "time" in entry


# --- callbacks -------------------------------------------------------------------------


def test_forged_and_stale_callbacks_change_nothing(gw: GatewayProcess, sim: Simulator) -> None:
    task_id = create(gw, "team-a", gen2_body("stale callbacks")).json()["task"]["id"]
    hook = sim_create_for(sim, task_id)["body"]["notify_hook"]
    with gw.client("team-a") as c:
        wait_until(lambda: c.get(f"/runway/tasks/{task_id}").json()["task"]["status"] == "SUCCEEDED", 15)
        final = c.get(f"/runway/tasks/{task_id}").json()["task"]
        forged_token = hook.rsplit("/", 1)[1][:-4] + "AAAA"
        forged = httpx.post(f"{gw.url}/hooks/runway/{forged_token}", json={"task": {**final, "status": "FAILED"}})
        assert_error(forged, 401, "invalid_callback_token")
        stale = httpx.post(hook, json={"task": {**final, "status": "RUNNING", "artifacts": []}})
        assert stale.status_code == 200 and stale.json()["result"] == "stale"
        again = httpx.post(hook, json={"task": {**final, "status": "FAILED"}})
        assert again.json()["result"] == "stale"
        assert c.get(f"/runway/tasks/{task_id}").json()["task"] == final


def test_a_callback_body_over_max_callback_bytes_is_413_before_its_token_is_read(tmp_path: Path) -> None:
    """server.max_body_bytes may be raised for uploads; a callback, open to anyone until its
    token is checked, stays within MAX_CALLBACK_BYTES however it is sent."""
    config = parse_config(
        {
            "server": {"max_body_bytes": 4 * MAX_CALLBACK_BYTES},
            "upstream": {"base_url": "http://127.0.0.1:9", "api_keys": [UPSTREAM_KEY]},
            "store": {"url": f"sqlite:///{tmp_path / 'gateway.db'}"},
        },
        {},
    )
    big = b'{"task": {"id": "' + b"x" * MAX_CALLBACK_BYTES + b'"}}'
    with TestClient(create_app(config, background=False)) as client:
        assert_error(client.post("/hooks/runway/any-token", content=big), 413, "request_too_large")
        chunked = client.post("/hooks/runway/any-token", content=iter([big[:4096], big[4096:]]))  # no Content-Length
        assert "content-length" not in chunked.request.headers
        assert_error(chunked, 413, "request_too_large")
        # within the limit the token is what decides
        assert_error(client.post("/hooks/runway/any-token", json={"task": {}}), 401, "invalid_callback_token")


def bad_token_count(gw: GatewayProcess) -> float:
    line = next(
        text
        for text in httpx.get(gw.url + "/metrics").text.splitlines()
        if text.startswith('gateway_callbacks_received_total{result="bad_token"}')
    )
    return float(line.rsplit(" ", 1)[1])


def test_callback_token_expires_a_day_after_the_task_timeout(gw: GatewayProcess, sim: Simulator) -> None:
    before = time.time()
    task = create(gw, "team-a", gen2_body("expiring callback token")).json()["task"]
    after = time.time()
    token = sim_create_for(sim, task["id"])["body"]["notify_hook"].rsplit("/", 1)[1]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert before + 3600 + 86400 <= claims["exp"] <= after + 3600 + 86400 + 1  # task_timeout_seconds (default) + a day
    with sqlite3.connect(gw.config_path.with_suffix(".db")) as db:  # the gateway's own signing secret, to sign like it
        secret = db.execute("SELECT value FROM secrets WHERE name = 'signing'").fetchone()[0]

    def hook(expires_at: int) -> str:
        return f"{gw.url}/hooks/runway/{TokenSigner(secret).callback_token('team-a', claims['r'], expires_at)}"

    bad_before = bad_token_count(gw)
    expired = httpx.post(hook(int(time.time()) - 1), json={"task": {**task, "status": "FAILED"}})
    assert_error(expired, 401, "invalid_callback_token")
    wait_until(lambda: bad_token_count(gw) == bad_before + 1, 5)
    with gw.client("team-a") as c:
        final = wait_until(
            lambda: (t := c.get(f"/runway/tasks/{task['id']}").json()["task"])["status"] == "SUCCEEDED" and t, 15
        )
    fresh = httpx.post(hook(int(time.time()) + 60), json={"task": final})  # the same token, unexpired: accepted
    assert fresh.status_code == 200 and fresh.json()["result"] in ("duplicate", "stale"), fresh.text


def test_a_callback_token_cannot_move_another_task(own_sim: Simulator, start_gateway) -> None:
    """A callback URL stands for one task: task A's token with task B's id in the body is
    refused and changes neither task (the relay is slow, so both are still PENDING)."""
    own_sim.control(seconds_to_finish=600)
    g = start_gateway(own_sim.url, [TenantSpec("t")])
    a, b = (create(g, "t", gen2_body(f"task {name}")).json()["task"]["id"] for name in "ab")
    hook_a = sim_create_for(own_sim, a)["body"]["notify_hook"]
    with g.client("t") as c:

        def tasks() -> dict[str, Any]:
            return {i: c.get(f"/runway/tasks/{i}").json()["task"] for i in (a, b)}

        before = tasks()
        forged = httpx.post(hook_a, json={"task": {**before[b], "status": "FAILED"}})
        assert_error(forged, 400, "invalid_callback")
        assert tasks() == before and before[a]["status"] == before[b]["status"] == "PENDING"


# --- command line ----------------------------------------------------------------------
