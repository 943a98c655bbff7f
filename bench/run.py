"""One command for the gateway's benchmarks (issue 7, docs/benchmarks.md).

    .venv/bin/python -m bench  |  .venv/bin/python bench/run.py [--duration S] [--connections C] [--quick]
                                            [--only upstream,floors,sqlite,redis] [--profile]
                                            [--tenants config|store]
    .venv/bin/python bench/run.py --soak 300 [--store sqlite|redis] [--soak-callbacks] [--tenants config|store]
    .venv/bin/python bench/run.py --compare REV [--rounds N] [--store sqlite|redis] [--relays N]
    .venv/bin/python bench/run.py --key-limits [--rounds N] [--store sqlite|redis] [--relays N]

Starts the upstream simulator in a fast mode (tasks take a day to finish, so no lifecycle
step and no callback happens during a run), then, one at a time, each target:

  upstream alone     wrk straight at the simulator's POST /runway/tasks
  floors             bench/floor_aiohttp.py, bench/floor_httpx.py (httpx's own transport and
                     the httpx-aiohttp transport): Starlette proxies with no checks at all
  gateway, SQLite    `runway-gateway serve`, 1 worker: creates through the full pipeline
                     (auth, admission on every limit, rewrite, callback token, upstream call,
                     record, metrics, access log) and status polls of one existing task
  gateway, Redis     the same on a private redis-server this run starts on a free port
                     (or `--redis-url`, used only under a key prefix of the run's own)
  1 connection       the upstream alone and both gateways, for the latency they add

and prints a markdown table and the issue's ratios. Per target: req/s; p50 and p99 as the
load generator reports them (wrk 4 adds its coordinated-omission correction to the
percentiles, so its p99 counts stalls as an open-loop client would feel them); CPU per
request of the server, of the simulator behind it and of the load generator (utime + stime
from /proc/<pid>/stat, and getrusage for the generator); how busy the machine was, and the
cores used by anything else meanwhile ("other load": other jobs on a shared machine make
a run noisy; rerun when it is not ~0). Load comes from wrk when it is on PATH
(bench/wrk_*.lua), else from bench/loadgen.py (slower; see its docstring). Each server
runs with this interpreter and environment, so `PYTHONPATH=<dir with httptools, uvloop>`
benchmarks uvicorn's faster HTTP stack; the header says which one ran.

The soak (`--soak SECONDS`) drives a gateway with a mixed load (1 create in 4, the rest
polls) and samples its RSS (/proc/<pid>/status) after a warm-up. The simulator drops its
callbacks unless `--soak-callbacks`: its callback client (httpx) is costly enough per
callback to make the simulator, not the gateway, the bottleneck.

The gateway's tenant has every limit set, generously: admission does all its work and never
refuses. `--tenants config` (the default) puts that tenant and its key in the config file's
[[tenants]]; `--tenants store` starts each gateway with only an admin key, creates the tenant
(the same limits and policy) and mints its key through the admin API, in that gateway's
store (SQLite or Redis), and drives the load with the minted key: it measures
authentication through the store-backed directory. The header says which.

Callbacks are on (`public_url` set, as in production: each create signs a callback token);
the background poller never calls the upstream during a run (poll interval 1 h).

`--key-limits` (issue 24): one gateway, its bench tenant in the store, two keys minted
through the admin API, one with its own limits (`KEY_LIMITS`: all six, generous, never
refusing) and one without; each round measures creates with both, the order alternating,
and prints both rows and with / without (req/s and CPU per create).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import importlib.util
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
UPSTREAM_KEY = "sk-sim-bench-upstream"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
FAST_SECONDS_TO_FINISH = 86400  # no lifecycle step, no callback during a run
SOAK_SECONDS_TO_FINISH = 2  # soak: tasks finish in the simulator (callbacks only with --soak-callbacks)
BODY = (
    '{"taskType":"gen2","internal":false,"options":{"name":"bench","gen2Options":{"mode":"gen2","seed":1,'
    '"interpolate":false,"upscale":false,"watermark":false,"motion_score":22,"use_motion_score":true,'
    '"use_motion_vectors":false,"text_prompt":"The wind blows hair up."},"exploreMode":false,'
    '"assetGroupName":"Generative Video"}}'
)
GROUPS = ("upstream", "floors", "sqlite", "redis")


# --- processes and /proc ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime in ticks) of one process, None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn --workers N forks them)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children[st[0]].append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    return sum((_stat(p) or (0, 0))[1] for p in tree(pid)) / CLK_TCK


def rss_kb(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Server:
    """A server under test: its own process group, output to a log file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        workdir: Path,
        port: int,
        ready_path: str,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ):
        self.name, self.args, self.port, self.ready_path, self.cwd = name, args, port, ready_path, cwd
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = http_request(self.url + self.ready_path, timeout=1.0)
                if status < 500:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} did not answer {self.ready_path} within {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def http_request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    host, _, rest = url.removeprefix("http://").partition("/")
    hostname, _, port = host.partition(":")
    conn = http.client.HTTPConnection(hostname, int(port or 80), timeout=timeout)
    try:
        conn.request(method, "/" + rest, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- load -----------------------------------------------------------------------------


@dataclass
class Load:
    connections: int
    duration: int
    threads: int
    generator: str  # "wrk" | "python"


def start_load(
    load: Load, url: str, mode: str, key: str, duration: int, connections: int, task_id: str = ""
) -> subprocess.Popen[str]:
    env = {**os.environ, "BENCH_KEY": key, "BENCH_BODY": BODY, "BENCH_TASK_ID": task_id}
    if load.generator == "wrk":
        script = {"post": "wrk_post.lua", "get": "wrk_get.lua", "mixed": "wrk_mixed.lua"}[mode]
        args = [
            "wrk",
            f"-t{min(load.threads, connections)}",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH / script),
            url,
        ]
    else:
        args = [
            PY,
            "-m",
            "bench.loadgen",
            "--url",
            url,
            "--mode",
            mode,
            "--key",
            key,
            "--connections",
            str(connections),
            "--duration",
            str(duration),
        ]
        if task_id:
            args += ["--task-id", task_id]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def finish_load(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(f"load generator printed no result (exit {proc.returncode}):\n{out[-2000:]}")


@dataclass
class Row:
    target: str
    connections: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us: float | None = None  # server CPU per request
    upstream_cpu_us: float | None = None  # the simulator's CPU per request (targets that call it)
    loadgen_cpu_us: float | None = None  # the load generator's CPU per request
    busy: float | None = None  # share of the machine's CPU time in use during the run (0..1)
    others: float | None = None  # cores used by everything else on the machine (noise)
    requests: int = 0
    errors: int = 0
    note: str = ""


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def measure(
    load: Load,
    name: str,
    server_pid: int,
    url: str,
    mode: str,
    key: str,
    *,
    connections: int | None = None,
    warmup: int = 0,
    task_id: str = "",
    upstream_pid: int | list[int] | None = None,
) -> Row:
    conns = connections or load.connections
    upstream_pids = [upstream_pid] if isinstance(upstream_pid, int) else upstream_pid or []
    if warmup:
        finish_load(start_load(load, url, mode, key, warmup, conns, task_id))
    cpu0 = cpu_seconds(server_pid)
    up0 = sum(cpu_seconds(p) for p in upstream_pids)
    gen0 = _children_cpu()
    busy0, total0 = machine_ticks()
    wall0 = time.monotonic()
    result = finish_load(start_load(load, url, mode, key, load.duration, conns, task_id))
    wall = time.monotonic() - wall0
    busy1, total1 = machine_ticks()
    gen = _children_cpu() - gen0  # the load generator is the only child reaped meanwhile
    cpu = cpu_seconds(server_pid) - cpu0
    up = sum(cpu_seconds(p) for p in upstream_pids) - up0
    n = result["requests"]
    errors = sum(v for k, v in result.items() if k.startswith("errors_"))
    per = (lambda seconds: seconds / n * 1e6) if n else (lambda seconds: None)
    row = Row(
        name,
        conns,
        rps=n / (result["duration_us"] / 1e6) if n else 0.0,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        cpu_us=per(cpu),
        upstream_cpu_us=per(up) if upstream_pids else None,
        loadgen_cpu_us=per(gen),
        busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else None,
        others=max(0.0, ((busy1 - busy0) / CLK_TCK - cpu - up - gen) / wall),
        requests=n,
        errors=errors,
    )
    print(
        f"  {name:<46} c={conns:<3} {row.rps:8.0f} req/s  p50 {row.p50_ms:6.2f} ms  p99 {row.p99_ms:7.2f} ms  "
        f"cpu {row.cpu_us or 0:5.0f} us/req  upstream {row.upstream_cpu_us or 0:4.0f}  "
        f"loadgen {row.loadgen_cpu_us or 0:4.0f}  "
        f"machine {row.busy or 0:4.0%}  others {row.others:.2f} cores  errors {errors}",
        file=sys.stderr,
        flush=True,
    )
    return row


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --- targets --------------------------------------------------------------------------


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


GATEWAY_CONFIG = """\
# Written by bench/run.py: every limit on and generous (admission works, never refuses).
[server]
public_url = "{public_url}"
max_body_bytes = 65536
log_level = "info"

{relays}
[store]
url = "{store}"
{bench_tenant}{idle_tenants}"""

# One relay: the single [upstream] table, in keys every version since 5f3e610 reads (so
# `--compare` can run them; no artifact is downloaded during a run).
UPSTREAM_TABLE = """
[upstream]
base_url = "{base_url}"
api_keys = ["{upstream_key}"]
timeout_seconds = 30
poll_interval_seconds = 3600
task_timeout_seconds = 86400
"""

# Several relays (`--relays N`): contract §14's [[relays]] blocks, one per simulator, all at
# one priority and weight (new tasks spread over them), and [routing]. A gateway without
# §14 refuses this config at start; `start_gateway` says so plainly.
RELAY_BLOCK = """
[[relays]]
id = "{id}"
base_url = "{base_url}"
api_keys = ["{upstream_key}"]
priority = 0
weight = 1
timeout_seconds = 30
poll_interval_seconds = 3600
task_timeout_seconds = 86400
artifact_hosts = ["127.0.0.1"]
"""
ROUTING = """
[routing]
max_attempts = 2
"""

# The bench tenant's limits and policy, the same whether it is in the config file or created
# through the admin API (`--tenants store`).
BENCH_LIMITS = {
    name: 1_000_000_000
    for name in (
        "requests_per_minute",
        "tasks_per_minute",
        "max_active_tasks",
        "tasks_per_day",
        "credits_per_day",
        "credits_per_month",
    )
}
BENCH_POLICY: dict[str, Any] = {"hook_hosts": ["127.0.0.1"], "defaults": {"watermark": False}}

CONFIG_TENANT = """
[[tenants]]
id = "bench"
keys = ["{key_hash}"]
webhook_secret = "{hook_secret}"
[tenants.limits]
{limits}
[tenants.policy]
hook_hosts = ["127.0.0.1"]
defaults = {{ watermark = false }}
"""

ADMIN_ONLY = """
[admin]
keys = ["{key_hash}"]
"""


def gateway_server(
    name: str,
    workdir: Path,
    upstreams: list[str],
    store: str,
    key: str,
    tenants: str,
    callbacks: bool = True,
    tree: Path = ROOT,
) -> Server:
    """A gateway whose bench tenant has `key` in its [[tenants]] entry (`tenants` "config"), or
    with no bench tenant and `key` as its admin key (`tenants` "store": `tenant_key` then
    creates the tenant and mints its key through the admin API). One relay per URL in
    `upstreams`. `tree` is the checkout whose `gateway` package runs (`--compare` runs an
    older one): the server starts in it with it first on PYTHONPATH, and prints the path of
    the package it imported as its log's first line (`gateway_path`)."""
    port = free_port()
    if tenants == "config":
        bench_tenant = CONFIG_TENANT.format(
            key_hash=key_hash(key),
            hook_secret=secrets.token_urlsafe(24),
            limits="\n".join(f"{k} = {v}" for k, v in BENCH_LIMITS.items()),
        )
    else:
        bench_tenant = ADMIN_ONLY.format(key_hash=key_hash(key))
    idle = "".join(
        f'\n[[tenants]]\nid = "idle-{i}"\nkeys = ["{key_hash(secrets.token_hex(16))}"]\n'
        f'webhook_secret = "{secrets.token_hex(16)}"\n'
        for i in range(3)
    )
    config = workdir / f"{name}.toml"
    config.write_text(
        GATEWAY_CONFIG.format(
            public_url=f"http://127.0.0.1:{port}" if callbacks else "",
            relays=relays_config(upstreams),
            store=store,
            bench_tenant=bench_tenant,
            idle_tenants=idle,
        )
    )
    return Server(
        name,
        [PY, "-c", SERVE_AND_SAY_WHERE, "serve", "--config", str(config), "--port", str(port)],
        workdir,
        port,
        "/readyz",
        env=code_env(tree),
        cwd=tree,
    )


# `python -m gateway serve`, after one line naming the gateway package this process imported
SERVE_AND_SAY_WHERE = (
    "import sys, gateway; print('BENCH_GATEWAY_PATH', gateway.__file__, flush=True); "
    "from gateway.cli import main; sys.exit(main())"
)


def code_env(tree: Path) -> dict[str, str]:
    """The environment that makes a Python process import `gateway` from `tree`: first on
    PYTHONPATH, ahead of the virtualenv's editable install of the working tree."""
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(tree) + (os.pathsep + rest if rest else "")}


def gateway_path(gw: Server) -> str:
    """The gateway package the running server imported (its log's BENCH_GATEWAY_PATH line)."""
    for line in gw.log.read_text(errors="replace").splitlines():
        if line.startswith("BENCH_GATEWAY_PATH "):
            return line.split(" ", 1)[1].strip()
    raise RuntimeError(f"{gw.name} did not say which gateway package it runs:\n{gw.log_tail()}")


def relays_config(upstreams: list[str]) -> str:
    """The config's relay part: the single [upstream] table for one relay, contract §14's
    [[relays]] and [routing] for more."""
    if len(upstreams) == 1:
        return UPSTREAM_TABLE.format(base_url=upstreams[0], upstream_key=UPSTREAM_KEY)
    blocks = "".join(
        RELAY_BLOCK.format(id=f"bench-{chr(ord('a') + i)}", base_url=url, upstream_key=UPSTREAM_KEY)
        for i, url in enumerate(upstreams)
    )
    return blocks + ROUTING


def start_gateway(gw: Server, relays: int) -> None:
    """Start a gateway; with several relays, a refusal of [[relays]] gets a plain message."""
    try:
        gw.start()
    except RuntimeError as exc:
        if relays > 1 and "relays" in str(exc):
            raise RuntimeError(
                f"this gateway refused the [[relays]] config of --relays {relays} (contract §14: it needs the "
                f"several-relays support); run with --relays 1. Its words:\n{str(exc)[-600:]}"
            ) from None
        raise


def simulator(workdir: Path, seconds_to_finish: float, name: str = "simulator") -> Server:
    port = free_port()
    return Server(
        name,
        [
            PY,
            "-m",
            "gateway",
            "simulate-upstream",
            "--port",
            str(port),
            "--seconds-to-finish",
            str(seconds_to_finish),
            "--api-key",
            UPSTREAM_KEY,
        ],
        workdir,
        port,
        "/_sim/control",
    )


def tenant_key(gw: Server, tenants: str, key: str, timeout: float = 10.0) -> str:
    """The key the load carries. Config tenants: `key` itself. Store tenants: with `key` as
    the admin key, create the bench tenant and mint its key through the admin API, then poll
    until the gateway accepts that key (its directory picks store changes up within a moment)."""
    if tenants == "config":
        return key
    admin = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    tenant = {"id": "bench", "limits": BENCH_LIMITS, "policy": BENCH_POLICY}
    admin_call(gw.url + "/admin/v1/tenants", tenant, admin, ok=(201, 409))  # 409: an earlier target's store
    return mint_key(gw, key, {"name": "bench-load"}, timeout)


def mint_key(gw: Server, admin_key: str, body: dict[str, Any], timeout: float = 10.0) -> str:
    """Mint a key of the bench tenant (`body`: the admin API's, name and perhaps limits),
    then poll until the gateway accepts it (its directory picks store changes up soon)."""
    admin = {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"}
    minted = admin_call(gw.url + "/admin/v1/tenants/bench/keys", body, admin)
    stored = {k: v for k, v in minted.get("limits", {}).items() if v is not None}
    if stored != body.get("limits", {}):
        raise RuntimeError(f"the minted key's limits are {stored}, not {body.get('limits', {})}")
    secret = str(minted["secret"])
    deadline = time.monotonic() + timeout
    while True:
        status, body = http_request(gw.url + "/runway/tasks", headers={"Authorization": f"Bearer {secret}"})
        if status == 200:
            return secret
        if status != 401 or time.monotonic() > deadline:
            raise RuntimeError(f"the minted key was not accepted ({status}): {body[:300]!r}")
        time.sleep(0.02)


def admin_call(
    url: str, payload: dict[str, Any], headers: dict[str, str], ok: tuple[int, ...] = (201,)
) -> dict[str, Any]:
    """POST to the admin API; the answer's JSON, or RuntimeError unless its status is `ok`."""
    status, body = http_request(url, "POST", json.dumps(payload).encode(), headers)
    if status not in ok:
        raise RuntimeError(f"admin API {url.split('/admin/', 1)[1]} answered {status}: {body[:300]!r}")
    answer: dict[str, Any] = json.loads(body)
    return answer


def tenants_text(tenants: str) -> str:
    """Where the bench tenant and its key came from, for the table's header."""
    if tenants == "store":
        return "bench tenant and key from the store (created through the admin API; no [[tenants]] entry)"
    return "bench tenant and key from the config file ([[tenants]])"


def reset_simulator(sim: Server) -> None:
    """Forget earlier targets' tasks, so each target meets the same upstream."""
    http_request(sim.url + "/_sim/reset", "POST", timeout=60)


def simulators(workdir: Path, seconds_to_finish: float, relays: int) -> list[Server]:
    """One simulator per relay; the first is also "upstream alone"."""
    return [simulator(workdir, seconds_to_finish, "simulator" + (f"-{i + 1}" if i else "")) for i in range(relays)]


def reset_simulators(sims: list[Server]) -> None:
    for sim in sims:
        reset_simulator(sim)


def create_one(gw_url: str, key: str) -> str:
    status, body = http_request(
        gw_url + "/runway/tasks",
        "POST",
        BODY.encode(),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    if status != 200:
        raise RuntimeError(f"the gateway refused a create ({status}): {body[:300]!r}")
    return json.loads(body)["task"]["id"]


class BenchRedis:
    """The Redis of the Redis rows and the soak, touching only what the run made: a private
    `redis-server` on a free port in the work directory (nothing saved, stopped at the end),
    or the one `--redis-url` names. Each gateway gets a fresh key prefix whose keys are
    deleted after it (never FLUSHDB), so a given Redis keeps everything else."""

    def __init__(self, given: str, workdir: Path):
        self.given, self.workdir = given, workdir
        self.url = given
        self.proc: subprocess.Popen[bytes] | None = None
        self.problem: str | None = "not started"

    def start(self) -> str | None:
        """None when Redis answers, else why not (the Redis rows then read pending)."""
        self.problem = self._start()
        return self.problem

    def _start(self) -> str | None:
        try:
            import redis
        except ImportError:
            return "redis-py not installed"
        if not self.given:
            binary = shutil.which("redis-server")
            if binary is None:
                return "redis-server not installed (apt-get install redis-server)"
            port = free_port()
            self.url = f"redis://127.0.0.1:{port}/0"
            with open(self.workdir / "redis.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(self.workdir),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
                return None
            except Exception as exc:  # any failure just marks the Redis rows pending
                if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                    return f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)

    def store_url(self) -> tuple[str, str]:
        """A store URL with a prefix of its own, and that prefix (for `forget`)."""
        prefix = f"bench-{secrets.token_hex(4)}:"
        return f"{self.url}{'&' if '?' in self.url else '?'}prefix={prefix}", prefix

    def forget(self, prefix: str) -> None:
        """Delete the keys under `prefix`: the Redis is as it was before that gateway."""
        import redis

        r = redis.Redis.from_url(self.url)
        for batch in _batches(r.scan_iter(match=prefix + "*", count=1000), 1000):
            r.delete(*batch)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


def _batches(items: Any, size: int) -> Any:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_gateway(
    load: Load,
    rows: list[Row],
    lat_rows: list[Row],
    label: str,
    workdir: Path,
    sims: list[Server],
    store: str,
    warmup: int,
    profile: bool,
    tenants: str,
) -> None:
    key = "sk-gw-bench-" + secrets.token_urlsafe(24)
    gw = gateway_server(f"gateway-{label.lower()}", workdir, [s.url for s in sims], store, key, tenants)
    names = (f"gateway {label}: create", f"gateway {label}: poll", f"gateway {label}: create, 1 conn")
    sim_pids = [s.pid for s in sims]
    try:
        start_gateway(gw, len(sims))
        key = tenant_key(gw, tenants, key)
        task_id = create_one(gw.url, key)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        print(f"  gateway {label} not measured: {exc}", file=sys.stderr)
        note = "pending: " + str(exc).splitlines()[0][:120]
        rows += [Row(names[0], load.connections, note=note), Row(names[1], load.connections, note=note)]
        lat_rows.append(Row(names[2], 1, note=note))
        gw.stop()
        return
    try:
        reset_simulators(sims)
        spy = _start_profile(gw, load, workdir, label) if profile else None
        rows.append(
            measure(load, names[0], gw.pid, gw.url + "/runway/tasks", "post", key, warmup=warmup, upstream_pid=sim_pids)
        )
        if spy is not None:
            _finish_profile(spy, workdir, label)
        rows.append(
            measure(
                load,
                names[1],
                gw.pid,
                f"{gw.url}/runway/tasks/{task_id}",
                "get",
                key,
                warmup=warmup,
                upstream_pid=sim_pids,
            )
        )
        reset_simulators(sims)
        lat_rows.append(
            measure(
                load,
                names[2],
                gw.pid,
                gw.url + "/runway/tasks",
                "post",
                key,
                connections=1,
                warmup=warmup,
                upstream_pid=sim_pids,
            )
        )
        errors = [line for line in gw.log_tail(20000).splitlines() if '"level":"error"' in line]
        if errors:
            print(f"  gateway {label} logged errors, e.g. {errors[-1][:300]}", file=sys.stderr)
    finally:
        gw.stop()


PROFILE_RATE = 500  # py-spy samples per second (nonblocking: the server is never paused)


def _start_profile(gw: Server, load: Load, workdir: Path, label: str) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        print("  --profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return None
    out = workdir / f"profile-{label.lower()}.txt"
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(gw.pid),
            "--duration",
            str(load.duration + 1),
            "--rate",
            str(PROFILE_RATE),
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _finish_profile(spy: subprocess.Popen[bytes], workdir: Path, label: str) -> None:
    spy.wait(timeout=120)
    src = workdir / f"profile-{label.lower()}.txt"
    if not src.exists():
        print("  --profile: py-spy wrote nothing (ptrace not permitted?)", file=sys.stderr)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / src.name
    shutil.copy(src, dest)
    print(
        f"  profile (collapsed stacks) in {dest}; summary: .venv/bin/python -m bench.profile_summary {dest}",
        file=sys.stderr,
    )


# --- the table ------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "pending" if v is None else format(v, spec)


def _find(rows: list[Row], name: str) -> Row | None:
    return next((r for r in rows if r.target == name and r.rps), None)


# (what, kind, numerator row, denominator row, target): issue 23's goals, and with no
# target the context they are read against
GOALS: tuple[tuple[str, str, str, str, float | None], ...] = (
    ("SQLite creates / aiohttp floor", "ratio", "gateway SQLite: create", "floor: Starlette + aiohttp", 0.6),
    ("SQLite polls / upstream alone", "ratio", "gateway SQLite: poll", "upstream alone", 0.5),
    ("SQLite p50 added at 1 connection", "added", "gateway SQLite: create, 1 conn", "upstream alone, 1 conn", 0.6),
    ("Redis creates / SQLite creates", "ratio", "gateway Redis: create", "gateway SQLite: create", 0.9),
    ("Redis polls / SQLite polls", "ratio", "gateway Redis: poll", "gateway SQLite: poll", 0.9),
    ("Redis p50 added at 1 connection", "added", "gateway Redis: create, 1 conn", "upstream alone, 1 conn", 0.6),
    # no target: what the goals are measured against, a bare proxy in the same round
    (
        "aiohttp floor p50 added at 1 connection (context: a bare proxy)",
        "added",
        "floor: Starlette + aiohttp, 1 conn",
        "upstream alone, 1 conn",
        None,
    ),
)


def goal_value(rows: list[Row], kind: str, num: str, den: str) -> tuple[float, str] | None:
    """A goal's value in one round, with how it was computed; None when a row is missing."""
    a, b = _find(rows, num), _find(rows, den)
    if a is None or b is None or not b.rps:
        return None
    if kind == "ratio":
        return (a.rps or 0) / b.rps, f"{(a.rps or 0) / b.rps:.2f}x ({a.rps:,.0f} / {b.rps:,.0f})"
    d = (a.p50_ms or 0) - (b.p50_ms or 0)
    return d, f"{d:.2f} ms ({a.p50_ms:.2f} - {b.p50_ms:.2f})"


def _target(kind: str, goal: float | None) -> str:
    if goal is None:
        return "-"
    return f">= {goal:g}x" if kind == "ratio" else f"<= {goal:g} ms"


def _met(kind: str, value: float, goal: float | None) -> str:
    if goal is None:
        return "-"
    return "yes" if (value >= goal if kind == "ratio" else value <= goal) else "**no**"


def ratios(rows: list[Row]) -> list[tuple[str, str, str, str]]:
    """(what, measured, goal, met) for the issue's targets, from one round."""
    out = []
    for what, kind, num, den, goal in GOALS:
        v = goal_value(rows, kind, num, den)
        out.append(
            (what, v[1], _target(kind, goal), _met(kind, v[0], goal))
            if v
            else (what, "pending", _target(kind, goal), "pending" if goal is not None else "-")
        )
    return out


def rounds_table(rounds: list[list[Row]]) -> list[str]:
    """The goals over several rounds: each round's value and the median, which decides."""
    n = len(rounds)
    lines = [
        "| goal | " + " | ".join(f"round {i + 1}" for i in range(n)) + " | median | target | met (median) |",
        "|---|" + "---:|" * (n + 1) + "---|---|",
    ]
    for what, kind, num, den, goal in GOALS:
        values = [goal_value(rows, kind, num, den) for rows in rounds]
        if any(v is None for v in values):
            lines.append(
                f"| {what} | "
                + " | ".join("pending" for _ in values)
                + f" | pending | {_target(kind, goal)} | {'pending' if goal is not None else '-'} |"
            )
            continue
        nums = [v[0] for v in values if v]
        med = statistics.median(nums)
        unit = "x" if kind == "ratio" else " ms"
        lines.append(
            f"| {what} | "
            + " | ".join(f"{x:.2f}{unit}" for x in nums)
            + f" | {med:.2f}{unit} | {_target(kind, goal)} | {_met(kind, med, goal)} |"
        )
    return lines


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Linux {platform.release()}, Python {platform.python_version()}"


def stack() -> str:
    http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    import uvicorn

    return f"uvicorn {uvicorn.__version__} ({http_impl}, {loop} loop), 1 worker each"


def generator_text(load: Load) -> str:
    if load.generator == "wrk":
        version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0].strip() or "wrk"
        return f"{version}, {load.threads} thread{'s' if load.threads > 1 else ''}, {load.duration} s per target"
    return f"bench/loadgen.py (fallback: wrk not found), {load.duration} s per target"


def render(
    rows: list[Row], lat_rows: list[Row], load: Load, command: str, started: dt.datetime, warmup: int, tenants: str
) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Machine: {machine()}  ",
        f"Servers: {stack()}; {tenants_text(tenants)}; "
        f"simulator tasks finish after {FAST_SECONDS_TO_FINISH} s (no callbacks during a run)  ",
        f"Load: {generator_text(load)} (+{warmup} s warm-up), {load.connections} connections unless the row says 1",
        "",
        "| target | conns | req/s | p50 ms | p99 ms | server CPU µs/req | upstream CPU µs/req | load gen CPU µs/req "
        "| machine busy | other load (cores) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows + lat_rows:
        if r.note:
            lines.append(f"| {r.target} | {r.connections} | {r.note} | | | | | | | | |")
            continue
        upstream_cpu = "—" if r.upstream_cpu_us is None else f"{r.upstream_cpu_us:,.0f}"
        lines.append(
            f"| {r.target} | {r.connections} | {_fmt(r.rps, ',.0f')} | {_fmt(r.p50_ms, '.2f')} | "
            f"{_fmt(r.p99_ms, '.2f')} | "
            f"{_fmt(r.cpu_us, ',.0f')} | {upstream_cpu} | {_fmt(r.loadgen_cpu_us, ',.0f')} | {_fmt(r.busy, '.0%')} | "
            f"{_fmt(r.others, '.2f')} | {r.errors} |"
        )
    lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ratios(rows + lat_rows)]
    return "\n".join(lines) + "\n"


def render_rounds(
    results: list[tuple[list[Row], list[Row]]],
    load: Load,
    command: str,
    started: dt.datetime,
    warmup: int,
    tenants: str,
) -> str:
    """Each round's table, then the goals over the rounds (median decides)."""
    parts = []
    for i, (rows, lat_rows) in enumerate(results):
        table = render(rows, lat_rows, load, command, started, warmup, tenants)
        if i:
            table = table.split("\n\n", 1)[1]  # the header once
        parts.append(
            f"Round {i + 1}:\n\n" + table if i else table.replace("\n\n| target", "\n\nRound 1:\n\n| target", 1)
        )
    summary = [
        f"Goals over {len(results)} rounds (each ratio taken within its round):",
        "",
        *rounds_table([rows + single for rows, single in results]),
    ]
    return "\n".join(parts) + "\n" + "\n".join(summary) + "\n"


# --- the runs -------------------------------------------------------------------------


def tear_down(servers: list[Server], redis: BenchRedis, prefixes: list[str], workdir: Path, keep: bool) -> None:
    """The end of every mode: stop the servers, forget the run's keys in a Redis that is
    not its own (`prefixes`; "" for none), stop its own redis-server, and remove `workdir`
    unless `keep` (asked for, or the run failed: its logs say why)."""
    for server in servers:
        server.stop()
    for prefix in prefixes:
        if prefix:
            redis.forget(prefix)
    redis.stop()
    if keep:
        print(f"logs and configs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def bench(args: argparse.Namespace, load: Load, command: str) -> int:
    started = dt.datetime.now(dt.UTC)
    groups = set(args.only.split(",")) if args.only else set(GROUPS)
    unknown = groups - set(GROUPS)
    if unknown:
        print(
            f"--only: unknown group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}", file=sys.stderr
        )
        return 2
    warmup = 0 if args.quick else args.warmup
    workdir = Path(tempfile.mkdtemp(prefix="runway-bench-"))
    results: list[tuple[list[Row], list[Row]]] = []  # (rows, 1-connection rows) per round
    sims = simulators(workdir, FAST_SECONDS_TO_FINISH, args.relays)
    servers: list[Server] = [*sims]
    redis = BenchRedis(args.redis_url, workdir)
    ok = False
    try:
        for sim in sims:
            sim.start()
        if "redis" in groups:
            redis.start()
        for round_ in range(args.rounds):
            if args.rounds > 1:
                print(f"round {round_ + 1} of {args.rounds}", file=sys.stderr)
            rows: list[Row] = []
            lat_rows: list[Row] = []
            results.append((rows, lat_rows))
            bench_round(args, load, groups, workdir, sims, servers, rows, lat_rows, warmup, redis)
        ok = True
    finally:
        tear_down(servers, redis, [], workdir, keep=args.keep or not ok)
    if len(results) == 1:
        table = render(*results[0], load, command, started, warmup, args.tenants)
    else:
        table = render_rounds(results, load, command, started, warmup, args.tenants)
    print(table, flush=True)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latest.md").write_text(table)
        (RESULTS / "latest.json").write_text(
            json.dumps(
                {
                    "date": started.isoformat(),
                    "command": command,
                    "machine": machine(),
                    "tenants": args.tenants,
                    "rounds": [[asdict(r) for r in rows + lat] for rows, lat in results],
                },
                indent=2,
            )
        )
    return 0


def bench_round(
    args: argparse.Namespace,
    load: Load,
    groups: set[str],
    workdir: Path,
    sims: list[Server],
    servers: list[Server],
    rows: list[Row],
    lat_rows: list[Row],
    warmup: int,
    redis: BenchRedis,
) -> None:
    """One round: every selected target once, in the order of the table."""
    sim = sims[0]
    if "upstream" in groups:
        rows.append(
            measure(load, "upstream alone", sim.pid, sim.url + "/runway/tasks", "post", UPSTREAM_KEY, warmup=warmup)
        )
        reset_simulator(sim)
        lat_rows.append(
            measure(
                load,
                "upstream alone, 1 conn",
                sim.pid,
                sim.url + "/runway/tasks",
                "post",
                UPSTREAM_KEY,
                connections=1,
                warmup=warmup,
            )
        )
    if "floors" in groups:
        floors = [
            ("floor: Starlette + aiohttp", "floor_aiohttp.py", []),
            ("floor: Starlette + httpx", "floor_httpx.py", []),
        ]
        if importlib.util.find_spec("httpx_aiohttp"):
            floors.append(("floor: Starlette + httpx-aiohttp transport", "floor_httpx.py", ["--transport", "aiohttp"]))
        for name, script, extra in floors:
            reset_simulator(sim)
            port = free_port()
            floor = Server(
                script.removesuffix(".py") + "".join(extra[1:]),
                [
                    PY,
                    str(BENCH / script),
                    "--port",
                    str(port),
                    "--upstream",
                    sim.url,
                    "--api-key",
                    UPSTREAM_KEY,
                    *extra,
                ],
                workdir,
                port,
                "/healthz",
            )
            servers.append(floor)
            floor.start()
            try:
                rows.append(
                    measure(
                        load,
                        name,
                        floor.pid,
                        floor.url + "/runway/tasks",
                        "post",
                        UPSTREAM_KEY,
                        warmup=warmup,
                        upstream_pid=sim.pid,
                    )
                )
                if script == "floor_aiohttp.py":  # what a bare proxy adds at one connection
                    reset_simulator(sim)
                    lat_rows.append(
                        measure(
                            load,
                            name + ", 1 conn",
                            floor.pid,
                            floor.url + "/runway/tasks",
                            "post",
                            UPSTREAM_KEY,
                            connections=1,
                            warmup=warmup,
                            upstream_pid=sim.pid,
                        )
                    )
            finally:
                floor.stop()
    if "sqlite" in groups:
        store = f"sqlite:///{workdir / 'gateway.db'}"
        run_gateway(load, rows, lat_rows, "SQLite", workdir, sims, store, warmup, args.profile, args.tenants)
    if "redis" in groups:
        if redis.problem:
            note = f"pending: Redis {redis.url or '(private redis-server)'} not usable ({redis.problem[:80]})"
            print(f"  {note}", file=sys.stderr)
            rows += [
                Row("gateway Redis: create", load.connections, note=note),
                Row("gateway Redis: poll", load.connections, note=note),
            ]
            lat_rows.append(Row("gateway Redis: create, 1 conn", 1, note=note))
        else:
            store, prefix = redis.store_url()
            try:
                run_gateway(load, rows, lat_rows, "Redis", workdir, sims, store, warmup, args.profile, args.tenants)
            finally:
                redis.forget(prefix)


def soak(args: argparse.Namespace, load: Load, command: str) -> int:
    """Mixed load (1 create in 4, the rest polls; callbacks settle tasks as they go) for
    `--soak` seconds, sampling the gateway's RSS; reports start (after a warm-up), end, peak."""
    started = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="runway-soak-"))
    sims = simulators(workdir, SOAK_SECONDS_TO_FINISH, args.relays)
    key = "sk-gw-bench-" + secrets.token_urlsafe(24)
    redis = BenchRedis(args.redis_url, workdir)
    prefix = ""
    if args.store == "redis":
        problem = redis.start()
        if problem:
            redis.stop()
            print(f"Redis {args.redis_url or '(private redis-server)'} not usable: {problem}", file=sys.stderr)
            return 2
        store, prefix = redis.store_url()
    else:
        store = f"sqlite:///{workdir / 'gateway.db'}"
    gw = gateway_server("gateway-soak", workdir, [s.url for s in sims], store, key, args.tenants)
    ok = False
    try:
        for sim in sims:
            sim.start()
            if not args.soak_callbacks:
                http_request(
                    sim.url + "/_sim/control", "POST", b'{"drop_callbacks": true}', {"Content-Type": "application/json"}
                )
        start_gateway(gw, args.relays)
        key = tenant_key(gw, args.tenants, key)
        task_id = create_one(gw.url, key)
        warm = 0 if args.quick else args.soak_warmup
        if warm:
            finish_load(start_load(load, gw.url, "mixed", key, warm, load.connections, task_id))
        samples: list[tuple[float, int]] = []
        cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
        proc = start_load(load, gw.url, "mixed", key, args.soak, load.connections, task_id)
        while proc.poll() is None:
            samples.append((time.monotonic() - t0, rss_kb(gw.pid)))
            time.sleep(min(5.0, max(0.5, args.soak / 60)))
        result = finish_load(proc)
        samples.append((time.monotonic() - t0, rss_kb(gw.pid)))
        cpu = cpu_seconds(gw.pid) - cpu0
        ok = True
    finally:
        tear_down([gw, *sims], redis, [prefix], workdir, keep=args.keep or not ok)
    n = result["requests"]
    start_rss, end_rss, peak = samples[0][1], samples[-1][1], max(s[1] for s in samples)
    growth = (end_rss - start_rss) / start_rss * 100 if start_rss else 0.0
    errors = sum(v for k, v in result.items() if k.startswith("errors_"))
    if errors:
        print(
            "soak errors: " + ", ".join(f"{k[7:]} {v}" for k, v in result.items() if k.startswith("errors_") and v),
            file=sys.stderr,
        )
    curve = ", ".join(f"{t:.0f}s {kb / 1024:.1f}" for t, kb in samples[:: max(1, len(samples) // 12)])
    table = (
        "\n".join(
            [
                f"Command: `{command}`  ",
                f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')}  ",
                f"Machine: {machine()}  ",
                f"Servers: {stack()}; store {args.store}; {tenants_text(args.tenants)}; "
                f"simulator tasks finish after {SOAK_SECONDS_TO_FINISH} s, "
                f"{'callbacks on (tasks settle)' if args.soak_callbacks else 'callbacks dropped by the simulator'}  ",
                f"Load: {generator_text(load).rsplit(',', 1)[0]}, mixed (1 create : 3 polls), "
                f"{load.connections} connections, "
                f"{args.soak} s after a {0 if args.quick else args.soak_warmup} s warm-up",
                "",
                "| soak | req/s | p50 ms | p99 ms | server CPU µs/req | errors | RSS start MiB | RSS end MiB "
                "| RSS peak MiB | growth | met (≤ 10 %) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                f"| gateway {args.store}, mixed | {n / (result['duration_us'] / 1e6):,.0f} | "
                f"{result['p50_us'] / 1000:.2f} | "
                f"{result['p99_us'] / 1000:.2f} | {cpu / n * 1e6 if n else 0:,.0f} | {errors} | "
                f"{start_rss / 1024:.1f} | {end_rss / 1024:.1f} | "
                f"{peak / 1024:.1f} | {growth:+.1f} % | {'yes' if abs(growth) <= 10 else '**no**'} |",
                "",
                f"RSS over time (MiB): {curve}",
            ]
        )
        + "\n"
    )
    print(table, flush=True)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "soak.md").write_text(table)
    return 0


# --- --compare REV: an older commit and the working tree, interleaved in one run ------


@dataclass
class Side:
    """One side of a `--compare` run: a checkout, its gateway server and what it measured."""

    label: str  # "old 5f3e610" or "new (working tree)"
    tree: Path
    gw: Server | None = None
    key: str = ""
    task_id: str = ""
    package: str = ""  # the gateway package the server imported
    relays: int = 1  # relays it runs with (an old commit without [[relays]] gets one)


COMPARE_TARGETS = 9  # per round: floor, relay alone, relay alone at 1 connection, 3 rows per side
COMPARE_MEASURES = (  # (label, unit, what; None = the side's own row value)
    ("creates / aiohttp floor", "x", "create_ratio"),
    ("polls / relay alone", "x", "poll_ratio"),
    ("p50 added at 1 connection", " ms", "added_ms"),
    ("server CPU µs per create", " µs", "create_cpu"),
    ("server CPU µs per poll", " µs", "poll_cpu"),
)


def compare(args: argparse.Namespace, load: Load, command: str) -> int:
    """`--compare REV`: REV checked out in a scratch git worktree and the working tree, each
    its own gateway (same interpreter and dependencies, its own `gateway` package), measured
    in the same run against the same simulator and floor, side by side in each round (the
    side that goes first alternates), so the machine's drift hits both alike."""
    started = dt.datetime.now(dt.UTC)
    rev = args.compare
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode:
        print(f"--compare: {rev!r} is not a commit of {ROOT}: {found.stderr.strip()}", file=sys.stderr)
        return 2
    short = found.stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="runway-compare-"))
    old_tree = workdir / f"rev-{short}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(old_tree), short],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    sides = [Side(f"old {short}", old_tree), Side("new (working tree)", ROOT)]
    sims = simulators(workdir, FAST_SECONDS_TO_FINISH, args.relays)
    servers: list[Server] = [*sims]
    redis = BenchRedis(args.redis_url, workdir)
    warmup = 0 if args.quick else args.warmup
    rounds: list[dict[str, Row]] = []
    problem = ""
    stores: list[str] = []  # Redis key prefixes to forget
    ok = False
    try:
        for sim in sims:
            sim.start()
        if args.store == "redis":
            problem = redis.start()
            if problem:
                raise RuntimeError(f"Redis not usable: {problem}")
        for i, side in enumerate(sides):
            if args.store == "redis":
                store, prefix = redis.store_url()
                stores.append(prefix)
            else:
                store = f"sqlite:///{workdir / f'gateway-{i}.db'}"
            key = "sk-gw-bench-" + secrets.token_urlsafe(24)
            side.gw = gateway_server(
                f"gateway-{i}", workdir, [s.url for s in sims], store, key, args.tenants, tree=side.tree
            )
            servers.append(side.gw)
            side.relays = args.relays
            try:
                start_gateway(side.gw, args.relays)
            except RuntimeError as exc:
                if i or "refused the [[relays]] config" not in str(exc):
                    raise
                # an old commit from before contract §14: one relay for it, said in the header
                print(f"{side.label}: refuses [[relays]]; measured with one relay", file=sys.stderr)
                side.gw.log.rename(side.gw.log.with_suffix(".refused.log"))
                side.gw = gateway_server(
                    f"gateway-{i}", workdir, [sims[0].url], store, key, args.tenants, tree=side.tree
                )
                servers.append(side.gw)
                side.relays = 1
                start_gateway(side.gw, 1)
            side.package = gateway_path(side.gw)
            if not Path(side.package).resolve().is_relative_to(side.tree.resolve()):
                raise RuntimeError(f"{side.label}: the server imported {side.package}, not the code in {side.tree}")
            print(f"{side.label}: gateway package {side.package} (pid {side.gw.pid})", file=sys.stderr)
            side.key = tenant_key(side.gw, args.tenants, key)
            side.task_id = create_one(side.gw.url, side.key)
        floor = floor_server(workdir, sims[0])
        servers.append(floor)
        floor.start()
        sim_pids = [s.pid for s in sims]
        per_round = COMPARE_TARGETS * (load.duration + warmup + 1)
        print(
            f"{args.rounds} round(s) of {COMPARE_TARGETS} targets: about {args.rounds * per_round / 60:.1f} min",
            file=sys.stderr,
        )
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr)
            order = sides if r % 2 == 0 else sides[::-1]
            rows: dict[str, Row] = {}
            rounds.append(rows)
            sim = sims[0]
            reset_simulators(sims)
            rows["floor"] = measure(
                load,
                "floor: Starlette + aiohttp",
                floor.pid,
                floor.url + "/runway/tasks",
                "post",
                UPSTREAM_KEY,
                warmup=warmup,
                upstream_pid=sims[0].pid,
            )
            reset_simulators(sims)
            rows["relay"] = measure(
                load, "relay alone", sim.pid, sim.url + "/runway/tasks", "post", UPSTREAM_KEY, warmup=warmup
            )
            for side in order:
                assert side.gw is not None
                reset_simulators(sims)
                tag = "compare-" + side.label.split()[0]  # profile-compare-old.txt, -new.txt
                spy = _start_profile(side.gw, load, workdir, tag) if args.profile and r == 0 else None
                rows[side.label + " create"] = measure(
                    load,
                    f"{side.label}: create",
                    side.gw.pid,
                    side.gw.url + "/runway/tasks",
                    "post",
                    side.key,
                    warmup=warmup,
                    upstream_pid=sim_pids,
                )
                if spy is not None:
                    _finish_profile(spy, workdir, tag)
            for side in order:
                assert side.gw is not None
                tag = "compare-" + side.label.split()[0] + "-poll"  # profile-compare-old-poll.txt, ...
                spy = _start_profile(side.gw, load, workdir, tag) if args.profile and r == 0 else None
                rows[side.label + " poll"] = measure(
                    load,
                    f"{side.label}: poll",
                    side.gw.pid,
                    f"{side.gw.url}/runway/tasks/{side.task_id}",
                    "get",
                    side.key,
                    warmup=warmup,
                    upstream_pid=sim_pids,
                )
                if spy is not None:
                    _finish_profile(spy, workdir, tag)
            reset_simulators(sims)
            rows["relay 1"] = measure(
                load,
                "relay alone, 1 conn",
                sim.pid,
                sim.url + "/runway/tasks",
                "post",
                UPSTREAM_KEY,
                connections=1,
                warmup=warmup,
            )
            for side in order:
                assert side.gw is not None
                reset_simulators(sims)
                rows[side.label + " create 1"] = measure(
                    load,
                    f"{side.label}: create, 1 conn",
                    side.gw.pid,
                    side.gw.url + "/runway/tasks",
                    "post",
                    side.key,
                    connections=1,
                    warmup=warmup,
                    upstream_pid=sim_pids,
                )
        ok = True
    except RuntimeError as exc:  # a server that would not start or answer: say so, no traceback
        problem = str(exc)
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        tear_down(servers, redis, stores, workdir, keep=args.keep or not ok)
    if problem:
        print(f"--compare: {problem}", file=sys.stderr)
        return 2
    table = render_compare(sides, rounds, load, command, started, warmup, args)
    print(table, flush=True)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "compare.md").write_text(table)
    return 0


def floor_server(workdir: Path, sim: Server) -> Server:
    port = free_port()
    args = [PY, str(BENCH / "floor_aiohttp.py"), "--port", str(port), "--upstream", sim.url, "--api-key", UPSTREAM_KEY]
    return Server("floor_aiohttp", args, workdir, port, "/healthz")


def compare_values(side: Side, rows: dict[str, Row]) -> dict[str, float | None]:
    """One side's figures in one round (None when a row did not run)."""
    create, poll = rows.get(side.label + " create"), rows.get(side.label + " poll")
    single, floor = rows.get(side.label + " create 1"), rows.get("floor")
    relay, relay1 = rows.get("relay"), rows.get("relay 1")

    def ratio(a: Row | None, b: Row | None) -> float | None:
        return a.rps / b.rps if a and b and a.rps and b.rps else None

    return {
        "create_ratio": ratio(create, floor),
        "poll_ratio": ratio(poll, relay),
        "added_ms": (single.p50_ms or 0) - (relay1.p50_ms or 0) if single and relay1 and single.rps else None,
        "create_cpu": create.cpu_us if create else None,
        "poll_cpu": poll.cpu_us if poll else None,
        "create_rps": create.rps if create else None,
        "poll_rps": poll.rps if poll else None,
    }


def render_compare(
    sides: list[Side],
    rounds: list[dict[str, Row]],
    load: Load,
    command: str,
    started: dt.datetime,
    warmup: int,
    args: argparse.Namespace,
) -> str:
    """Each round's rows of both sides, then each measure per side and round with medians,
    and new against old within each round (creates, polls)."""
    old, new = sides
    lines = [
        f"Command: `{command}`  ",
        f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Machine: {machine()}  ",
        f"Sides: {old.label} ({old.package}) and {new.label} ({new.package}); the first side alternates by round  ",
        f"Servers: {stack()}; store {args.store}; relays: {old.relays} ({old.label}), {new.relays} ({new.label}); "
        f"{tenants_text(args.tenants)}  ",
        f"Load: {generator_text(load)} (+{warmup} s warm-up), {load.connections} connections unless the row says 1",
        "",
    ]
    for i, rows in enumerate(rounds):
        lines += [
            f"Round {i + 1}:",
            "",
            "| target | conns | req/s | p50 ms | p99 ms | server CPU µs/req | upstream CPU µs/req | other load (cores) "
            "| errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows.values():
            upstream_cpu = "—" if r.upstream_cpu_us is None else f"{r.upstream_cpu_us:,.0f}"
            lines.append(
                f"| {r.target} | {r.connections} | {_fmt(r.rps, ',.0f')} | {_fmt(r.p50_ms, '.2f')} | "
                f"{_fmt(r.p99_ms, '.2f')} | {_fmt(r.cpu_us, ',.0f')} | {upstream_cpu} | {_fmt(r.others, '.2f')} "
                f"| {r.errors} |"
            )
        lines.append("")
    n = len(rounds)
    per_side = [[compare_values(side, rows) for rows in rounds] for side in sides]
    lines += [
        "| measure | "
        + " | ".join(f"{side.label} r{i + 1}" for i in range(n) for side in sides)
        + f" | {old.label} median | {new.label} median |",
        "|---|" + "---:|" * (2 * n + 2),
    ]
    for what, unit, field in COMPARE_MEASURES:
        cells = [per_side[s][i][field] for i in range(n) for s in range(2)]
        medians = [_median([v[field] for v in per_side[s]]) for s in range(2)]
        lines.append(f"| {what} | " + " | ".join(_unit(v, unit) for v in [*cells, *medians]) + " |")
    lines += ["", "| new / old, within each round | " + " | ".join(f"r{i + 1}" for i in range(n)) + " | median |"]
    lines.append("|---|" + "---:|" * (n + 1))
    for what, field in (
        ("creates req/s", "create_rps"),
        ("polls req/s", "poll_rps"),
        ("CPU per create", "create_cpu"),
        ("CPU per poll", "poll_cpu"),
    ):
        values = [_ratio(per_side[1][i][field], per_side[0][i][field]) for i in range(n)]
        lines.append(f"| {what} | " + " | ".join(_unit(v, "x") for v in values) + f" | {_unit(_median(values), 'x')} |")
    return "\n".join(lines) + "\n"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _unit(v: float | None, unit: str) -> str:
    if v is None:
        return "pending"
    return f"{v:,.0f}{unit}" if unit == " µs" else f"{v:.2f}{unit}"


# --- --key-limits: a key with its own limits beside a key without (issue 24) ----------

# A key's own limits, all six, generous: admission checks them with the tenant's (the same
# single atomic step) and never refuses.
KEY_LIMITS = {
    "requests_per_minute": 10**9,
    "tasks_per_minute": 10**9,
    "max_active_tasks": 10**9,
    "tasks_per_day": 10**9,
    "credits_per_day": 10**12,
    "credits_per_month": 10**12,
}
KEY_SIDES = ("key without limits", "key with limits")


def key_limits(args: argparse.Namespace, load: Load, command: str) -> int:
    """`--key-limits`: one gateway (`--store`), its bench tenant created in the store, two of
    its keys minted through the admin API, one with `KEY_LIMITS` and one without; each round
    measures creates with both keys, the one going first alternating."""
    started = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="runway-keylimits-"))
    sims = simulators(workdir, FAST_SECONDS_TO_FINISH, args.relays)
    servers: list[Server] = [*sims]
    redis = BenchRedis(args.redis_url, workdir)
    warmup = 0 if args.quick else args.warmup
    rounds: list[dict[str, Row]] = []
    prefix, problem, ok = "", "", False
    try:
        for sim in sims:
            sim.start()
        if args.store == "redis":
            problem = redis.start() or ""
            if problem:
                raise RuntimeError(f"Redis not usable: {problem}")
            store, prefix = redis.store_url()
        else:
            store = f"sqlite:///{workdir / 'gateway.db'}"
        admin_key = "sk-gw-bench-" + secrets.token_urlsafe(24)
        gw = gateway_server("gateway-keys", workdir, [s.url for s in sims], store, admin_key, "store")
        servers.append(gw)
        start_gateway(gw, args.relays)
        keys = {
            KEY_SIDES[0]: tenant_key(gw, "store", admin_key),
            KEY_SIDES[1]: mint_key(gw, admin_key, {"name": "bench-limited", "limits": KEY_LIMITS}),
        }
        sim_pids = [s.pid for s in sims]
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr)
            rows: dict[str, Row] = {}
            rounds.append(rows)
            for label in KEY_SIDES if r % 2 == 0 else KEY_SIDES[::-1]:
                reset_simulators(sims)
                rows[label] = measure(
                    load,
                    f"{label}: create",
                    gw.pid,
                    gw.url + "/runway/tasks",
                    "post",
                    keys[label],
                    warmup=warmup,
                    upstream_pid=sim_pids,
                )
        ok = True
    except RuntimeError as exc:  # a server that would not start or answer: say so, no traceback
        problem = str(exc)
    finally:
        tear_down(servers, redis, [prefix], workdir, keep=args.keep or not ok)
    if problem:
        print(f"--key-limits: {problem}", file=sys.stderr)
        return 2
    table = render_key_limits(rounds, load, command, started, warmup, args)
    print(table, flush=True)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "key-limits.md").write_text(table)
    return 0


def render_key_limits(
    rounds: list[dict[str, Row]], load: Load, command: str, started: dt.datetime, warmup: int, args: argparse.Namespace
) -> str:
    """Both keys' create rows by round, then with / without within each round and the median."""
    lines = [
        f"Command: `{command}`  ",
        f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Machine: {machine()}  ",
        f"Servers: {stack()}; store {args.store}; relays: {args.relays}; one gateway, its bench tenant and both "
        f"keys from the store (admin API); the limited key's limits: "
        + ", ".join(f"{k} {v:.0e}" for k, v in KEY_LIMITS.items())
        + "  ",
        f"Load: {generator_text(load)} (+{warmup} s warm-up), {load.connections} connections; "
        "the key that goes first alternates by round",
        "",
        "| target | round | conns | req/s | p50 ms | p99 ms | server CPU µs/req | upstream CPU µs/req "
        "| other load (cores) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, rows in enumerate(rounds):
        for r in rows.values():
            lines.append(
                f"| {r.target} | {i + 1} | {r.connections} | {_fmt(r.rps, ',.0f')} | {_fmt(r.p50_ms, '.2f')} | "
                f"{_fmt(r.p99_ms, '.2f')} | {_fmt(r.cpu_us, ',.0f')} | {_fmt(r.upstream_cpu_us, ',.0f')} | "
                f"{_fmt(r.others, '.2f')} | {r.errors} |"
            )
    n = len(rounds)
    lines += ["", "| with limits / without, within each round | " + " | ".join(f"r{i + 1}" for i in range(n))]
    lines[-1] += " | median |"
    lines.append("|---|" + "---:|" * (n + 1))
    for what, field in (("creates req/s", "rps"), ("CPU per create", "cpu_us")):
        values = [_ratio(getattr(rows[KEY_SIDES[1]], field), getattr(rows[KEY_SIDES[0]], field)) for rows in rounds]
        lines.append(f"| {what} | " + " | ".join(_unit(v, "x") for v in values) + f" | {_unit(_median(values), 'x')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=".venv/bin/python -m bench",
        description="Benchmark the gateway beside its floors; prints a markdown table.",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds of measured load per target (default 10)")
    p.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each target (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 s per target, no warm-up")
    p.add_argument(
        "--rounds", type=int, default=1, help="repeat the whole table N times; the goals use the median of the rounds"
    )
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(GROUPS)}")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leave the cores to the servers)")
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when on PATH, else bench/loadgen.py",
    )
    p.add_argument(
        "--redis-url",
        default="",
        help="a Redis for the Redis rows and the soak, used under a key prefix of the run's own "
        "whose keys are deleted afterwards (default: a private redis-server on a free port, stopped at the end)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the gateway during its create runs (collapsed stacks in bench/results/)",
    )
    p.add_argument(
        "--soak", type=int, default=0, metavar="SECONDS", help="instead of the table: RSS over a mixed soak of SECONDS"
    )
    p.add_argument(
        "--soak-warmup",
        type=int,
        default=15,
        help="seconds of mixed load before the soak's first RSS sample (default 15)",
    )
    p.add_argument("--store", choices=("sqlite", "redis"), default="sqlite", help="the soak's and --compare's store")
    p.add_argument(
        "--compare",
        default="",
        metavar="REV",
        help="instead of the table: REV (checked out in a scratch git worktree) against the working tree, "
        "both measured in each round, interleaved; prints both rows and their ratios",
    )
    p.add_argument(
        "--key-limits",
        action="store_true",
        help="instead of the table: creates with a store key that has its own (generous) limits beside a key "
        "without, on one gateway (--store), interleaved by round; prints both rows and their ratio",
    )
    p.add_argument(
        "--relays",
        type=int,
        default=1,
        help="relays (simulators) each gateway is configured with; 2 or more writes contract §14's [[relays]] "
        "(a gateway without it refuses to start)",
    )
    p.add_argument(
        "--soak-callbacks",
        action="store_true",
        help="let the simulator post its callbacks, so tasks settle during the soak (the simulator's httpx "
        "callback client then limits the rate; docs/benchmarks.md)",
    )
    p.add_argument(
        "--tenants",
        choices=("config", "store"),
        default="config",
        help="where each gateway's bench tenant and its key come from: config, a [[tenants]] entry (default); "
        "store, created and minted through the admin API once the gateway runs (in SQLite or Redis)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, server logs)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/stat").exists():
        print("bench: needs Linux /proc (server CPU time and RSS are read from it)", file=sys.stderr)
        return 2
    generator = args.loadgen
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    elif generator == "wrk" and not shutil.which("wrk"):
        print("bench: --loadgen wrk but wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    if generator == "python":
        print(
            "bench: wrk not found; using bench/loadgen.py (slower: compare only with its own tables)", file=sys.stderr
        )
    load = Load(args.connections, 1 if args.quick else args.duration, args.threads, generator)
    command = ".venv/bin/python bench/run.py" + (
        "" if argv is None and len(sys.argv) <= 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    if args.relays < 1:
        print("bench: --relays must be at least 1", file=sys.stderr)
        return 2
    if args.soak:
        return soak(args, load, command)
    if args.compare:
        return compare(args, load, command)
    if args.key_limits:
        return key_limits(args, load, command)
    return bench(args, load, command)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
