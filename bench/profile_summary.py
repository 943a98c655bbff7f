"""Summarise a py-spy profile in collapsed-stack form (`py-spy record --format raw`).

    .venv/bin/python -m bench.profile_summary bench/results/profile-sqlite.txt [--top 20]
    .venv/bin/python -m bench.profile_summary OLD NEW --stages --cpu-us 550 590

Prints where the on-CPU samples went: by area (the leaf frame's library), the top functions
by self time, and the gateway's own functions by inclusive time (a function counted once
per sample however deep it recurses). `bench/run.py --profile` writes the input.

`--stages`: a create's stages instead (docs/benchmarks.md, "Per-create cost budget"): each
sample goes to the stage of its innermost frame that names one (STAGES), so the relay call
inside admission's caller counts as the relay call; with `--cpu-us`, the server's CPU per
request from the same run, each share is also given in µs per request.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# (substring of the frame's file path, area) - first match wins
AREAS = (
    ("gateway/store/sqlite", "store: SQLite (gateway code + sqlite3)"),
    ("sqlite3", "store: SQLite (gateway code + sqlite3)"),
    ("gateway/store/redis", "store: Redis (gateway code)"),
    ("redis/", "store: redis-py client"),
    ("gateway/upstream", "upstream client (gateway code)"),
    ("gateway/relays/", "upstream client (gateway code)"),
    ("aiohttp/", "upstream client: aiohttp"),
    ("yarl/", "upstream client: aiohttp"),
    ("multidict/", "upstream client: aiohttp"),
    ("gateway/middleware", "middleware: metrics + access log"),
    ("prometheus_client/", "metrics: prometheus_client"),
    ("gateway/logs", "logging"),
    ("logging/", "logging"),
    ("jwt/", "callback token: PyJWT"),
    ("hmac", "callback token: PyJWT"),
    ("gateway/tokens", "callback token: PyJWT"),
    ("gateway/", "gateway: other (routes, auth, validation, tasks)"),
    ("starlette/", "Starlette (routing, request, response)"),
    ("uvicorn/", "HTTP server: uvicorn"),
    ("h11/", "HTTP server: h11 parser"),
    ("httptools", "HTTP server: httptools"),
    ("asyncio/", "event loop: asyncio"),
    ("uvloop", "event loop: uvloop"),
    ("selectors", "event loop: asyncio"),
    ("uuid", "stdlib: uuid"),
    ("datetime", "stdlib: datetime"),
    ("dataclasses", "stdlib: dataclasses"),
)


# (file substring, function substring or "" for any, stage): tried in order on each frame
# from the leaf up; the first frame that matches gives the sample its stage. The store's
# helpers match nothing, so their samples go to the entry point that called them; a sample
# no frame matches is the event loop's when its leaf is the loop's, else "other".
STAGES: tuple[tuple[str, str, str], ...] = (
    ("gateway/middleware.py", "GatewayMiddleware._record", "access log + metrics"),
    ("gateway/logs.py", "", "access log + metrics"),
    ("gateway/metrics.py", "", "access log + metrics"),
    ("prometheus_client/", "", "access log + metrics"),
    ("gateway/store/sqlite", "GroupCommit.flush", "store: group COMMIT (admission + recording)"),
    ("gateway/store/sqlite", "GroupCommit._turn_ended", "store: group COMMIT (admission + recording)"),
    ("gateway/store/", ".apply_update", "recording"),
    ("gateway/store/", ".admit_create", "admission"),
    ("gateway/store/", ".take_request", "admission"),
    ("gateway/store/", ".read_task", "admission"),
    ("gateway/store/", ".idem_", "idempotency"),
    ("gateway/store/redis/client.py", "", "store: Redis client (replies)"),
    ("gateway/tasks.py", "TaskService.apply", "recording"),
    ("gateway/tasks.py", "public_task", "recording"),
    ("gateway/tokens.py", "", "relay call (incl. callback token)"),
    ("gateway/upstream.py", "", "relay call (incl. callback token)"),  # before contract §14
    ("gateway/relays/", "", "relay call (incl. callback token)"),
    ("aiohttp/", "", "relay call (incl. callback token)"),
    ("yarl/", "", "relay call (incl. callback token)"),
    ("multidict/", "", "relay call (incl. callback token)"),
    ("gateway/tasks.py", "TaskService.create", "admission"),
    ("gateway/tasks.py", "new_rid", "admission"),
    ("gateway/config.py", "", "admission"),  # the price
    ("gateway/gen2.py", "", "validation"),
    ("gateway/routes/common.py", "read_json", "validation"),
    ("gateway/services.py", "", "validation"),  # validate_hook
    ("gateway/ssrf.py", "", "validation"),
    ("gateway/idempotency.py", "", "idempotency"),
    ("gateway/routes/common.py", "create_once", "idempotency"),
    ("gateway/routes/common.py", "parsed_or_raw", "idempotency"),
    ("gateway/routes/common.py", "authenticate", "authentication"),
    ("gateway/auth.py", "", "authentication"),
    ("gateway/routes/common.py", "json_response", "response"),
    ("gateway/routes/", "", "route code (the rest)"),
    ("starlette/responses.py", "", "response"),
    ("uvicorn/protocols/http/httptools_impl.py", "RequestResponseCycle.send", "response"),
    ("gateway/middleware.py", "", "middleware"),
    ("gateway/quotas.py", "rate_headers", "middleware"),
    ("gateway/connections.py", "HeadHoldingTransport", "response"),  # the head and body write
    ("gateway/connections.py", "", "HTTP parse + routing"),
    ("starlette/", "", "HTTP parse + routing"),
    ("uvicorn/protocols/", "", "HTTP parse + routing"),
    ("httptools", "", "HTTP parse + routing"),
    ("gateway/app.py", "", "background workers"),  # the loops of `workers`
    ("gateway/webhooks.py", "", "background workers"),
    ("gateway/directory.py", "run_forever", "background workers"),
    ("gateway/store/sqlite", "checkpoint", "background workers"),
)
LOOP_FILES = ("asyncio/", "uvloop", "selectors")


def stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        m = FRAME.match(frame)
        if not m:
            continue
        func, file = m.group("func"), m.group("file")
        for needle, part, label in STAGES:
            if needle in file and part in func:
                return label
    leaf = FRAME.match(frames[-1]) if frames else None
    if leaf and any(f in leaf.group("file") for f in LOOP_FILES):
        return "event loop"
    return "other"


def stages(paths: list[Path], cpu_us: list[float]) -> str:
    """The share (and µs per request, given the server's CPU per request of each profile's
    run) of each stage of a request, one column per profile."""
    columns: list[tuple[int, Counter[str]]] = []
    for path in paths:
        by_stage: Counter[str] = Counter()
        for frames, count in parse(path):
            by_stage[stage(frames)] += count
        columns.append((sum(by_stage.values()), by_stage))
    order = sorted({label for _, c in columns for label in c}, key=lambda x: -columns[-1][1][x])
    with_us = len(cpu_us) == len(paths)
    head = "| stage |" + "".join(f" {p.stem} |" + (f" {p.stem} µs |" if with_us else "") for p in paths)
    out = [
        ", ".join(f"{p.name}: {total} samples" for p, (total, _) in zip(paths, columns, strict=True)),
        "",
        head,
        "|---|" + "---:|" * (len(paths) * (2 if with_us else 1)),
    ]
    for label in order:
        cells = []
        for i, (total, counts) in enumerate(columns):
            share = counts[label] / total if total else 0.0
            cells.append(f" {share:.1%} |" + (f" {share * cpu_us[i]:.0f} |" if with_us else ""))
        out.append(f"| {label} |" + "".join(cells))
    if with_us:
        out.append("| total |" + "".join(f" 100 % | {c:.0f} |" for c in cpu_us))
    return "\n".join(out) + "\n"


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def name(frame: str) -> tuple[str, str]:
    """(function (short file), file) without the line number."""
    m = FRAME.match(frame)
    if not m:
        return frame, ""
    file = m.group("file")
    short = file
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in short:
            short = short.split(marker, 1)[1]
            if marker == "/lib/python3":
                short = short.split("/", 1)[1] if "/" in short else short
    return f"{m.group('func')} ({short})", file


def area(file: str) -> str:
    for needle, label in AREAS:
        if needle in file:
            return label
    return "other"


def summarise(path: Path, top: int = 20) -> str:
    stacks = parse(path)
    total = sum(c for _, c in stacks)
    if not total:
        return f"{path}: no samples\n"
    by_area: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        leaf, leaf_file = name(frames[-1])
        by_area[area(leaf_file)] += count
        self_time[leaf] += count
        seen = set()
        for frame in frames:
            fn, file = name(frame)
            if "gateway/" in file and fn not in seen:
                seen.add(fn)
                inclusive[fn] += count
    out = [f"{path.name}: {total} samples on CPU", "", "| area (leaf frame) | share |", "|---|---:|"]
    out += [f"| {a} | {c / total:.1%} |" for a, c in by_area.most_common()]
    out += ["", "| top functions, self time | share |", "|---|---:|"]
    out += [f"| `{f}` | {c / total:.1%} |" for f, c in self_time.most_common(top)]
    out += ["", "| gateway functions, inclusive time | share |", "|---|---:|"]
    out += [f"| `{f}` | {c / total:.1%} |" for f, c in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path, nargs="+", help="one profile, or several with --stages")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--stages", action="store_true", help="a request's stages instead of areas and functions")
    p.add_argument(
        "--cpu-us", type=float, nargs="*", default=[], help="server CPU µs per request of each profile's run"
    )
    a = p.parse_args(argv)
    if a.stages:
        print(stages(a.profile, a.cpu_us), end="")
    else:
        for path in a.profile:
            print(summarise(path, a.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
