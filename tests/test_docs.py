"""What README.md and docs/*.md state that the code can check: every route of the README's
API table is served, no metric is listed twice, every repository file named exists, and the
shell examples use the variables `runway-gateway demo` and `admin` use. (The README's
commands themselves run in tests/test_cli.py, against a demo.)"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT
from inprocess import gateway_config
from starlette.routing import Mount, Route

from gateway.app import create_app

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WRITTEN_BY_RUNS = ("bench/results/",)  # what a run writes (git-ignored), not files of the repository
ROUTE_ITEM = re.compile(r"^(?:((?:[A-Z]+, )*[A-Z]+) )?(/\S*)$")


def served(tmp_path: Path) -> set[tuple[str, str]]:
    """(METHOD, path with its parameters as `{}`) of every route the app serves."""
    app = create_app(gateway_config(tmp_path), background=False)
    routes: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            routes |= {(m, re.sub(r"\{[^}]*\}", "{}", route.path)) for m in route.methods or ()}
        else:
            assert isinstance(route, Mount), route
    return routes


def readme_routes() -> list[tuple[str, str]]:
    """The routes of README.md's "API summary" table, as (METHOD, path): in a cell's
    backquoted items a method carries over to the next item without one (`GET /healthz`,
    `/readyz`), `GET, POST /x` is both, `[/{id}]` is optional and a query string is dropped."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## API summary", 1)[1].split("\n\n", 2)[1]
    routes: list[tuple[str, str]] = []
    for row in table.splitlines()[2:]:
        methods = ["*"]
        for item in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            m = ROUTE_ITEM.match(item)
            assert m, f"README API table: {item!r} is not METHOD /path"
            methods = m.group(1).split(", ") if m.group(1) else methods
            path = re.sub(r"\{[^}]*\}", "{}", m.group(2).split("?", 1)[0])
            variants = [path.replace(opt, "") for opt in re.findall(r"\[[^]]*\]", path)] or [path]
            if "[" in path:
                variants.append(re.sub(r"[][]", "", path))
            routes += [(method, variant) for method in methods for variant in variants]
    return routes


def test_every_route_of_the_readme_api_table_is_served(tmp_path: Path) -> None:
    routes = readme_routes()
    assert len(routes) >= 30 and all(method != "*" for method, _ in routes), routes
    app = served(tmp_path)
    missing = [f"{method} {path}" for method, path in routes if (method, path) not in app]
    assert not missing, f"README.md's API table names routes the app does not serve: {missing}"


def test_no_metric_is_listed_twice_in_operations_md() -> None:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(gateway_[a-z_]+)` \| (?:counter|gauge|histogram) \|", text, re.M)
    assert len(rows) >= 10, rows
    twice = sorted({name for name in rows if rows.count(name) > 1})
    assert not twice, f"docs/operations.md lists these metrics more than once: {twice}"


def test_every_repository_file_the_docs_name_exists() -> None:
    named = {
        (doc.name, path)
        for doc in DOCS
        for path in re.findall(
            r"`((?:gateway|bench|tests|deploy|config|docs)/[\w./-]+\.[a-z]+)`", doc.read_text("utf-8")
        )
    }
    assert len(named) >= 10, named
    gone = sorted(
        f"{doc}: {path}" for doc, path in named if not (ROOT / path).exists() and not path.startswith(WRITTEN_BY_RUNS)
    )
    assert not gone, f"files named in the docs that do not exist: {gone}"


def test_shell_examples_use_the_variables_the_demo_exports() -> None:
    """The demo prints `export RUNWAY_GATEWAY_URL=... RUNWAY_GATEWAY_ADMIN_KEY=...`, which
    `runway-gateway admin` reads too: an example with other names fails after that line."""
    stray = [
        f"{doc.name}: {line.strip()}"
        for doc in DOCS
        for block in re.findall(r"```sh\n(.*?)```", doc.read_text("utf-8"), re.S)
        for line in block.splitlines()
        if re.search(r"\$(ADMIN_KEY|GATEWAY|GATEWAY_URL)\b", line)
    ]
    assert not stray, stray
