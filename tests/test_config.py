"""Configuration (gateway/config.py): `check-config` and `serve` refuse what would hurt,
warn about what is surely not meant, say each problem once, and check a file against an
env file; then `parse_config` in process: each section's defaults (as the README states
them), `${NAME}` / `${NAME:-default}`, unknown keys and every problem with its key path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, GatewayProcess, Simulator, TenantSpec, free_port, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import (
    ADMIN_KEYS,
    Config,
    ConfigError,
    JWTConfig,
    Limits,
    Policy,
    PricingConfig,
    ServerConfig,
    StoreConfig,
    Tenant,
    UpstreamConfig,
    WebhookConfig,
    parse_config,
    read_env_file,
)

DEPLOY_VARS = ("UPSTREAM_API_KEY", "ADMIN_KEY_HASH", "DEMO_TENANT_KEY_HASH", "DEMO_WEBHOOK_SECRET")
MINIMAL = '[upstream]\nbase_url = "http://127.0.0.1:9"\napi_keys = ["k"]\n'


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def test_a_missing_upstream_base_url_is_refused(tmp_path: Path) -> None:
    out = check_config(write(tmp_path, '[upstream]\napi_keys = ["k"]\n'))
    assert out.returncode == 2
    assert lines(out.stderr) == [
        "upstream.base_url: required: the relay's URL (no default: the relay keys are sent there)"
    ]


def test_hs_secrets_shorter_than_32_bytes_are_refused(tmp_path: Path) -> None:
    jwt = '[auth.jwt]\nalgorithms = ["HS256", "HS512"]\nsecret = "{}"\n'
    short = check_config(write(tmp_path, MINIMAL + jwt.format("x" * 31)))
    assert short.returncode == 2
    assert len(lines(short.stderr)) == 1 and short.stderr.startswith("auth.jwt.secret: must be at least 32 bytes"), (
        short.stderr
    )
    # bytes, not characters: 16 two-byte characters are enough
    assert check_config(write(tmp_path, MINIMAL + jwt.format("é" * 16))).returncode == 0


def test_a_credit_budget_below_one_task_is_a_warning_with_exit_0(tmp_path: Path) -> None:
    tenants = (
        "[pricing]\ngen2 = 10\nupscale = 5\n"
        '[[tenants]]\nid = "tight"\n[tenants.limits]\ncredits_per_day = 12\ncredits_per_month = 15\n'
        "[tenants.policy]\nforce = { upscale = true }\n"  # every task of "tight" costs 15
        '[[tenants]]\nid = "fine"\n[tenants.limits]\ncredits_per_day = 10\n'
    )
    out = check_config(write(tmp_path, MINIMAL + tenants))
    assert out.returncode == 0, out.stderr
    assert lines(out.stderr) == [
        "warning: tenants[0].limits.credits_per_day: 12 is below the price of one task (15 credits): "
        "every create of this tenant will be refused with 429 insufficient_quota"
    ]
    assert "ok (1 warning)" in out.stdout


def test_the_example_configs_placeholders_are_warnings_with_exit_0(tmp_path: Path) -> None:
    """A copy of the example with its placeholders left in loads (exit 0: nothing in it is
    unsafe, and the example passes as shipped), but says so, naming paths and never values."""
    env = {k: v for k, v in os.environ.items() if k not in ("UPSTREAM_API_KEY", "UPSTREAM_BASE_URL")}
    out = check_config("config/gateway.example.toml", env=env)
    assert out.returncode == 0, out.stderr
    assert lines(out.stderr) == [
        "warning: upstream.api_keys[0] is the example's placeholder (replace-me): "
        "the relay will refuse it; set UPSTREAM_API_KEY or the relay's key",
        "warning: tenants[0].keys[0] is the all-zero placeholder hash: no key matches it "
        "(make one with `runway-gateway new-key`)",
    ]
    assert out.stdout.strip() == "config/gateway.example.toml: ok (2 warnings)"
    zero = "sha256:" + "0" * 64
    admin = write(tmp_path, MINIMAL + f'[admin]\nkeys = ["{zero}"]\n')
    assert lines(check_config(admin).stderr) == [
        "warning: admin.keys[0] is the all-zero placeholder hash: no key matches it "
        "(make one with `runway-gateway new-key`)"
    ]
    real = check_config("config/gateway.example.toml", env={**env, "UPSTREAM_API_KEY": "sk-relay-real"})
    assert real.returncode == 0 and "upstream.api_keys" not in real.stderr


def test_serve_with_workers_logs_the_address_it_listens_on(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, "http://127.0.0.1:9", [TenantSpec("t")], workers=2)
    gw.start()
    try:
        said = [e for e in gw.access_log() if "running on" in e.get("message", "")]
        assert [e["message"] for e in said] == [f"Uvicorn running on http://127.0.0.1:{gw.port} (Press CTRL+C to quit)"]
    finally:
        gw.stop()


def test_serve_logs_the_budget_warning(tmp_path: Path, sim: Simulator) -> None:
    gw = GatewayProcess(tmp_path, sim.url, [TenantSpec("tight", limits={"credits_per_month": 3})])
    gw.start()
    try:
        warning = wait_until(
            lambda: [e for e in gw.access_log() if e.get("logger") == "gateway.config"], message="the config warning"
        )
        assert warning[0]["level"] == "warning"
        assert warning[0]["message"].startswith(
            "tenants[0].limits.credits_per_month: 3 is below the price of one task (10 credits)"
        )
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
    assert (
        check_config("deploy/gateway.toml", "--env-file", "deploy/.env.example").stdout.strip()
        == "deploy/gateway.toml: ok"
    )
    assert check_config("config/gateway.example.toml", "--env-file", os.devnull).returncode == 0  # passes as shipped
    partial = "\n".join(
        line
        for line in (ROOT / "deploy/.env.example").read_text().splitlines()
        if not line.startswith("DEMO_WEBHOOK_SECRET=")
    )
    out = check_config(
        "deploy/gateway.toml",
        "--env-file",
        write(tmp_path, partial, ".env"),
        env={**os.environ, "DEMO_WEBHOOK_SECRET": "from-the-shell"},
    )
    assert out.returncode == 2
    assert lines(out.stderr) == [
        "tenants[0].webhook_secret: environment variable DEMO_WEBHOOK_SECRET is not set and has no default"
    ]


def test_env_file_syntax(tmp_path: Path) -> None:
    env_file = write(
        tmp_path, "# a comment\n\nA=1\nexport B = \"two # not a comment\"\nC='three'\nD=four # a comment\nE=\n", ".env"
    )
    assert read_env_file(env_file) == {"A": "1", "B": "two # not a comment", "C": "three", "D": "four", "E": ""}
    bad = write(tmp_path, "A=1\nthis is not a pair\n", "bad.env")
    out = check_config("deploy/gateway.toml", "--env-file", bad)
    assert out.returncode == 2 and lines(out.stderr) == [f"{bad}:2: not a KEY=VALUE line"]


def test_example_config_passes_and_serve_refuses_a_bad_one(tmp_path: Path) -> None:
    ok = check_config("config/gateway.example.toml")
    assert ok.returncode == 0, ok.stderr
    bad = write(tmp_path, "[upstream]\napi_keys = []\n", "bad.toml")
    serve = [sys.executable, "-m", "gateway", "serve", "--config", bad, "--port", str(free_port())]
    served = subprocess.run(serve, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert served.returncode == 2 and "upstream.api_keys" in served.stderr


# --- parse_config in process: defaults, substitution, every problem with its path ---------

BASE = {"upstream": {"base_url": "https://relay.example", "api_keys": ["sk-relay"]}}
KEY_A, KEY_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64
README_ROW = re.compile(r"^\| `([^`]+)` \| (.+?) \| .* \|$")


def parse(raw: dict[str, Any], environ: dict[str, str] | None = None, base_dir: Path = Path(".")) -> Config:
    return parse_config(raw, environ or {}, base_dir=base_dir)


def problems(raw: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(raw, environ)
    return caught.value.problems


def with_base(**sections: Any) -> dict[str, Any]:
    """BASE plus these sections; an `upstream` table is merged into BASE's."""
    raw: dict[str, Any] = {**BASE, **sections}
    raw["upstream"] = {**BASE["upstream"], **sections.get("upstream", {})}
    return raw


def test_a_minimal_file_gets_every_sections_defaults() -> None:
    cfg = parse(with_base(tenants=[{"id": "t"}]))
    assert cfg.upstream == UpstreamConfig(base_url="https://relay.example", api_keys=("sk-relay",))
    assert (cfg.server, cfg.store, cfg.pricing, cfg.webhooks) == (
        ServerConfig(),
        StoreConfig(),
        PricingConfig(),
        WebhookConfig(),
    )
    assert (cfg.admin_keys, cfg.metrics_bearer_token, cfg.jwt) == ((), "", None)
    assert cfg.tenants == (Tenant(id="t"),)
    assert cfg.tenants[0].limits == Limits() and all(v is None for v in vars(Limits()).values())  # unlimited
    jwt = parse(with_base(auth={"jwt": {"algorithms": ["HS256"], "secret": "s" * 32}})).jwt
    assert jwt == JWTConfig(algorithms=("HS256",), secret="s" * 32) and (jwt.tenant_claim, jwt.leeway_seconds) == (
        "tenant",
        30.0,
    )


def _documented(cfg: Config, key: str) -> Any:
    """The parsed value of a README key such as `server.max_body_bytes` or `tenants[].enabled`."""
    section, _, name = key.replace("tenants[].", "tenants.").partition(".")
    holder: Any = {
        "server": cfg.server,
        "upstream": cfg.upstream,
        "store": cfg.store,
        "pricing": cfg.pricing,
        "webhooks": cfg.webhooks,
        "tenants": cfg.tenants[0] if cfg.tenants else None,
        "auth": cfg,
    }.get(section)
    if section == "admin":
        return getattr(cfg, ADMIN_KEYS[name])
    if section == "metrics":
        return cfg.metrics_bearer_token
    for part in name.split("."):
        holder = getattr(holder, part)
    return holder


def _readme_value(text: str) -> Any:
    literal = text.strip("`")
    if literal in ("[]", "{}"):
        return {"[]": (), "{}": {}}[literal]
    if literal in ("true", "false"):
        return literal == "true"
    if literal == '""':
        return ""
    return float(literal) if re.fullmatch(r"\d+", literal) else literal


def test_the_readme_table_states_the_defaults_the_parser_gives() -> None:
    """README.md's configuration reference is what operators read: each default it states
    is the one a file without that key gets."""
    jwt = {"algorithms": ["HS256"], "secret": "s" * 32}
    cfg = parse(with_base(tenants=[{"id": "t"}], auth={"jwt": jwt}))
    rows = [m.groups() for line in (ROOT / "README.md").read_text().splitlines() if (m := README_ROW.match(line))]
    checked = []
    for key, default in rows:
        if default in ("—", "unlimited") or " / " in key or "*" in key:
            continue
        if not re.fullmatch(r"`[^`]*`", default):
            continue
        value = _documented(cfg, key)
        expected = _readme_value(default)
        assert value == expected, f"README says {key} defaults to {default}, the parser gives {value!r}"
        checked.append(key)
    assert len(checked) >= 30, checked  # the table was found and read
    # the rows written as `a` / `b` / `c`
    assert (cfg.pricing.gen2, cfg.pricing.upscale, cfg.pricing.interpolate) == (10, 5, 0)


def test_every_key_given_is_kept() -> None:
    """A file setting every key (none at its default) parses into exactly those values."""
    raw = {
        "server": {
            "public_url": "https://gw.example/",
            "max_body_bytes": 2048,
            "trusted_proxies": ["10.1.2.3", "10.0.0.7/8", "fd00::/8"],
            "signing_secret": "k" * 32,
            "log_level": "debug",
            "upload_ttl_seconds": 60,
            "header_timeout_seconds": 1.5,
            "body_timeout_seconds": 2,
            "keepalive_timeout_seconds": 3,
            "max_connections_per_worker": 7,
        },
        "upstream": {
            "base_url": "https://relay.example/",
            "api_keys": ["a", "b"],
            "timeout_seconds": 4,
            "status_path": "",
            "poll_interval_seconds": 6,
            "task_timeout_seconds": 7,
            "unknown_outcome_timeout_seconds": 8,
            "artifact_hosts": ["CDN.Example", "*.Files.Example"],
        },
        "store": {"url": "sqlite:///tmp/x.db"},
        "pricing": {"gen2": 1, "upscale": 2, "interpolate": 3, "refund_failed": False},
        "admin": {"keys": [KEY_A]},
        "metrics": {"bearer_token": "scrape-me"},
        "auth": {
            "jwt": {
                "algorithms": ["ES256"],
                "jwks_url": "https://idp.example/jwks",
                "issuer": "i",
                "audience": "a",
                "tenant_claim": "org",
                "leeway_seconds": 0,
            }
        },
        "tenants": [
            {
                "id": "team-x",
                "keys": [KEY_B],
                "webhook_secret": "w",
                "enabled": False,
                "limits": {name: i + 1 for i, name in enumerate(Limits.__dataclass_fields__)},
                "policy": {
                    "force": {"watermark": True},
                    "defaults": {"motion_score": 3},
                    "hook_hosts": ["Hooks.Example"],
                },
            }
        ],
        "webhooks": {"max_attempts": 3, "initial_backoff_seconds": 0.5, "max_backoff_seconds": 9},
    }
    cfg = parse(raw)
    assert cfg.server == ServerConfig(
        public_url="https://gw.example",
        max_body_bytes=2048,
        trusted_proxies=(ip_network("10.1.2.3/32"), ip_network("10.0.0.0/8"), ip_network("fd00::/8")),
        signing_secret="k" * 32,
        log_level="debug",
        upload_ttl_seconds=60.0,
        header_timeout_seconds=1.5,
        body_timeout_seconds=2.0,
        keepalive_timeout_seconds=3.0,
        max_connections_per_worker=7,
    )
    assert cfg.upstream == UpstreamConfig(
        base_url="https://relay.example",
        api_keys=("a", "b"),
        timeout_seconds=4.0,
        status_path="",
        poll_interval_seconds=6.0,
        task_timeout_seconds=7.0,
        unknown_outcome_timeout_seconds=8.0,
        artifact_hosts=("cdn.example", "*.files.example"),
    )
    assert (cfg.store, cfg.pricing) == (StoreConfig("sqlite:///tmp/x.db"), PricingConfig(1, 2, 3, False))
    assert (cfg.admin_keys, cfg.metrics_bearer_token) == ((KEY_A,), "scrape-me")
    assert cfg.jwt == JWTConfig(
        ("ES256",),
        jwks_url="https://idp.example/jwks",
        issuer="i",
        audience="a",
        tenant_claim="org",
        leeway_seconds=0.0,
    )
    assert cfg.tenants == (
        Tenant(
            "team-x",
            (KEY_B,),
            "w",
            False,
            Limits(1, 2, 3, 4, 5, 6),
            Policy(force={"watermark": True}, defaults={"motion_score": 3}, hook_hosts=("hooks.example",)),
        ),
    )
    assert cfg.webhooks == WebhookConfig(3, 0.5, 9.0)


def test_variables_are_substituted_in_every_string_before_validation() -> None:
    raw = with_base(
        server={"public_url": "https://${HOST}:${PORT:-8443}/"},
        upstream={"api_keys": ["${RELAY_KEY}", "${SECOND:-sk-fallback}"], "base_url": "${RELAY:-http://127.0.0.1:9}"},
        tenants=[{"id": "${TEAM}", "keys": ["sha256:${HASH}"], "webhook_secret": "${EMPTY:-}"}],
    )
    # as in a shell, `${NAME:-default}` takes the default when NAME is set but empty
    env = {"HOST": "gw.example", "RELAY_KEY": "sk-from-env", "TEAM": "team-env", "HASH": "c" * 64, "PORT": ""}
    cfg = parse(raw, env)
    assert cfg.server.public_url == "https://gw.example:8443"
    assert cfg.upstream.api_keys == ("sk-from-env", "sk-fallback") and cfg.upstream.base_url == "http://127.0.0.1:9"
    assert cfg.tenants[0] == Tenant("team-env", ("sha256:" + "c" * 64,), "")
    # a value from the environment is validated like one written in the file
    assert problems(with_base(server={"public_url": "${URL}"}), {"URL": "ftp://x"}) == [
        "server.public_url: must be an http(s) URL"
    ]
    # only `${NAME}` is special: `$NAME` and `${1X}` are literal text
    assert (
        parse(with_base(metrics={"bearer_token": "$TOKEN-${1X}"}), {"TOKEN": "no"}).metrics_bearer_token
        == "$TOKEN-${1X}"
    )


def test_unknown_keys_are_named_at_every_level() -> None:
    raw = with_base(
        serverr={},
        server={"port": 1},
        upstream={"retries": 2},
        store={"path": "x"},
        pricing={"free": 0},
        admin={"key": []},
        metrics={"token": ""},
        auth={"jwt": {"algorithms": ["HS256"], "secret": "s" * 32, "iss": "x"}, "basic": {}},
        webhooks={"retries": 1},
        tenants=[{"id": "t", "key": [], "limits": {"rpm": 1}, "policy": {"force": {"colour": "red"}, "allow": []}}],
    )
    assert sorted(problems(raw)) == sorted(
        [
            "serverr: unknown key",
            "server.port: unknown key",
            "upstream.retries: unknown key",
            "store.path: unknown key",
            "pricing.free: unknown key",
            "admin.key: unknown key",
            "metrics.token: unknown key",
            "auth.basic: unknown key",
            "auth.jwt.iss: unknown key",
            "webhooks.retries: unknown key",
            "tenants[0].key: unknown key",
            "tenants[0].limits.rpm: unknown key",
            "tenants[0].policy.allow: unknown key",
            "tenants[0].policy.force.colour: not a gen2Options field",
        ]
    )


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (with_base(server={"max_body_bytes": 0}), "server.max_body_bytes: must be a positive integer"),
        (with_base(server={"max_body_bytes": True}), "server.max_body_bytes: must be a positive integer"),
        (with_base(server={"body_timeout_seconds": "30"}), "server.body_timeout_seconds: must be a positive number"),
        (
            with_base(server={"trusted_proxies": ["10.0.0.1", "proxy.local"]}),
            "server.trusted_proxies[1]: must be an IP address or CIDR",
        ),
        (with_base(server={"log_level": "loud"}), "server.log_level: must be one of debug, error, info, warning"),
        (
            with_base(server={"signing_secret": "short"}),
            "server.signing_secret: must be at least 32 characters (or empty to let the store generate one)",
        ),
        (
            with_base(upstream={"status_path": "/tasks"}),
            "upstream.status_path: must be empty or a path starting with / that contains {id}",
        ),
        (with_base(upstream={"artifact_hosts": ["*."]}), "upstream.artifact_hosts: item 0 wildcard needs a suffix"),
        (with_base(pricing={"gen2": -1}), "pricing.gen2: must be a non-negative integer"),
        (with_base(pricing={"refund_failed": "yes"}), "pricing.refund_failed: must be true or false"),
        (
            with_base(admin={"keys": ["sha256:ABC"]}),
            'admin.keys: item 0 must be "sha256:<64 lowercase hex>" (make one with `runway-gateway new-key`)',
        ),
        (with_base(server=[]), "server: must be a table"),
        (with_base(tenants={"id": "t"}), "tenants: must be an array of tables ([[tenants]])"),
        (
            with_base(tenants=[{"id": "t"}, {"id": "u", "limits": {"max_active_tasks": 0}}]),
            "tenants[1].limits.max_active_tasks: must be a positive integer",
        ),
        (with_base(tenants=[{"id": "t"}, {"id": "t"}]), "tenants[1].id: duplicate tenant id 't'"),
        (
            with_base(tenants=[{"id": "t", "keys": [KEY_A]}, {"id": "u", "keys": [KEY_B, KEY_A]}]),
            "tenants[1].keys[1]: already used by tenant 't'",
        ),
        (with_base(tenants=[{"id": "Team A"}]), "tenants[0].id: must match [a-z0-9-]{1,64}"),
        (with_base(tenants=[{"id": "team-a\n"}]), "tenants[0].id: must match [a-z0-9-]{1,64}"),
        (with_base(tenants=[{"id": "t", "enabled": 1}]), "tenants[0].enabled: must be true or false"),
        (
            with_base(tenants=[{"id": "t", "policy": {"defaults": {"seed": "42"}}}]),
            "tenants[0].policy.defaults.seed: must be an integer",
        ),
        (
            with_base(tenants=[{"id": "t", "policy": {"defaults": {"seed": 2**32}}}]),
            "tenants[0].policy.defaults.seed: must be between 0 and 4294967295",
        ),
        (
            with_base(tenants=[{"id": "t", "policy": {"force": {"motion_score": -1}}}]),
            "tenants[0].policy.force.motion_score: must be between 0 and 100",
        ),
        (
            with_base(tenants=[{"id": "t", "policy": {"force": {"mode": "gen3"}}}]),
            'tenants[0].policy.force.mode: must be "gen2"',
        ),
        (
            with_base(tenants=[{"id": "t", "policy": {"defaults": {"image_prompt": "http://cdn.example/a.png"}}}]),
            "tenants[0].policy.defaults.image_prompt: must be an https:// URL",
        ),
        (
            with_base(tenants=[{"id": "t", "policy": {"force": {"text_prompt": "x" * 2001}}}]),
            "tenants[0].policy.force.text_prompt: must be at most 2000 characters",
        ),
        (
            with_base(tenants=[{"id": "t", "policy": {"force": {"upscale": 1}}}]),
            "tenants[0].policy.force.upscale: must be a boolean",
        ),
        (
            with_base(tenants=[{"id": "t", "policy": {"hook_hosts": ["a b"]}}]),
            "tenants[0].policy.hook_hosts: item 0 must be a host name, *.suffix, IP address or CIDR"
            " (host contains characters a host name cannot have)",
        ),
        (
            # what the SSRF rules cannot read is refused here, not at start
            with_base(upstream={"artifact_hosts": ["ok.example", "a..b"]}),
            "upstream.artifact_hosts: item 1 must be a host name, *.suffix, IP address or CIDR"
            " (host contains characters a host name cannot have)",
        ),
        (
            with_base(webhooks={"initial_backoff_seconds": 10, "max_backoff_seconds": 5}),
            "webhooks.max_backoff_seconds: must not be below initial_backoff_seconds",
        ),
        (
            with_base(auth={"jwt": {"algorithms": ["RS256"]}}),
            "auth.jwt: set exactly one of public_key_file, jwks_url or secret",
        ),
        (
            with_base(auth={"jwt": {"algorithms": [], "jwks_url": "https://idp.example/jwks"}}),
            "auth.jwt.algorithms: must list at least one algorithm",
        ),
        (
            with_base(auth={"jwt": {"algorithms": ["HS256"], "jwks_url": "https://idp.example/jwks"}}),
            "auth.jwt.algorithms: HS* algorithms need `secret`; "
            "with a public key or JWKS they would accept forged tokens",
        ),
        (
            with_base(auth={"jwt": {"algorithms": ["RS256", "HS256"], "secret": "s" * 32}}),
            "auth.jwt.algorithms: a shared secret works only with HS256/HS384/HS512",
        ),
        (
            with_base(auth={"jwt": {"algorithms": ["RS256"], "public_key_file": "missing.pem"}}),
            "auth.jwt.public_key_file: file missing.pem not found",
        ),
    ],
    ids=lambda v: v.split(":")[0] if isinstance(v, str) else "",
)
def test_each_bad_value_is_one_line_with_its_path(raw: dict[str, Any], problem: str) -> None:
    assert problems(raw) == [problem]


@pytest.mark.parametrize("value", [0, -1, "300"])
def test_an_unknown_outcome_timeout_must_be_positive(value: Any) -> None:
    assert problems(with_base(upstream={"unknown_outcome_timeout_seconds": value})) == [
        "upstream.unknown_outcome_timeout_seconds: must be a positive number"
    ]


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    raw = {
        "server": {"max_body_bytes": -1},
        "upstream": {"base_url": "ftp://x", "api_keys": []},
        "store": {"url": "mysql://x"},
        "tenants": [
            {"id": "ok", "keys": ["sha256:abc"]},
            {"id": "Bad Id", "limits": {"max_active_tasks": 0, "bogus": 1}},
        ],
        "auth": {"jwt": {"algorithms": ["none"], "secret": "${NOT_SET_ANYWHERE_XYZ}"}},
    }
    found = problems(raw)
    for expected in (
        "server.max_body_bytes: must be a positive integer",
        "upstream.base_url: must be an http(s) URL",
        "upstream.api_keys: must list at least one upstream API key",
        "store.url: must be sqlite:///PATH or redis",
        "tenants[0].keys: item 0 must be",
        "tenants[1].id: must match",
        "tenants[1].limits.max_active_tasks: must be a positive integer",
        "tenants[1].limits.bogus: unknown key",
        "auth.jwt.algorithms: unsupported algorithm(s) none (never 'none')",
        "auth.jwt.secret: environment variable NOT_SET_ANYWHERE_XYZ is not set",
    ):
        assert sum(p.startswith(expected) for p in found) == 1, (expected, found)


def test_a_bad_list_item_is_one_problem_without_a_follow_on() -> None:
    """A list with a bad item is reported by that item alone, not also as empty."""
    assert problems(with_base(upstream={"api_keys": [3]})) == ["upstream.api_keys: item 0 must be a non-empty string"]
    jwt = {"algorithms": ["none"], "secret": "s" * 32}
    assert problems(with_base(auth={"jwt": jwt})) == [
        "auth.jwt.algorithms: unsupported algorithm(s) none (never 'none')"
    ]


def rsa_public_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_relative_public_key_file_is_read_from_the_configs_directory(tmp_path: Path) -> None:
    (tmp_path / "idp.pem").write_bytes(rsa_public_pem())
    jwt = {"algorithms": ["RS256"], "public_key_file": "idp.pem"}
    assert parse(with_base(auth={"jwt": jwt}), base_dir=tmp_path).jwt.public_key_file == str(tmp_path / "idp.pem")


def test_a_jwt_key_file_without_a_usable_key_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    """check-config (and so start-up and SIGHUP, which load the same way) parses the key:
    a file that would turn every JWT into a 401 is refused with its key path."""
    (tmp_path / "idp.pem").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    (tmp_path / "ec.pem").write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "rsa.pem").write_bytes(rsa_public_pem())
    jwt = '[auth.jwt]\nalgorithms = ["{alg}"]\npublic_key_file = "{file}"\n'
    out = check_config(write(tmp_path, MINIMAL + jwt.format(alg="RS256", file="idp.pem")))
    assert out.returncode == 2
    assert out.stderr.startswith("auth.jwt.public_key_file: idp.pem: holds no public key usable with RS256 (expected")
    wrong_kind = check_config(write(tmp_path, MINIMAL + jwt.format(alg="RS256", file="ec.pem")))
    assert wrong_kind.returncode == 2
    assert "auth.jwt.public_key_file: ec.pem: holds no public key usable with RS256" in wrong_kind.stderr
    assert check_config(write(tmp_path, MINIMAL + jwt.format(alg="ES256", file="ec.pem"))).returncode == 0
    assert check_config(write(tmp_path, MINIMAL + jwt.format(alg="RS256", file="rsa.pem"))).returncode == 0


def test_catch_all_cidrs_are_refused_in_hook_hosts_and_artifact_hosts() -> None:
    raw = with_base(
        upstream={"artifact_hosts": ["cdn.internal", "::/0"]},
        tenants=[{"id": "t", "policy": {"hook_hosts": ["0.0.0.0/0"]}}],
    )
    found = problems(raw)
    assert len(found) == 2
    assert found[0].startswith("upstream.artifact_hosts: item 1 ::/0 is a catch-all (IPv4 prefixes shorter than /8")
    assert found[1].startswith("tenants[0].policy.hook_hosts: item 0 0.0.0.0/0 is a catch-all")
    ok = with_base(
        upstream={"artifact_hosts": ["10.0.0.0/8"]}, tenants=[{"id": "t", "policy": {"hook_hosts": ["fc00::/7"]}}]
    )
    assert parse(ok).tenants[0].policy.hook_hosts == ("fc00::/7",)
