"""Summarise a py-spy profile in collapsed-stack form (`py-spy record --format raw`).

    .venv/bin/python -m bench.profile_summary bench/results/profile-sqlite.txt [--top 20]

Prints where the on-CPU samples went: by area (the leaf frame's library), the top functions
by self time, and the gateway's own functions by inclusive time (a function counted once
per sample however deep it recurses). `bench/run.py --profile` writes the input.
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
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=20)
    a = p.parse_args(argv)
    print(summarise(a.profile, a.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
