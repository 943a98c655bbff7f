"""`[[relays]]`, `[routing]` and `policy.relays` (contract §14): what loads, and every
mistake check-config explains with its key path; `policy.relays` through the admin API.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_KEY, free_port, key_hash
from inprocess import KEY, running

from gateway.config import ConfigError, RelayConfig, RoutingConfig, UpstreamConfig, parse_config
from gateway.relays import choice

ROOT = Path(__file__).resolve().parent.parent


def relay(relay_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": relay_id, "base_url": f"https://{relay_id}.example", "api_keys": [f"sk-{relay_id}"], **extra}


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ={})
    return info.value.problems


def test_relays_and_routing_load_with_the_upstream_defaults() -> None:
    cfg = parse_config(
        {
            "relays": [relay("main", priority=0, weight=3), relay("backup", priority=1, enabled=False)],
            "routing": {"max_attempts": 3, "cooldown_seconds": 30},
            "tenants": [{"id": "t", "policy": {"relays": ["backup"]}}],
        },
        environ={},
    )
    main, backup = cfg.relay_list
    assert main == RelayConfig(
        base_url="https://main.example", api_keys=("sk-main",), id="main", priority=0, weight=3, enabled=True
    )
    assert (backup.id, backup.priority, backup.weight, backup.enabled) == ("backup", 1, 1, False)
    assert backup.timeout_seconds == UpstreamConfig().timeout_seconds  # every [upstream] key, same defaults
    assert cfg.routing == RoutingConfig(max_attempts=3, cooldown_seconds=30.0)
    assert cfg.upstream == main  # the first relay's settings stand for the gateway-wide ones
    assert cfg.tenants[0].policy.relays == ("backup",)


def test_the_old_upstream_table_is_one_relay_named_default() -> None:
    cfg = parse_config({"upstream": {"base_url": "https://r.example", "api_keys": ["k"]}}, environ={})
    (only,) = cfg.relay_list
    assert (only.id, only.base_url, only.api_keys, only.priority, only.weight, only.enabled) == (
        "default",
        "https://r.example",
        ("k",),
        0,
        1,
        True,
    )
    assert cfg.routing == RoutingConfig(max_attempts=2, cooldown_seconds=10.0)  # the circuit's 10 s of old


@pytest.mark.parametrize(
    "raw,expected",
    [
        (
            {"upstream": {"base_url": "https://r.example", "api_keys": ["k"]}, "relays": [relay("a")]},
            "upstream: give either [upstream] (one relay) or [[relays]] blocks, not both",
        ),
        ({"relays": [relay("a"), relay("a")]}, "relays[1].id: duplicate relay id 'a'"),
        ({"relays": [relay("A_1")]}, "relays[0].id: required: must match [a-z0-9-]{1,32}"),
        ({"relays": [relay("x" * 33)]}, "relays[0].id: required: must match [a-z0-9-]{1,32}"),
        ({"relays": [{"base_url": "https://r.example", "api_keys": ["k"]}]}, "relays[0].id: required"),
        ({"relays": [relay("a", weight=0)]}, "relays[0].weight: must be an integer from 1 to 1000"),
        ({"relays": [relay("a", weight=1001)]}, "relays[0].weight: must be an integer from 1 to 1000"),
        ({"relays": [relay("a", priority="first")]}, "relays[0].priority: must be an integer"),
        ({"relays": [relay("a", enabled="no")]}, "relays[0].enabled: must be true or false"),
        ({"relays": [relay("a", colour="red")]}, "relays[0].colour: unknown key"),
        ({"relays": [relay("a", api_keys=[])]}, "relays[0].api_keys: must list at least one upstream API key"),
        ({"relays": [{"id": "a", "api_keys": ["k"]}]}, "relays[0].base_url: required"),
        ({"relays": [relay("a", timeout_seconds=0)]}, "relays[0].timeout_seconds: must be a positive number"),
        ({"relays": []}, "relays: must be one or more [[relays]] tables"),
        ({"relays": {"id": "a"}}, "relays: must be one or more [[relays]] tables"),
        ({"relays": [relay("a")], "routing": {"max_attempts": 0}}, "routing.max_attempts: must be a positive integer"),
        (
            {"relays": [relay("a")], "routing": {"cooldown_seconds": -1}},
            "routing.cooldown_seconds: must be a positive number",
        ),
        ({"relays": [relay("a")], "routing": {"retries": 2}}, "routing.retries: unknown key"),
        (
            {"relays": [relay("a"), relay("b")], "tenants": [{"id": "t", "policy": {"relays": ["a", "c"]}}]},
            "tenants[0].policy.relays[1]: unknown relay 'c' (configured: a, b)",
        ),
        (
            {
                "upstream": {"base_url": "https://r.example", "api_keys": ["k"]},
                "tenants": [{"id": "t", "policy": {"relays": ["backup"]}}],
            },
            "tenants[0].policy.relays[0]: unknown relay 'backup' (configured: default)",
        ),
        (
            {"relays": [relay("a")], "tenants": [{"id": "t", "policy": {"relays": "a"}}]},
            "tenants[0].policy.relays: must be an array",
        ),
    ],
)
def test_check_config_explains_every_mistake(raw: dict[str, Any], expected: str) -> None:
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found


def test_check_config_prints_the_relay_problems(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[[relays]]\nid = "a"\nbase_url = "https://a.example"\napi_keys = ["k"]\nweight = 5000\n'
        '[[relays]]\nid = "a"\nbase_url = "https://b.example"\napi_keys = ["k"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "relays[0].weight: must be an integer from 1 to 1000" in out
    assert "relays[1].id: duplicate relay id 'a'" in out


class Item:
    def __init__(self, id: str, priority: int = 0, weight: int = 1, available: bool = True):
        self.id, self.priority, self.weight, self.available = id, priority, weight, available


def test_choice_skips_unavailable_relays_and_tries_priorities_in_order() -> None:
    rng = random.Random(7)
    a, b, c = Item("a", 0, available=False), Item("b", 1), Item("c", 2)
    assert [x.id for x in choice.plan([a, b, c], rng)] == ["b", "c"]
    down = [Item("a", 1, available=False), Item("b", 0, available=False)]
    assert [x.id for x in choice.plan(down, rng)] == ["b", "a"]  # none ready: each answers for itself


def test_choice_spreads_by_weight() -> None:
    rng = random.Random(11)
    firsts = [choice.plan([Item("a", weight=3), Item("b", weight=1)], rng)[0].id for _ in range(4000)]
    assert 0.72 <= firsts.count("a") / 4000 <= 0.78


# --- policy.relays through the admin API -----------------------------------------------


def relays_config(tmp_path: Path) -> Any:
    raw = {
        "relays": [
            relay("a", base_url=f"http://127.0.0.1:{free_port()}"),
            relay("b", base_url=f"http://127.0.0.1:{free_port()}"),
        ],
        "store": {"url": f"sqlite:///{tmp_path / 'gateway.db'}"},
        "admin": {"keys": [key_hash(ADMIN_KEY)]},
        "tenants": [{"id": "team-a", "keys": [key_hash(KEY)], "policy": {"relays": ["b"]}}],
    }
    return parse_config(raw, environ={}, base_dir=tmp_path)


async def test_policy_relays_through_the_admin_api(tmp_path: Path) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with running(relays_config(tmp_path)) as run, run.client() as client:
        shown = (await client.get("/admin/v1/tenants/team-a", headers=admin)).json()
        assert shown["policy"]["relays"] == ["b"]  # a config tenant's
        made = await client.post("/admin/v1/tenants", headers=admin, json={"id": "kept", "policy": {"relays": ["a"]}})
        assert made.status_code == 201 and made.json()["policy"]["relays"] == ["a"], made.text
        patched = await client.patch("/admin/v1/tenants/kept", headers=admin, json={"policy": {"relays": ["b", "a"]}})
        assert patched.json()["policy"]["relays"] == ["b", "a"]
        assert (await client.get("/admin/v1/tenants/kept", headers=admin)).json()["policy"]["relays"] == ["b", "a"]
        cleared = await client.patch("/admin/v1/tenants/kept", headers=admin, json={"policy": {}})
        assert "relays" not in cleared.json()["policy"]  # every relay again
        for body in ({"id": "bad", "policy": {"relays": ["c"]}}, {"id": "bad", "policy": {"relays": [1]}}):
            refused = await client.post("/admin/v1/tenants", headers=admin, json=body)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"].startswith("policy.relays")
        assert (await client.get("/admin/v1/tenants/bad", headers=admin)).status_code == 404
        wrong = await client.patch("/admin/v1/tenants/kept", headers=admin, json={"policy": {"relays": ["zz"]}})
        assert wrong.status_code == 400 and "unknown relay 'zz'" in wrong.json()["error"]["message"]


def test_check_config_warns_when_no_relay_takes_new_tasks() -> None:
    from gateway.config import config_warnings

    drained = parse_config({"relays": [relay("a", enabled=False)]}, environ={})
    assert config_warnings(drained) == [
        "relays: every relay is drained (enabled = false): every create will be refused with 503"
    ]
    kept = parse_config(
        {"relays": [relay("a"), relay("b", enabled=False)], "tenants": [{"id": "t", "policy": {"relays": ["b"]}}]},
        environ={},
    )
    assert config_warnings(kept) == [
        "tenants[0].policy.relays: every relay it names is drained (enabled = false): "
        "every create of this tenant will be refused with 503"
    ]


def test_check_config_warns_when_a_relay_sets_a_gateway_wide_clock_of_its_own() -> None:
    from gateway.config import config_warnings

    same = parse_config({"relays": [relay("a"), relay("b")]}, environ={})
    assert config_warnings(same) == []
    differs = parse_config(
        {
            "relays": [
                relay("a", task_timeout_seconds=600),
                relay("b", task_timeout_seconds=900, poll_interval_seconds=2),
            ]
        },
        environ={},
    )
    assert config_warnings(differs) == [
        "relays[1].task_timeout_seconds: 900 differs from the first relay's (600), which applies to every task: "
        "set them equal",
        "relays[1].poll_interval_seconds: 2 differs from the first relay's (5), which applies to every task: "
        "set them equal",
    ]


def test_a_create_may_wait_on_every_key_of_each_relay_it_may_try() -> None:
    """The Idempotency-Key's lease and the sweep of lost reservations wait this long: with
    several relays a refused key moves the create to the relay's next key (§14), so each
    relay tried may take one timeout per key."""
    one = parse_config(
        {"upstream": {"base_url": "https://r.example", "api_keys": ["k1", "k2"], "timeout_seconds": 7}}, environ={}
    )
    assert one.create_seconds == 7  # one relay: its keys take turns, one call per create
    several = parse_config(
        {
            "relays": [
                relay("a", timeout_seconds=10, api_keys=["k1", "k2", "k3"]),
                relay("b", timeout_seconds=20),
                relay("c", timeout_seconds=5, api_keys=["k1", "k2"]),
            ],
            "routing": {"max_attempts": 2},
        },
        environ={},
    )
    assert several.create_seconds == 30 + 20  # the two slowest: a's 3 keys x 10 s, b's 1 x 20 s
