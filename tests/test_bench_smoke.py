"""The benchmark command runs and prints its table. No timing is asserted: only
that every target ran on a tiny load (`--quick`: 1 s each) and the table has its rows.

Redis rows are measured on the bench's own private redis-server (or on
GATEWAY_TEST_REDIS_URL when that is given, under a prefix of the bench's own): they must
not read `pending`, as every Redis-backed test fails rather than skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TARGETS = [
    "upstream alone",
    "floor: Starlette + aiohttp",
    "floor: Starlette + httpx",
    "gateway SQLite: create",
    "gateway SQLite: poll",
    "gateway Redis: create",
    "gateway Redis: poll",
    "upstream alone, 1 conn",
    "floor: Starlette + aiohttp, 1 conn",
    "gateway SQLite: create, 1 conn",
    "gateway Redis: create, 1 conn",
]
GOALS = [
    "SQLite creates / aiohttp floor",
    "SQLite polls / upstream alone",
    "SQLite p50 added at 1 connection",
    "Redis creates / SQLite creates",
    "Redis polls / SQLite polls",
    "aiohttp floor p50 added at 1 connection (context: a bare proxy)",
]
MEASURED = re.compile(
    r"^\| (?P<name>[^|]+?) \| (?P<conns>\d+) \| (?P<rps>[\d,]+) \| (?P<p50>[\d.]+) \| (?P<p99>[\d.]+) \| (?P<cpu>[\d,]+) \|"
)


def run_bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--no-save", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(stdout: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}


@pytest.mark.timeout(180)
def test_bench_prints_its_table() -> None:
    given = os.environ.get("GATEWAY_TEST_REDIS_URL")
    proc = run_bench(*(["--redis-url", given] if given else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    for name in TARGETS + GOALS:
        assert name in rows, f"row {name!r} missing from:\n{proc.stdout}"
    for name in TARGETS:
        m = MEASURED.match(rows[name])
        assert m is not None, rows[name]
        assert int(m["rps"].replace(",", "")) > 0, rows[name]  # it ran; how fast is not asserted
        assert rows[name].rstrip(" |").endswith("| 0"), f"errors during {name}: {rows[name]}"
    assert "Command: `.venv/bin/python bench/run.py --quick --no-save" in proc.stdout
    assert "Machine: " in proc.stdout


@pytest.mark.timeout(60)
def test_bench_runs_with_the_python_load_generator() -> None:
    """The fallback for machines without wrk."""
    proc = run_bench("--only", "upstream", "--loadgen", "python", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert MEASURED.match(rows["upstream alone"]), proc.stdout
    assert "bench/loadgen.py" in proc.stdout
    assert "| SQLite creates / aiohttp floor | pending |" in proc.stdout


@pytest.mark.timeout(90)
def test_bench_gateway_rows_run_with_a_store_tenant() -> None:
    """`--tenants store`: the bench tenant and its key are created through the admin API (no
    [[tenants]] entry for it), and the load authenticates with the minted key."""
    proc = run_bench("--only", "sqlite", "--tenants", "store", timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench tenant and key from the store (created through the admin API" in proc.stdout
    rows = table_rows(proc.stdout)
    for name in ("gateway SQLite: create", "gateway SQLite: poll", "gateway SQLite: create, 1 conn"):
        assert name in rows, f"row {name!r} missing from:\n{proc.stdout}\n{proc.stderr[-3000:]}"
        m = MEASURED.match(rows[name])
        assert m is not None, rows[name]
        assert int(m["rps"].replace(",", "")) > 0, rows[name]
        assert rows[name].rstrip(" |").endswith("| 0"), f"errors during {name}: {rows[name]}"


@pytest.mark.timeout(120)
def test_bench_compare_measures_a_commit_beside_the_working_tree() -> None:
    """`--compare REV`: REV in a scratch worktree and the working tree, each server running
    its own gateway package (the header names both paths), both sides' rows in the round,
    the ratios per side and new against old; the scratch worktree is gone afterwards."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    short = head.stdout.strip()
    proc = run_bench("--compare", "HEAD", "--rounds", "1", timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = f"old {short}"
    sides = re.search(r"^Sides: (.+)$", proc.stdout, re.M)
    assert sides is not None, proc.stdout
    paths = re.findall(r"\((/[^)]+/gateway/__init__\.py)\)", sides[1])
    assert len(paths) == 2, sides[1]
    assert f"/rev-{short}/gateway/__init__.py" in paths[0], paths
    assert paths[1] == str(ROOT / "gateway" / "__init__.py"), paths
    rows = table_rows(proc.stdout)
    for name in (
        "floor: Starlette + aiohttp",
        "relay alone",
        f"{old}: create",
        "new (working tree): create",
        f"{old}: poll",
        "new (working tree): poll",
        "relay alone, 1 conn",
        f"{old}: create, 1 conn",
        "new (working tree): create, 1 conn",
    ):
        m = MEASURED.match(rows.get(name, ""))
        assert m is not None, f"row {name!r} missing from:\n{proc.stdout}"
        assert int(m["rps"].replace(",", "")) > 0, rows[name]
        assert rows[name].rstrip(" |").endswith("| 0"), f"errors during {name}: {rows[name]}"
    for measure in ("creates / aiohttp floor", "polls / relay alone", "p50 added at 1 connection"):
        assert re.search(rf"^\| {measure} \| [\d.]+x? ?(ms)? \|", proc.stdout, re.M), measure
    assert re.search(r"^\| creates req/s \| [\d.]+x \| [\d.]+x \|$", proc.stdout, re.M), proc.stdout
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert f"rev-{short}" not in worktrees, worktrees


@pytest.mark.timeout(60)
def test_bench_says_when_a_gateway_refuses_several_relays() -> None:
    """`--relays 2` writes contract §14's [[relays]] (two simulators); a gateway without it
    leaves its rows pending with a plain message, not a traceback; one with it measures."""
    proc = run_bench("--only", "sqlite", "--relays", "2", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    if "refused the [[relays]] config of --relays 2" in proc.stderr:
        assert "| gateway SQLite: create | 32 | pending: this gateway refused the [[relays]]" in proc.stdout
        return
    m = MEASURED.match(rows.get("gateway SQLite: create", ""))
    assert m is not None and int(m["rps"].replace(",", "")) > 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.timeout(90)
def test_bench_key_limits_measures_a_limited_key_beside_one_without() -> None:
    """`--key-limits` (issue 24): one gateway, two store keys of its tenant, one with its own
    generous limits (the mint is checked to have stored them) and one without; creates with
    both in each round, both rows and with / without printed."""
    proc = run_bench("--key-limits", "--rounds", "2", timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the limited key's limits: requests_per_minute" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| key ")]
    assert len(lines) == 4, proc.stdout
    for label in ("key without limits: create", "key with limits: create"):
        for round_ in ("1", "2"):
            line = next((x for x in lines if x.startswith(f"| {label} | {round_} |")), "")
            cells = [c.strip() for c in line.split("|")[1:-1]]
            assert len(cells) == 10, f"{label} round {round_} missing from:\n{proc.stdout}"
            assert int(cells[3].replace(",", "")) > 0, line  # it ran; how fast is not asserted
            assert cells[-1] == "0", f"errors: {line}"
    assert re.search(r"^\| creates req/s \| [\d.]+x \| [\d.]+x \| [\d.]+x \|$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\| CPU per create \| [\d.]+x \| [\d.]+x \| [\d.]+x \|$", proc.stdout, re.M), proc.stdout
