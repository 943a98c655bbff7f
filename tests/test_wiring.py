"""How the app is wired, in process (no server, no upstream): the services exist whole for
the app's lifespan, and every Bearer credential is read by the one parser."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_KEY, key_hash
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.auth import bearer_credential
from gateway.config import load_config
from gateway.services import Services

METRICS_TOKEN = "scrape-secret-wiring"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Starlette]:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[upstream]\nbase_url = "http://127.0.0.1:9"\napi_keys = ["sk-up"]\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "gw.db"}"\n'
        f'[admin]\nkeys = ["{key_hash(ADMIN_KEY)}"]\n'
        f'[metrics]\nbearer_token = "{METRICS_TOKEN}"\n'
        f'[[tenants]]\nid = "t"\nkeys = ["{key_hash("sk-gw-wiring")}"]\n'
    )
    application = create_app(load_config(path), background=False)
    async with application.router.lifespan_context(application):
        yield application


async def test_the_services_exist_whole_while_the_app_runs(app: Starlette) -> None:
    services = app.state.services
    assert isinstance(services, Services)
    for f in dataclasses.fields(services):
        assert getattr(services, f.name) is not None, f.name
    assert services.tasks.signer is services.signer and services.uploads is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        services.tasks = None  # type: ignore[misc]


@pytest.mark.parametrize(
    ("header", "credential"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc ", "abc"),
        ("BEARER  abc", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer  ", None),
        ("Basic abc", None),
        ("abc", None),
    ],
)
def test_bearer_credential(header: str | None, credential: str | None) -> None:
    assert bearer_credential(header) == credential


async def test_admin_and_metrics_read_bearer_like_tenant_keys(app: Starlette) -> None:
    """The scheme in any case, as for tenant keys: the metrics token once compared the whole
    header, so `bearer <token>` was refused there and accepted everywhere else."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        for scheme in ("Bearer", "bearer"):
            ok = await client.get("/metrics", headers={"Authorization": f"{scheme} {METRICS_TOKEN}"})
            assert ok.status_code == 200, scheme
            usage = await client.get("/admin/tenants/t/usage", headers={"Authorization": f"{scheme} {ADMIN_KEY}"})
            assert usage.status_code == 200, scheme
        for header in ("Bearer wrong", f"Basic {METRICS_TOKEN}", ""):
            refused = await client.get("/metrics", headers={"Authorization": header})
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", header
            refused = await client.get("/admin/tenants/t/usage", headers={"Authorization": header})
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", header


def test_the_served_process_settles_its_garbage_collector(tmp_path: Path) -> None:
    """`serve`'s app (the uvicorn factory) freezes what startup built and collects young
    objects less often (gateway.app.settle_gc; docs/benchmarks.md); an app built in a test
    leaves the interpreter's collector alone. Run in a child: it changes the process."""
    import subprocess
    import sys

    config = tmp_path / "gw.toml"
    config.write_text(
        '[upstream]\nbase_url = "http://127.0.0.1:9"\napi_keys = ["sk-up"]\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "gw.db"}"\n'
        f'[[tenants]]\nid = "acme"\nkeys = ["{key_hash("sk-gw-wiring-gc")}"]\n'
    )
    probe = (
        "import asyncio, gc, os\n"
        "from gateway.app import GC_YOUNG_THRESHOLD, create_app\n"
        "from gateway.cli import app_from_env\n"
        "from gateway.config import load_config\n"
        "async def lifespan(app):\n"
        "    async with app.router.lifespan_context(app):\n"
        "        return gc.get_threshold()[0], gc.get_freeze_count()\n"
        "plain = asyncio.run(lifespan(create_app(load_config(os.environ['GATEWAY_CONFIG']), background=False)))\n"
        "served = asyncio.run(lifespan(app_from_env()))\n"
        "print(plain[0] != GC_YOUNG_THRESHOLD and plain[1] == 0, served[0] == GC_YOUNG_THRESHOLD and served[1] > 0)\n"
    )
    env = {**os.environ, "GATEWAY_CONFIG": str(config)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["True", "True"], proc.stdout + proc.stderr[-2000:]
