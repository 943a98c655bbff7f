"""`runway-gateway` (also `python -m gateway`): serve, check-config, new-key,
simulate-upstream, demo.

Imports of the server stack happen inside the commands: `serve` must set
PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.config import ConfigError, load_config

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_key(prefix: str = "sk-gw-") -> str:
    """43 base62 characters: ~256 bits from the OS's CSPRNG."""
    return prefix + "".join(secrets.choice(BASE62) for _ in range(43))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runway-gateway", description="A key-managed, quota-enforcing gateway for a Runway gen2 relay.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG"), help="TOML config (or GATEWAY_CONFIG)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")

    key = sub.add_parser("new-key", help="print a fresh API key and its config form")
    key.add_argument("--prefix", default="sk-gw-")

    sim = sub.add_parser("simulate-upstream", help="run a local stand-in for the relay")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--seconds-to-finish", type=float, default=6.0)
    sim.add_argument("--fail-rate", type=float, default=0.0)
    sim.add_argument("--api-key", action="append", default=None, help="accepted relay key (repeatable)")

    demo = sub.add_parser("demo", help="the simulator and a gateway on SQLite, with a fresh demo key")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--upstream-port", type=int, default=8090)
    demo.add_argument("--data", default="data/demo")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.config, args.host, args.port, args.workers)
    if args.command == "check-config":
        return _check(args.path)
    if args.command == "new-key":
        k = new_key(args.prefix)
        from gateway.auth import key_hash

        print(k)
        print(key_hash(k))
        return 0
    if args.command == "simulate-upstream":
        return _simulate(args)
    return _demo(args.port, args.upstream_port, Path(args.data))


def _check(path: str) -> int:
    if _config_problems(path):
        return 2
    print(f"{path}: ok")
    return 0


def _serve(config_path: str | None, host: str, port: int, workers: int) -> int:
    if not config_path:
        print("serve: give --config PATH or set GATEWAY_CONFIG", file=sys.stderr)
        return 2
    if _config_problems(config_path):
        return 2
    server = load_config(config_path).server
    config_path = str(Path(config_path).resolve())
    os.environ["GATEWAY_CONFIG"] = config_path
    # A fresh multiprocess directory per start: stale files would resurrect old counts.
    _remove_dead_metrics_dirs()
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    import uvicorn

    from gateway.connections import uvicorn_options

    try:
        uvicorn.run(
            "gateway.cli:app_from_env", factory=True, host=host, port=port, workers=workers,
            log_config=None, access_log=False, proxy_headers=False, server_header=False, date_header=False,
            **uvicorn_options(server),  # header/body/idle timeouts and the connection limit
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


METRICS_DIR_PREFIX = "runway-gateway-metrics-"


def _remove_dead_metrics_dirs() -> None:
    """uvicorn ends a signalled process by re-raising the signal, so `serve` cannot always
    clean up after itself: remove the directories of starts whose process is gone."""
    for entry in Path(tempfile.gettempdir()).glob(METRICS_DIR_PREFIX + "*"):
        pid = entry.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _config_problems(path: str) -> bool:
    """Print every problem of a config file, one per line on stderr; True if there were any."""
    try:
        load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return True
    return False


def app_from_env():  # type: ignore[no-untyped-def]
    """uvicorn's factory in each worker process: config from GATEWAY_CONFIG."""
    from gateway.app import create_app
    from gateway.logs import setup_logging

    config = load_config(os.environ["GATEWAY_CONFIG"])
    setup_logging(os.environ.get("GATEWAY_LOG_LEVEL", config.server.log_level))
    return create_app(config)


def _simulate(args: argparse.Namespace) -> int:
    from gateway.simulator import run_simulator, settings_from_env

    overrides: dict[str, object] = {"seconds_to_finish": args.seconds_to_finish, "fail_rate": args.fail_rate}
    if args.api_key:
        overrides["api_keys"] = tuple(args.api_key)
    run_simulator(args.host, args.port, settings_from_env(**overrides))
    return 0


DEMO_CONFIG = """\
# Written by `runway-gateway demo`: the bundled simulator as upstream, SQLite as store.
[server]
public_url = "http://127.0.0.1:{port}"

[upstream]
base_url = "http://127.0.0.1:{upstream_port}"
api_keys = ["sk-sim-upstream"]
poll_interval_seconds = 2

[store]
url = "sqlite:///{db}"

[[tenants]]
id = "demo"
keys = ["{key_hash}"]
webhook_secret = "{hook_secret}"
[tenants.limits]
requests_per_minute = 600
tasks_per_minute = 30
max_active_tasks = 10
credits_per_day = 5000
[tenants.policy]
hook_hosts = ["127.0.0.1", "localhost"]
"""


def _demo(port: int, upstream_port: int, data: Path) -> int:
    from gateway.auth import key_hash

    data.mkdir(parents=True, exist_ok=True)
    key = new_key()
    config_path = data / "gateway.toml"
    config_path.write_text(
        DEMO_CONFIG.format(port=port, upstream_port=upstream_port, db=(data / "gateway.db").resolve(), key_hash=key_hash(key), hook_secret=secrets.token_urlsafe(32))
    )
    simulator = subprocess.Popen([sys.executable, "-m", "gateway", "simulate-upstream", "--port", str(upstream_port), "--seconds-to-finish", "8"])
    time.sleep(0.5)
    print(
        f"\nrunway-gateway demo\n  gateway:  http://127.0.0.1:{port}\n  upstream: http://127.0.0.1:{upstream_port} (simulator)\n"
        f"  config:   {config_path}\n  demo key: {key}\n\n"
        f"  curl -s http://127.0.0.1:{port}/runway/tasks -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        "    -d '{\"taskType\":\"gen2\",\"options\":{\"gen2Options\":{\"text_prompt\":\"The wind blows hair up.\"}}}'\n",
        flush=True,
    )
    try:
        return _serve(str(config_path), "127.0.0.1", port, 1)
    finally:
        simulator.terminate()
        simulator.wait(timeout=10)
