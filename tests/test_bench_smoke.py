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
    "gateway SQLite: create, 1 conn",
    "gateway Redis: create, 1 conn",
]
GOALS = [
    "SQLite creates / aiohttp floor",
    "SQLite polls / upstream alone",
    "SQLite p50 added at 1 connection",
    "Redis creates / SQLite creates",
    "Redis polls / SQLite polls",
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
