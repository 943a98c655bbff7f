"""`check-config` refuses what would hurt, warns about what is surely not meant, says each
problem once, and checks a file against an env file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, GatewayProcess, Simulator, TenantSpec, wait_until

from gateway.config import read_env_file

DEPLOY_VARS = ("UPSTREAM_API_KEY", "ADMIN_KEY_HASH", "DEMO_TENANT_KEY_HASH", "DEMO_WEBHOOK_SECRET")
MINIMAL = '[upstream]\nbase_url = "http://127.0.0.1:9"\napi_keys = ["k"]\n'


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def test_a_missing_upstream_base_url_is_refused(tmp_path: Path) -> None:
    out = check_config(write(tmp_path, '[upstream]\napi_keys = ["k"]\n'))
    assert out.returncode == 2
    assert lines(out.stderr) == ["upstream.base_url: required: the relay's URL (no default: the relay keys are sent there)"]


def test_hs_secrets_shorter_than_32_bytes_are_refused(tmp_path: Path) -> None:
    jwt = '[auth.jwt]\nalgorithms = ["HS256", "HS512"]\nsecret = "{}"\n'
    short = check_config(write(tmp_path, MINIMAL + jwt.format("x" * 31)))
    assert short.returncode == 2
    assert len(lines(short.stderr)) == 1 and short.stderr.startswith("auth.jwt.secret: must be at least 32 bytes"), short.stderr
    # bytes, not characters: 16 two-byte characters are enough
    assert check_config(write(tmp_path, MINIMAL + jwt.format("é" * 16))).returncode == 0


def test_a_credit_budget_below_one_task_is_a_warning_with_exit_0(tmp_path: Path) -> None:
    tenants = (
        '[pricing]\ngen2 = 10\nupscale = 5\n'
        '[[tenants]]\nid = "tight"\n[tenants.limits]\ncredits_per_day = 12\ncredits_per_month = 15\n'
        '[tenants.policy]\nforce = { upscale = true }\n'  # every task of "tight" costs 15
        '[[tenants]]\nid = "fine"\n[tenants.limits]\ncredits_per_day = 10\n'
    )
    out = check_config(write(tmp_path, MINIMAL + tenants))
    assert out.returncode == 0, out.stderr
    assert lines(out.stderr) == [
        "warning: tenants[0].limits.credits_per_day: 12 is below the price of one task (15 credits): "
        "every create of this tenant will be refused with 429 insufficient_quota"
    ]
    assert "ok (1 warning)" in out.stdout


def test_serve_logs_the_budget_warning(tmp_path: Path, sim: Simulator) -> None:
    gw = GatewayProcess(tmp_path, sim.url, [TenantSpec("tight", limits={"credits_per_month": 3})])
    gw.start()
    try:
        warning = wait_until(lambda: [e for e in gw.access_log() if e.get("logger") == "gateway.config"], message="the config warning")
        assert warning[0]["level"] == "warning"
        assert warning[0]["message"].startswith("tenants[0].limits.credits_per_month: 3 is below the price of one task (10 credits)")
    finally:
        gw.stop()


def test_each_unset_variable_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in DEPLOY_VARS}
    out = check_config("deploy/gateway.toml", env=env)
    assert out.returncode == 2
    assert lines(out.stderr) == [
        "upstream.api_keys[0]: environment variable UPSTREAM_API_KEY is not set and has no default",
        "admin.keys[0]: environment variable ADMIN_KEY_HASH is not set and has no default",
        "tenants[0].keys[0]: environment variable DEMO_TENANT_KEY_HASH is not set and has no default",
        "tenants[0].webhook_secret: environment variable DEMO_WEBHOOK_SECRET is not set and has no default",
    ]
    jwt = '[auth.jwt]\nalgorithms = ["HS256"]\nsecret = "${JWT_SECRET_NOT_SET_X}${JWT_PEPPER_NOT_SET_X}"\n'
    out = check_config(write(tmp_path, MINIMAL + jwt), env=env)
    assert lines(out.stderr) == [
        "auth.jwt.secret: environment variable JWT_SECRET_NOT_SET_X is not set and has no default",
        "auth.jwt.secret: environment variable JWT_PEPPER_NOT_SET_X is not set and has no default",
    ]


def test_env_file_is_the_only_source_of_variables(tmp_path: Path) -> None:
    assert check_config("deploy/gateway.toml", "--env-file", "deploy/.env.example").stdout.strip() == "deploy/gateway.toml: ok"
    assert check_config("config/gateway.example.toml", "--env-file", os.devnull).returncode == 0  # passes as shipped
    partial = "\n".join(
        line for line in (ROOT / "deploy/.env.example").read_text().splitlines() if not line.startswith("DEMO_WEBHOOK_SECRET=")
    )
    out = check_config("deploy/gateway.toml", "--env-file", write(tmp_path, partial, ".env"), env={**os.environ, "DEMO_WEBHOOK_SECRET": "from-the-shell"})
    assert out.returncode == 2
    assert lines(out.stderr) == ["tenants[0].webhook_secret: environment variable DEMO_WEBHOOK_SECRET is not set and has no default"]


def test_env_file_syntax(tmp_path: Path) -> None:
    env_file = write(tmp_path, '# a comment\n\nA=1\nexport B = "two # not a comment"\nC=\'three\'\nD=four # a comment\nE=\n', ".env")
    assert read_env_file(env_file) == {"A": "1", "B": "two # not a comment", "C": "three", "D": "four", "E": ""}
    bad = write(tmp_path, "A=1\nthis is not a pair\n", "bad.env")
    out = check_config("deploy/gateway.toml", "--env-file", bad)
    assert out.returncode == 2 and lines(out.stderr) == [f"{bad}:2: not a KEY=VALUE line"]
