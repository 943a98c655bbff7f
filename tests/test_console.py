"""The admin console (/admin/) in a real browser: Debian's chromium driven by Playwright
against a real gateway process and the simulator.

Every browser test fails on a JavaScript error or a console error. With
CONSOLE_SCREENSHOTS=<folder> the tests write a 1280x800 screenshot of each page there
(`CONSOLE_SCREENSHOTS=docs/console pytest tests/test_console.py` refreshes the README's).

Needs the §10 routes (usage ledger, webhook deliveries), built on other branches:
test_usage_chart_and_csv_download, test_redeliver_a_dead_webhook.

The Relays page and usage by relay (§14): test_relays_page and test_usage_by_relay use the
live gateway's GET /admin/v1/relays and group_by=relay when it serves them, and canned
§14 answers (tests/relay_stub.py, routed in the browser) while it does not.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from conftest import ADMIN_KEY, GatewayProcess, Simulator, TenantSpec, free_port, gen2_body, wait_until
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    Route,
    expect,
    sync_playwright,
)
from relay_stub import canned_ledger, canned_relays, group, live_answers, usage_report

from gateway.routes.console import CSP

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
V1 = "/admin/v1"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SHOTS = os.environ.get("CONSOLE_SCREENSHOTS")
CONSOLE_FILES = resources.files("gateway").joinpath("console")
expect.set_options(timeout=10_000)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("console")
    sim = Simulator(tmp)
    sim.start()
    g = GatewayProcess(tmp, sim.url, [TenantSpec("cfg-a", limits={"max_active_tasks": 5})])
    # a failed delivery is dead at once: the webhooks page has something to redeliver
    g.config_path.write_text(g.config_path.read_text().replace("[webhooks]\n", "[webhooks]\nmax_attempts = 1\n"))
    g.start()
    yield g
    g.stop()
    sim.stop()


@pytest.fixture(scope="module")
def api(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url + V1, headers=ADMIN, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


FAILED_LOAD = re.compile(r"^Failed to load resource: the server responded with a status of (\d+) ")


class Watched:
    """A browser context whose JavaScript errors, console errors and request URLs are
    recorded; the test fails on any error at its end.

    The one exception: Chromium logs every HTTP error answer as a console error ("Failed
    to load resource"), so a test that provokes an admin API error on purpose names its
    status with `expect_api_error`, and only that line, for an /admin/v1 URL, is allowed.
    """

    def __init__(self, browser: Browser, base: str, viewport: dict[str, int]):
        self.base = base
        self.context: BrowserContext = browser.new_context(viewport=viewport, accept_downloads=True)  # type: ignore[arg-type]
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.allowed: set[int] = set()
        self.context.on("request", lambda r: self.urls.append(r.url))
        self.page = self.new_page()

    def new_page(self) -> Page:
        page = self.context.new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("framenavigated", lambda f: self.urls.append(f.url))
        return page

    def expect_api_error(self, *statuses: int) -> None:
        self.allowed.update(statuses)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        failed = FAILED_LOAD.match(message.text)
        url = message.location.get("url", "")
        if failed and int(failed[1]) in self.allowed and url.startswith(self.base + V1 + "/"):
            return
        self.errors.append(f"console: {message.text} ({url})")

    def sign_in(self, route: str = "#/tenants") -> Page:
        page = self.page
        page.goto(self.base + "/admin/" + route)
        page.get_by_label("Admin key").fill(ADMIN_KEY)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()
        return page


@pytest.fixture
def console(browser: Browser, gw: GatewayProcess) -> Iterator[Watched]:
    watched = Watched(browser, gw.url, DESKTOP)
    yield watched
    watched.context.close()
    assert watched.errors == []
    assert not [u for u in watched.urls if ADMIN_KEY in u]


def fits(page: Page, viewport: dict[str, int] = PHONE) -> None:
    """At `viewport` the page needs no sideways scrolling (wide tables scroll inside
    their own box)."""
    page.set_viewport_size(viewport)  # type: ignore[arg-type]
    page.wait_for_load_state("networkidle")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= viewport["width"], (page.url, width)


def shot(page: Page, name: str) -> None:
    """A screenshot for docs/console when CONSOLE_SCREENSHOTS names a folder."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


# --- helpers -----------------------------------------------------------------------------


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def create(gw: GatewayProcess, key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        gw.url + "/runway/tasks", json={**gen2_body(), **body}, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )


def status_becomes(gw: GatewayProcess, key: str, status: int) -> httpx.Response:
    """Creates with `key` until one answers `status` (a change reaches the gateway's
    directory within a second)."""
    seen: list[httpx.Response] = []

    def check() -> bool:
        seen.append(create(gw, key))
        return seen[-1].status_code == status

    wait_until(check, 5, 0.1, f"a create answered {status}")
    return seen[-1]


def ui_create_tenant(page: Page, tenant: str, **limits: int) -> None:
    page.get_by_role("link", name="Tenants", exact=True).click()
    page.get_by_role("button", name="New tenant").click()
    dialog = page.get_by_role("dialog", name="New tenant")
    dialog.get_by_label("Tenant id").fill(tenant)
    dialog.get_by_label("Display name").fill(f"Team {tenant}")
    for label, value in limits.items():
        dialog.get_by_label(label.replace("_", " ").capitalize(), exact=True).fill(str(value))
    dialog.get_by_label("Webhook hosts").fill("127.0.0.1")
    dialog.get_by_role("button", name="Create tenant").click()
    expect(dialog.get_by_role("status").first).to_have_text(f"Tenant {tenant} created.")
    expect(dialog.locator(".secret-value")).to_have_text(re.compile(r"^whsec_"))
    dialog.get_by_role("button", name="Done").click()
    expect(page.get_by_role("row").filter(has_text=tenant)).to_be_visible()


def ui_edit_limit(page: Page, tenant: str, label: str, value: str) -> None:
    page.get_by_role("link", name="Tenants", exact=True).click()
    page.get_by_role("button", name=f"Edit limits of {tenant}").click()
    dialog = page.get_by_role("dialog", name=f"Limits of {tenant}")
    dialog.get_by_label(label, exact=True).fill(value)
    dialog.get_by_role("button", name="Save limits").click()
    expect(dialog).to_be_hidden()


def ui_mint(page: Page, tenant: str, name: str) -> str:
    page.goto(page.url.split("#")[0] + f"#/keys/{tenant}")
    expect(page.get_by_label("Tenant", exact=True)).to_have_value(tenant)
    page.get_by_label("Key name").fill(name)
    page.get_by_role("button", name="Mint key").click()
    panel = page.get_by_role("region", name=f"Secret of {name}")
    expect(panel).to_be_visible()
    secret: str = panel.locator(".secret-value").inner_text()
    assert secret.startswith("sk-gw-") and len(secret) == 49
    expect(page.get_by_role("row").filter(has_text=name)).to_contain_text(secret[:10])
    return secret


def ui_rotate(page: Page, name: str, grace: str) -> str:
    page.get_by_role("button", name=f"Rotate key {name}").click()
    dialog = page.get_by_role("dialog", name=f"Rotate {name}")
    dialog.get_by_label("Old secret keeps working for").select_option(label=grace)
    dialog.get_by_role("button", name="Rotate key").click()
    panel = page.get_by_role("region", name=f"New secret of {name}")
    expect(panel).to_be_visible()
    secret: str = panel.locator(".secret-value").inner_text()
    return secret


def ui_revoke(page: Page, name: str) -> None:
    page.get_by_role("button", name=f"Revoke key {name}").click()
    dialog = page.get_by_role("dialog", name=f"Revoke {name}?")
    expect(dialog).to_contain_text("cannot be undone")
    dialog.get_by_role("button", name="Revoke key").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("row").filter(has_text=name)).to_contain_text("Revoked")


# --- serving -----------------------------------------------------------------------------


def test_the_console_is_served_from_the_package_with_csp_and_etags(gw: GatewayProcess) -> None:
    redirect = httpx.get(gw.url + "/admin", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "/admin/"
    files = {f.name: f.read_bytes() for f in CONSOLE_FILES.iterdir() if f.is_file()}
    assert {"index.html", "main.js", "api.js", "console.css"} <= set(files)
    for name, body in files.items():
        url = gw.url + ("/admin/" if name == "index.html" else f"/admin/assets/{name}")
        resp = httpx.get(url)
        assert resp.status_code == 200 and resp.content == body, name
        assert resp.headers["content-security-policy"] == CSP
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer"
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assert resp.headers["etag"] == etag
        again = httpx.get(url, headers={"if-none-match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert httpx.get(url, headers={"if-none-match": '"stale"'}).status_code == 200
        assert httpx.get(url, headers={"if-none-match": f'"stale", W/{etag}'}).status_code == 304
        head = httpx.head(url)
        assert head.status_code == 200 and head.headers["etag"] == etag and head.content == b""
        # no third-party origin, no inline script or style
        text = body.decode()
        assert set(re.findall(r"https?://[^\s\"'`)]+", text)) <= {"http://www.w3.org/2000/svg"}, name
        assert "innerHTML" not in text and 'setAttribute("style"' not in text and "style=" not in text, name
    assert httpx.get(gw.url + "/admin/").headers["content-type"] == "text/html; charset=utf-8"
    assert httpx.get(gw.url + "/admin/assets/main.js").headers["content-type"] == "text/javascript; charset=utf-8"
    assert re.findall(r"<script\b[^>]*>", files["index.html"].decode()) == [
        '<script type="module" src="assets/main.js">'
    ]
    for missing in ("nope.js", "index.html", "..%2Fapp.py"):
        resp = httpx.get(gw.url + f"/admin/assets/{missing}")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", missing
    # the admin API beside it is untouched
    assert httpx.get(gw.url + V1 + "/tenants").status_code == 401
    assert httpx.get(gw.url + "/admin/tenants/cfg-a/usage", headers=ADMIN).json()["tenant"] == "cfg-a"


# --- sign-in -----------------------------------------------------------------------------


def test_sign_in_refuses_a_wrong_key_then_signs_in_and_out(console: Watched, gw: GatewayProcess) -> None:
    console.expect_api_error(401, 403)
    page = console.page
    page.goto(gw.url + "/admin/")
    shot(page, "sign-in")
    page.get_by_label("Admin key").fill("sk-gw-not-an-admin-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Incorrect admin key provided.")
    page.get_by_label("Admin key").fill(gw.tenants["cfg-a"].key)  # a tenant's key: 403
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("This credential is not an admin's.")
    assert page.evaluate("sessionStorage.length") == 0

    console.sign_in()
    expect(page.get_by_role("heading", name="Tenants")).to_be_visible()
    assert page.evaluate("Object.values(sessionStorage)") == [ADMIN_KEY]
    assert page.evaluate("localStorage.length") == 0
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    expect(page.get_by_label("Admin key")).to_be_visible()


def test_a_401_from_the_api_returns_to_sign_in(console: Watched) -> None:
    console.expect_api_error(401)
    page = console.sign_in()
    page.wait_for_load_state("networkidle")  # every read of the page made with the good key
    page.evaluate("Object.keys(sessionStorage).forEach(k => sessionStorage.setItem(k, 'sk-gw-revoked'))")
    page.get_by_role("link", name="Audit", exact=True).click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("Signed out: Incorrect admin key provided.")
    assert page.evaluate("sessionStorage.length") == 0

    # from inside a dialog too: the dialog goes with the page it was opened from
    console.sign_in()
    page.wait_for_load_state("networkidle")
    page.get_by_role("button", name="New tenant").click()
    dialog = page.get_by_role("dialog", name="New tenant")
    dialog.get_by_label("Tenant id").fill(new_id())
    page.evaluate("Object.keys(sessionStorage).forEach(k => sessionStorage.setItem(k, 'sk-gw-revoked'))")
    dialog.get_by_role("button", name="Create tenant").click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    expect(dialog).to_have_count(0)


# --- tenants -----------------------------------------------------------------------------


def test_create_a_tenant_and_see_a_changed_limit_enforced(
    console: Watched, gw: GatewayProcess, api: httpx.Client
) -> None:
    console.expect_api_error(400)
    page = console.sign_in()
    tenant = new_id("limits")
    # an API error is shown as its message, under the field it names
    page.get_by_role("button", name="New tenant").click()
    dialog = page.get_by_role("dialog", name="New tenant")
    dialog.get_by_label("Tenant id").fill("Bad Id!")
    dialog.get_by_role("button", name="Create tenant").click()
    id_field = dialog.get_by_label("Tenant id")
    expect(id_field).to_have_attribute("aria-invalid", "true")
    error = api.post("/tenants", json={"id": "Bad Id!"}).json()["error"]["message"]
    expect(dialog.locator('[data-param="id"] .field-error')).to_have_text(error)
    expect(id_field).to_be_focused()
    expect(id_field).to_have_accessible_description(re.compile(re.escape(error)))
    dialog.get_by_role("button", name="Cancel").click()

    ui_create_tenant(page, tenant, tasks_per_day=1)
    assert api.get(f"/tenants/{tenant}").json()["limits"]["tasks_per_day"] == 1
    secret = ui_mint(page, tenant, "limits-svc")
    assert status_becomes(gw, secret, 200).json()["task"]["id"]
    refused = create(gw, secret)
    assert refused.status_code == 429, refused.text

    # the bar shows the day's use against the limit
    page.get_by_role("link", name="Tenants", exact=True).click()
    row = page.get_by_role("row").filter(has_text=tenant)
    expect(row.get_by_role("meter", name="Tasks")).to_have_attribute("aria-valuetext", "1 / 1")
    shot(page, "tenants")

    ui_edit_limit(page, tenant, "Tasks per day", "3")
    expect(row.get_by_role("meter", name="Tasks")).to_have_attribute("aria-valuetext", "1 / 3")
    status_becomes(gw, secret, 200)
    assert api.get(f"/tenants/{tenant}").json()["usage"]["tasks_today"] == 2

    # a bad limit: the API's message next to the field, nothing changed
    page.get_by_role("button", name=f"Edit limits of {tenant}").click()
    dialog = page.get_by_role("dialog", name=f"Limits of {tenant}")
    dialog.get_by_label("Credits per day", exact=True).fill("0")
    dialog.get_by_role("button", name="Save limits").click()
    expect(dialog.locator('[data-param="limits.credits_per_day"] .field-error')).to_contain_text("credits_per_day")
    shot(page, "tenant-limits")
    dialog.get_by_role("button", name="Cancel").click()
    assert api.get(f"/tenants/{tenant}").json()["limits"]["credits_per_day"] is None

    # disable, with a confirmation: its keys get 403
    page.get_by_role("button", name=f"Disable {tenant}").click()
    confirm = page.get_by_role("dialog", name=f"Disable {tenant}?")
    confirm.get_by_role("button", name="Disable tenant").click()
    expect(row).to_contain_text("Disabled")
    assert status_becomes(gw, secret, 403).json()["error"]["code"]
    assert api.get(f"/tenants/{tenant}").json()["enabled"] is False
    page.get_by_role("button", name=f"Enable {tenant}").click()
    expect(row).to_contain_text("Enabled")


# --- keys --------------------------------------------------------------------------------


def test_mint_use_rotate_and_revoke_a_key(console: Watched, gw: GatewayProcess, api: httpx.Client) -> None:
    tenant = new_id("keys")
    assert api.post("/tenants", json={"id": tenant}).status_code == 201
    console.expect_api_error(400)
    page = console.sign_in()

    # a refused mint names its cause under the field
    page.goto(gw.url + f"/admin/#/keys/{tenant}")
    page.get_by_role("button", name="Mint key").click()
    expect(page.locator('[data-param="name"] .field-error')).to_have_text(
        api.post(f"/tenants/{tenant}/keys", json={"name": ""}).json()["error"]["message"]
    )

    secret = ui_mint(page, tenant, "render-svc")
    shot(page, "keys")
    console.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.url)
    page.get_by_role("button", name="Copy secret").click()
    expect(page.get_by_role("region", name="Secret of render-svc").get_by_role("status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    assert status_becomes(gw, secret, 200).json()["task"]["id"]
    (key,) = api.get(f"/tenants/{tenant}/keys").json()["data"]
    row = page.get_by_role("row").filter(has_text="render-svc")
    for shown in (key["prefix"], key["id"]):
        expect(row).to_contain_text(shown)

    # the secret was on the page once: a reload shows the list without it
    page.reload()
    expect(page.get_by_role("row").filter(has_text="render-svc")).to_be_visible()
    assert secret not in page.content()
    assert secret[10:] not in page.evaluate("document.documentElement.outerHTML")

    rotated = ui_rotate(page, "render-svc", "No grace: the old secret stops now")
    assert rotated != secret and rotated.startswith("sk-gw-")
    status_becomes(gw, secret, 401)
    status_becomes(gw, rotated, 200)
    graced = ui_rotate(page, "render-svc", "1 hour")
    expect(page.get_by_role("row").filter(has_text="render-svc")).to_contain_text("old secret until")
    assert create(gw, rotated).status_code == 200  # its grace hour
    status_becomes(gw, graced, 200)

    ui_revoke(page, "render-svc")
    status_becomes(gw, graced, 401)
    status_becomes(gw, rotated, 401)
    assert api.get(f"/keys/{key['id']}").json()["revoked_at"] is not None
    expect(page.get_by_role("button", name="Revoke key render-svc")).to_have_count(0)


def test_a_keys_expiry_date_is_shown_and_never_only_without_one(console: Watched, api: httpx.Client) -> None:
    tenant = new_id("expiry")
    assert api.post("/tenants", json={"id": tenant}).status_code == 201
    expiring = api.post(f"/tenants/{tenant}/keys", json={"name": "expiring", "expires_in_seconds": 30 * 86400}).json()
    assert api.post(f"/tenants/{tenant}/keys", json={"name": "forever"}).status_code == 201
    page = console.sign_in(f"#/keys/{tenant}")
    expires = datetime.fromtimestamp(expiring["expires_at"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    cells = page.get_by_role("row").filter(has_text="expiring").get_by_role("cell")  # prefix, created, expires, ...
    expect(cells.nth(2)).to_have_text(expires)
    expect(cells.nth(2).locator("time")).to_have_attribute("title", expires)
    expect(page.get_by_role("row").filter(has_text="forever").get_by_role("cell").nth(2)).to_have_text("never")


def test_the_new_tenant_id_hint_and_pattern_are_the_ids_rule(console: Watched, api: httpx.Client) -> None:
    """[a-z0-9-]{1,64}, as the API checks it: no `_`."""
    page = console.sign_in()
    page.get_by_role("button", name="New tenant").click()
    field = page.get_by_role("dialog", name="New tenant").get_by_label("Tenant id")
    expect(field).to_have_accessible_description("Lower-case letters, digits and -, up to 64.")
    mismatch = "el => el.validity.patternMismatch || el.validity.tooLong"
    for tenant_id, refused in [("team_a", True), ("Team-a", True), ("team-a-1", False), ("a" * 64, False)]:
        field.fill(tenant_id)
        assert field.evaluate(mismatch) is refused, tenant_id
        if refused:  # the API's rule too
            assert api.post("/tenants", json={"id": tenant_id}).json()["error"]["param"] == "id"
    page.get_by_role("dialog", name="New tenant").get_by_role("button", name="Cancel").click()


# --- usage and webhooks (the §10 routes) -------------------------------------------------


def test_usage_chart_and_csv_download(console: Watched, gw: GatewayProcess, api: httpx.Client) -> None:
    tenant = new_id("usage")
    assert api.post("/tenants", json={"id": tenant}).status_code == 201
    secret = api.post(f"/tenants/{tenant}/keys", json={"name": "u"}).json()["secret"]
    status_becomes(gw, secret, 200)
    assert create(gw, secret).status_code == 200
    credits = api.get(f"/tenants/{tenant}").json()["usage"]["credits_today"]

    console.expect_api_error(400)
    page = console.sign_in()
    page.get_by_role("link", name="Usage", exact=True).click()
    page.get_by_label("Tenant", exact=True).select_option(tenant)
    page.get_by_role("button", name="Show").click()
    chart = page.get_by_role("img", name=re.compile("Tasks and credits per day"))
    expect(chart).to_contain_text("tasks")
    expect(chart).to_have_attribute("aria-label", re.compile(f": 2 tasks, {credits:,} credits$"))
    assert chart.locator(".bars rect").count() == 30
    expect(page.locator(".tile").filter(has_text="Tasks created")).to_contain_text("2")
    shot(page, "usage")

    with page.expect_download() as info:
        page.get_by_role("button", name="Download CSV").click()
    download = info.value
    assert download.suggested_filename.endswith(f"-{tenant}.csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    assert [(r["tenant"], r["tasks_created"]) for r in rows] == [(tenant, "2")]

    # a bad range: the API's message, next to the form
    page.get_by_label("From").fill("2020-01-01")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("alert").or_(page.locator(".field-error:visible"))).to_contain_text("366")
    assert page.evaluate("localStorage.length") == 0
    fits(page)


# --- relays and usage by relay (contract §14) ---------------------------------------------
#
# LEAD: GET /admin/v1/relays and the ledger's group_by=relay come with the relays-core
# branch. These two tests read the live gateway's answers when it serves them (after the
# merge: nothing to switch); while it answers "absent" (404, or 400 on group_by; anything
# else fails), they route just those calls in the browser to canned §14 answers.

STATE_LABELS = {"closed": "Closed", "half_open": "Half-open", "cooling": "Cooling", "open": "Open"}
RELAYS_URL = re.compile(r"/admin/v1/relays$")


def iso(t: int) -> str:
    """A Unix time as JavaScript's toISOString writes it."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def serve(page: Page, data: list[dict[str, Any]]) -> None:
    page.route(RELAYS_URL, lambda route: route.fulfill(json={"object": "list", "data": data}))


def test_relays_page(console: Watched, gw: GatewayProcess, api: httpx.Client) -> None:
    live = live_answers(gw.url, ADMIN_KEY, "/relays")
    if live:
        relays: list[dict[str, Any]] = api.get("/relays").json()["data"]
        assert [r["id"] for r in relays] == ["default"]  # the fixture's one [upstream]
    else:
        relays = canned_relays()["data"]
        serve(console.page, relays)
    page = console.sign_in("#/relays")
    expect(page.get_by_role("heading", name="Relays")).to_be_visible()
    expect(page.get_by_role("link", name="Usage by relay")).to_have_attribute("href", "#/usage?by=relay")
    rows = page.locator("tbody tr[data-relay]")
    expect(rows).to_have_count(len(relays))
    for r in relays:
        row = page.locator(f'tr[data-relay="{r["id"]}"]')
        expect(row.locator("th")).to_have_text(r["id"] + r["host"])
        expect(row.locator(".pill.state")).to_have_text(STATE_LABELS[r["state"]])
        cells = row.locator("td")
        shown = [
            str(r["priority"]),
            str(r["weight"]),
            "Enabled" if r["enabled"] else "Drained",
            f"{r['keys']['refused']} of {r['keys']['total']}",
            str(r["failovers"]) if "failovers" in r else "—",
            r["last_error"] or "—",
        ]
        expect(cells).to_have_text([re.compile(".*"), *shown])
        meaning = "drained: no new tasks" if not r["enabled"] and r["state"] == "closed" else None
        if meaning:
            expect(cells.first).to_contain_text(meaning)
        if r["until"] is None:
            expect(cells.first.locator("time")).to_have_count(0)
        else:
            expect(cells.first.locator("time")).to_have_attribute("datetime", iso(r["until"]))
    # the state is text and a colour of its own
    colors = {
        r["state"]: page.locator(f'tr[data-relay="{r["id"]}"] .pill.state').evaluate("e => getComputedStyle(e).color")
        for r in relays
    }
    assert colors.get("closed", "rgb(31, 138, 91)") == "rgb(31, 138, 91)"  # --ok
    assert colors.get("open", "rgb(192, 57, 43)") == "rgb(192, 57, 43)"  # --danger
    assert len(set(colors.values())) == len(colors)
    enabled = [r for r in relays if r["enabled"]]
    closed = [r for r in enabled if r["state"] == "closed"]
    expect(page.get_by_role("status")).to_have_text(
        f"{len(closed)} of {len(enabled)} enabled relays closed (taking new tasks)."
    )
    shot(page, "relays")

    # Refresh shows the answer of now: the first relay's circuit opened; an error text from
    # the API is text, never markup
    until = int(time.time()) + 30
    serve(page, [{**relays[0], "state": "open", "until": until, "last_error": "<b>http 502</b>"}, *relays[1:]])
    page.get_by_role("button", name="Refresh").click()
    first = page.locator(f'tr[data-relay="{relays[0]["id"]}"]')
    expect(first.locator(".pill.state")).to_have_text("Open")
    expect(first.locator("td").first.locator("time")).to_have_attribute("datetime", iso(until))
    expect(first.locator("td").last).to_have_text("<b>http 502</b>")
    assert page.locator("main b").count() == 0
    fits(page)

    # an error answer: the API's message, and the table gone
    console.expect_api_error(404)
    error = {"message": "Not found.", "type": "invalid_request_error", "param": None, "code": "not_found"}
    page.route(RELAYS_URL, lambda route: route.fulfill(status=404, json={"error": error}))
    page.get_by_role("button", name="Refresh").click()
    expect(page.get_by_role("alert")).to_have_text("Not found.")
    expect(rows).to_have_count(0)
    page.unroute_all()
    assert page.evaluate("localStorage.length") == 0


def test_usage_by_relay(console: Watched, gw: GatewayProcess, api: httpx.Client) -> None:
    today = datetime.now(UTC).date()
    live = live_answers(gw.url, ADMIN_KEY, "/usage", group_by="relay")
    tenant = new_id("relay-usage")
    if live:  # two tasks of a tenant of this test's own
        assert api.post("/tenants", json={"id": tenant}).status_code == 201
        secret = api.post(f"/tenants/{tenant}/keys", json={"name": "r"}).json()["secret"]
        status_becomes(gw, secret, 200)
        assert create(gw, secret).status_code == 200
        expected = api.get("/usage", params={"tenant": tenant, "group_by": "relay"}).json()["data"]
        assert sum(r["tasks_created"] for r in expected) == 2
    else:  # the canned ledger, all tenants
        expected = group(canned_ledger(today.isoformat()), ["relay"])

        def canned(route: Route) -> None:
            query = dict(parse_qsl(urlsplit(route.request.url).query))
            if "relay" not in query.get("group_by", "").split(","):
                route.fallback()  # the live ledger answers the rest
                return
            status, media_type, body = usage_report(today.isoformat(), query)
            route.fulfill(status=status, content_type=media_type, body=body)

        console.page.route(re.compile(r"/admin/v1/usage\?"), canned)

    page = console.sign_in("#/usage?by=relay")
    expect(page.get_by_label("Group by")).to_have_value("relay")
    rows = page.locator("tbody tr[data-relay]")
    if live:
        page.get_by_label("Tenant", exact=True).select_option(tenant)
        page.get_by_role("button", name="Show").click()
    expect(rows).to_have_count(len(expected))
    total = sum(r["tasks_created"] for r in expected)
    for r in expected:
        share = f"{round(100 * r['tasks_created'] / total)} %"
        counts = [r[f] for f in ("tasks_succeeded", "tasks_failed", "credits_charged", "credits_refunded")]
        net = r["credits_charged"] - r["credits_refunded"]
        cells = [str(r["tasks_created"]), share, *(f"{v:,}" for v in counts), f"{net:,}"]
        expect(page.locator(f'tr[data-relay="{r["relay"]}"] td')).to_have_text(cells)
        meter = page.get_by_role("meter", name=f"Share of {r['relay']}")
        expect(meter).to_have_attribute("aria-valuetext", share)
    expect(page.locator(".tile").filter(has_text="Tasks created")).to_contain_text(f"{total:,}")
    shot(page, "usage-by-relay")

    # the CSV for a relay's invoice: per day and relay
    with page.expect_download() as info:
        page.get_by_role("button", name="Download CSV").click()
    download = info.value
    assert download.suggested_filename.startswith("usage-by-relay-")
    lines = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    assert {"date", "relay", "tasks_created"} <= set(lines[0]) and "tenant" not in lines[0]
    per_relay = {r["relay"]: r["tasks_created"] for r in expected}
    assert {
        relay: sum(int(x["tasks_created"]) for x in lines if x["relay"] == relay) for relay in per_relay
    } == per_relay
    assert {x["date"] for x in lines} <= {today.fromordinal(today.toordinal() - d).isoformat() for d in range(30)}

    # back to days: the chart of the same range
    page.get_by_label("Group by").select_option("day")
    expect(page.get_by_role("img", name=re.compile("Tasks and credits per day"))).to_be_visible()
    expect(rows).to_have_count(0)
    fits(page)
    page.unroute_all()


class _Receiver(BaseHTTPRequestHandler):
    received: list[bytes]

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_redeliver_a_dead_webhook(console: Watched, gw: GatewayProcess, api: httpx.Client) -> None:
    tenant = new_id("hooks")
    assert api.post("/tenants", json={"id": tenant, "policy": {"hook_hosts": ["127.0.0.1"]}}).status_code == 201
    secret = api.post(f"/tenants/{tenant}/keys", json={"name": "h"}).json()["secret"]
    port = free_port()  # nothing listens there yet: the first delivery fails, and is dead
    status_becomes(gw, secret, 200)
    assert create(gw, secret, notify_hook=f"http://127.0.0.1:{port}/hook").status_code == 200

    def dead() -> list[dict[str, Any]]:
        resp = api.get("/webhooks", params={"status": "dead", "tenant": tenant})
        assert resp.status_code == 200, resp.text
        data: list[dict[str, Any]] = resp.json()["data"]
        return data

    wait_until(lambda: len(dead()) > 0, 20, 0.2, "a dead delivery")
    event = dead()[0]

    received: list[bytes] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = HTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = console.sign_in()
        page.get_by_role("link", name="Webhooks", exact=True).click()
        page.get_by_label("Tenant", exact=True).select_option(tenant)
        row = page.get_by_role("row").filter(has_text=event["id"])
        expect(row).to_contain_text(event["task_id"])
        shot(page, "webhooks")
        page.get_by_role("button", name=f"Redeliver {event['id']}").click()
        expect(row.get_by_role("status")).to_have_text("Queued")
        wait_until(lambda: len(received) > 0, 10, 0.1, "the redelivered webhook")
        assert event["task_id"].encode() in received[0]
        page.get_by_role("link", name="Pending", exact=True).click()
        expect(page.get_by_role("heading", name="Webhooks")).to_be_visible()
        assert page.evaluate("localStorage.length") == 0
        fits(page)
    finally:
        server.shutdown()
        server.server_close()
    entries = api.get("/audit", params={"tenant": tenant, "action": "webhook.redeliver"}).json()["data"]
    assert len(entries) == 1


def test_a_keys_own_limits_scopes_and_networks_are_shown_and_edited(
    console: Watched, gw: GatewayProcess, api: httpx.Client
) -> None:
    """Contract §15 on the key page: the access column and its dialog, enforced at once."""
    tenant = new_id("access")
    assert api.post("/tenants", json={"id": tenant}).status_code == 201
    key = api.post(f"/tenants/{tenant}/keys", json={"name": "dash-svc"}).json()
    console.expect_api_error(400)
    page = console.sign_in(f"#/keys/{tenant}")
    row = page.get_by_role("row").filter(has_text="dash-svc")
    expect(row).to_contain_text("tenant's limits only")
    expect(row).to_contain_text("all scopes")
    expect(row).to_contain_text("from anywhere")

    page.get_by_role("button", name="Edit access of key dash-svc").click()
    dialog = page.get_by_role("dialog", name="Access of dash-svc")
    dialog.get_by_label("Active tasks", exact=True).fill("2")
    dialog.get_by_label("create").uncheck()
    dialog.get_by_label("delete").uncheck()
    dialog.get_by_role("button", name="Save access").click()
    expect(dialog).to_be_hidden()
    expect(row).to_contain_text("Active tasks: 2")
    expect(row).to_contain_text("only read")
    shot(page, "key-access")
    shown = api.get(f"/keys/{key['id']}").json()
    assert shown["limits"]["max_active_tasks"] == 2 and shown["scopes"] == ["read"]
    # in force: the key may read but no longer create
    refused = status_becomes(gw, key["secret"], 403).json()["error"]
    assert refused["code"] == "permission_denied" and "`create` scope" in refused["message"]

    # a bad network: the API's message, nothing changed
    page.get_by_role("button", name="Edit access of key dash-svc").click()
    dialog = page.get_by_role("dialog", name="Access of dash-svc")
    dialog.get_by_label(re.compile("^Allowed networks")).fill("10.20.0.0/16\nnot-a-network")
    dialog.get_by_role("button", name="Save access").click()
    expect(dialog.get_by_role("alert")).to_contain_text("allowed_cidrs.1")
    dialog.get_by_label(re.compile("^Allowed networks")).fill("10.20.0.0/16")
    dialog.get_by_label("create").check()
    dialog.get_by_label("delete").check()
    dialog.get_by_label("Active tasks", exact=True).fill("")
    dialog.get_by_role("button", name="Save access").click()
    expect(dialog).to_be_hidden()
    expect(row).to_contain_text("from 10.20.0.0/16")
    expect(row).to_contain_text("all scopes")
    shown = api.get(f"/keys/{key['id']}").json()
    assert (shown["limits"]["max_active_tasks"], shown["scopes"], shown["allowed_cidrs"]) == (
        None,
        ["create", "read", "delete"],
        ["10.20.0.0/16"],
    )
    changes = [
        e["changes"] for e in api.get("/audit", params={"tenant": tenant, "action": "key.update"}).json()["data"]
    ]
    assert changes == [
        {"limits": {"max_active_tasks": None}, "scopes": None, "allowed_cidrs": ["10.20.0.0/16"]},
        {"limits": {"max_active_tasks": 2}, "scopes": ["read"]},
    ]


# --- audit -------------------------------------------------------------------------------


def test_each_console_action_is_on_the_audit_page(console: Watched, api: httpx.Client) -> None:
    page = console.sign_in()
    tenant = new_id("audit")
    ui_create_tenant(page, tenant)
    ui_edit_limit(page, tenant, "Active tasks", "4")
    ui_mint(page, tenant, "audited")
    ui_rotate(page, "audited", "24 hours")
    ui_revoke(page, "audited")

    page.get_by_role("link", name="Audit", exact=True).click()
    page.get_by_label("Tenant", exact=True).select_option(tenant)
    rows = page.locator("tbody tr[data-audit]")
    expect(rows).to_have_count(5)
    actions = ["key.revoke", "key.rotate", "key.create", "tenant.update", "tenant.create"]
    assert [r.locator(".action").inner_text() for r in rows.all()] == actions
    expected = [e["action"] for e in api.get("/audit", params={"tenant": tenant}).json()["data"]]
    assert expected == actions
    expect(rows.first).to_contain_text("admin_key")
    shot(page, "audit")

    page.get_by_label("Action").select_option("key.rotate")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("grace_seconds")
    expect(rows.first).to_contain_text("86400")
    page.get_by_label("Tenant", exact=True).select_option("")
    expect(rows.first.locator(".action")).to_have_text("key.rotate")

    # pages of 50, newest first: "Load more" asks for the next one after the last id
    for i in range(52):
        assert api.patch(f"/tenants/{tenant}", json={"name": f"rename {i}"}).status_code == 200
    page.get_by_label("Action").select_option("tenant.update")
    page.get_by_label("Tenant", exact=True).select_option(tenant)
    expect(rows).to_have_count(50)
    expect(rows.first).to_contain_text("rename 51")
    page.get_by_role("button", name="Load more").click()
    expect(rows).to_have_count(53)
    expect(rows.last).to_contain_text("limits.max_active_tasks")
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()


# --- hostile text, slow calls -------------------------------------------------------------


def test_text_from_the_api_is_shown_as_text_never_as_markup(console: Watched, api: httpx.Client) -> None:
    tenant = new_id("xss")
    name = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    assert api.post("/tenants", json={"id": tenant, "name": name}).status_code == 201
    assert api.post(f"/tenants/{tenant}/keys", json={"name": "<b>bold</b>"}).status_code == 201
    page = console.sign_in()
    row = page.get_by_role("row").filter(has_text=tenant)
    expect(row.locator(".tenant-name")).to_have_text(name)
    page.get_by_role("link", name=f"Keys of {tenant}").click()
    expect(page.get_by_role("row").filter(has_text="<b>bold</b>")).to_be_visible()
    page.get_by_role("link", name="Audit", exact=True).click()
    page.get_by_label("Tenant", exact=True).select_option(tenant)
    expect(page.locator("tbody tr[data-audit]")).to_have_count(2)
    assert page.locator("main img, main script, main b").count() == 0
    assert page.evaluate("window.pwned") is None


def release(page: Page, held: list[Route]) -> None:
    """Let the one held request go on (waiting through Playwright, which is what runs the
    route handlers of the sync API)."""
    for _ in range(200):
        if held:
            assert len(held) == 1
            held.pop().continue_()
            return
        page.wait_for_timeout(25)
    raise AssertionError("no request was held")


def test_slow_calls_show_that_they_are_loading(console: Watched, gw: GatewayProcess, api: httpx.Client) -> None:
    tenant = new_id("slow")
    assert api.post("/tenants", json={"id": tenant}).status_code == 201
    held: list[Route] = []
    page = console.sign_in("#/audit")
    expect(page.get_by_role("heading", name="Audit")).to_be_visible()
    page.route("**/admin/v1/tenants?*", lambda route: held.append(route))
    page.route(re.compile(rf"/admin/v1/tenants/{tenant}/keys(\?.*)?$"), lambda route: held.append(route))
    page.get_by_role("link", name="Tenants", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Loading tenants…")
    release(page, held)
    expect(page.get_by_role("row").filter(has_text=tenant)).to_be_visible()
    expect(page.get_by_role("status")).to_have_count(0)

    page.goto(gw.url + f"/admin/#/keys/{tenant}")
    release(page, held)
    expect(page.get_by_role("status")).to_have_text("Loading keys…")
    release(page, held)
    expect(page.get_by_text("No keys yet")).to_be_visible()
    page.get_by_label("Key name").fill("slow-svc")
    page.get_by_role("button", name="Mint key").click()
    busy = page.locator("button[aria-busy=true]")
    expect(busy).to_have_text("Minting…")
    expect(busy).to_be_disabled()
    release(page, held)
    expect(page.get_by_role("region", name="Secret of slow-svc")).to_be_visible()
    expect(page.get_by_role("button", name="Mint key")).to_be_enabled()
    page.unroute_all()


# --- secrets, small screens, keyboard ------------------------------------------------------


def test_the_admin_key_is_never_in_local_storage_a_url_or_a_log_line(console: Watched, gw: GatewayProcess) -> None:
    page = console.sign_in()
    for link in ("Tenants", "Keys", "Audit"):  # Usage and Webhooks: in their own tests
        page.get_by_role("link", name=link, exact=True).click()
        expect(page.get_by_role("heading", name=link, exact=True)).to_be_visible()
        assert page.evaluate("localStorage.length") == 0
        assert page.evaluate("document.cookie") == ""
    secret = ui_mint(page, "cfg-a", "leak-check")
    # a second tab of the same browser does not see the key (sessionStorage is per tab)
    other = console.new_page()
    other.goto(gw.url + "/admin/")
    expect(other.get_by_label("Admin key")).to_be_visible()
    other.close()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    assert console.urls and all(ADMIN_KEY not in u and secret not in u for u in console.urls)
    log = gw.log_text()
    assert '"route": "/admin/v1/tenants/{id}/keys"' in log or "/admin/v1/tenants/{id}/keys" in log
    assert ADMIN_KEY not in log and secret not in log and secret[10:] not in log


def test_phone_width_and_keyboard_only(browser: Browser, gw: GatewayProcess) -> None:
    watched = Watched(browser, gw.url, PHONE)
    try:
        page = watched.page
        page.goto(gw.url + "/admin/")
        # keyboard only: the key field has focus, Enter signs in, Tab reaches the menu
        page.keyboard.type(ADMIN_KEY)
        page.keyboard.press("Enter")
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()
        for _ in range(12):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.textContent") == "Audit":
                break
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Audit")).to_be_focused()
        for link in ("Tenants", "Keys", "Audit"):  # Usage and Webhooks: in their own tests
            page.get_by_role("link", name=link, exact=True).click()
            expect(page.get_by_role("heading", name=link, exact=True)).to_be_visible()
            fits(page)
        # dialogs fit too, and Escape closes them
        page.get_by_role("link", name="Tenants", exact=True).click()
        page.get_by_role("button", name="New tenant").click()
        dialog = page.get_by_role("dialog", name="New tenant")
        box = dialog.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
        expect(dialog.get_by_label("Tenant id")).to_be_focused()
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        if SHOTS:
            page.screenshot(path=str(Path(SHOTS) / "phone-tenants.png"))
    finally:
        watched.context.close()
    assert watched.errors == []
