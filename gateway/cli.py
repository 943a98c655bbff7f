"""`runway-gateway` (also `python -m gateway`): serve, check-config, new-key,
simulate-upstream, demo, admin.

Imports of the server stack happen inside the commands: `serve` must set
PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.config import Config, ConfigError, config_warnings, load_config, read_env_file
from gateway.keygen import new_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="runway-gateway", description="A key-managed, quota-enforcing gateway for a Runway gen2 relay."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG"), help="TOML config (or GATEWAY_CONFIG)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.add_argument(
        "--env-file",
        metavar="PATH",
        help="take ${NAME} values from this KEY=VALUE file (e.g. deploy/.env) instead of the environment",
    )

    key = sub.add_parser("new-key", help="print a fresh API key and its config form")
    key.add_argument("--prefix", default="sk-gw-")

    sim = sub.add_parser("simulate-upstream", help="run a local stand-in for the relay")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--seconds-to-finish", type=float, default=6.0)
    sim.add_argument("--fail-rate", type=float, default=0.0)
    sim.add_argument("--api-key", action="append", default=None, help="accepted relay key (repeatable)")

    demo = sub.add_parser("demo", help="the simulator and a gateway on SQLite, with a demo key kept under --data")
    demo.add_argument("--port", type=int, default=8080, help="the gateway's port")
    demo.add_argument("--upstream-port", type=int, default=8090, help="the simulator's port")
    demo.add_argument("--data", default="data/demo", help="the demo's config, key and database")
    demo.add_argument("--new-key", action="store_true", help="replace the kept demo key (the old one stops working)")

    from gateway import admin_cli

    admin_cli.add_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "admin":
        return admin_cli.run(args)
    if args.command == "serve":
        return _serve(args.config, args.host, args.port, args.workers)
    if args.command == "check-config":
        return _check(args.path, args.env_file)
    if args.command == "new-key":
        k = new_key(args.prefix)
        from gateway.auth import key_hash

        print(k)
        print(key_hash(k))
        return 0
    if args.command == "simulate-upstream":
        return _simulate(args)
    return _demo(args.port, args.upstream_port, Path(args.data), args.new_key)


def _check(path: str, env_file: str | None) -> int:
    """Exit 2 with one line per problem; warnings alone still exit 0."""
    try:
        environ = read_env_file(env_file) if env_file else None
    except ConfigError as err:
        _print_lines(err.problems)
        return 2
    config = _load_or_report(path, environ)
    if config is None:
        return 2
    warnings = config_warnings(config)
    _print_lines([f"warning: {w}" for w in warnings])
    print(f"{path}: ok" + (f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''})" if warnings else ""))
    return 0


def _serve(config_path: str | None, host: str, port: int, workers: int) -> int:
    if not config_path:
        print("serve: give --config PATH or set GATEWAY_CONFIG", file=sys.stderr)
        return 2
    if _load_or_report(config_path) is None:
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
    from gateway.reload import RELOAD_ID_ENV

    options = uvicorn_options(server)  # header/body/idle timeouts and the connection limit
    try:
        if workers > 1:
            # The supervisor binds the socket and says where ("Uvicorn running on ..."):
            # without the workers' logging set up here too, that line is dropped.
            from gateway.logs import setup_logging

            setup_logging(os.environ.get("GATEWAY_LOG_LEVEL", server.log_level))
            # where the supervisor names each reload for its workers (gateway.reload)
            os.environ[RELOAD_ID_ENV] = str(Path(metrics_dir) / "reload-id")
            _run_workers(host, port, workers, options)
        else:
            os.environ.pop(RELOAD_ID_ENV, None)  # no supervisor: each signal its own entry
            uvicorn.run("gateway.cli:app_from_env", host=host, port=port, **UVICORN_SETTINGS, **options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


UVICORN_SETTINGS: dict[str, Any] = {
    "factory": True,
    "log_config": None,
    "access_log": False,
    "proxy_headers": False,
    "server_header": False,
    "date_header": False,
}


def _run_workers(host: str, port: int, workers: int, options: dict[str, Any]) -> None:
    """uvicorn's multiprocess supervisor, except that SIGHUP reloads the config in every
    worker (each has its own handler, `gateway.reload`) instead of replacing the workers,
    under one audit id announced first and relayed with `RELAY_SIGNAL` (one entry per
    reload)."""
    import signal

    import uvicorn
    from uvicorn.supervisors.multiprocess import Multiprocess

    from gateway.reload import RELAY_SIGNAL, RELOAD_ID_ENV, announce_reload

    class ReloadingMultiprocess(Multiprocess):
        def handle_hup(self) -> None:
            logging.getLogger("uvicorn.error").info("Received SIGHUP, reloading the config in every worker.")
            relay = RELAY_SIGNAL
            try:
                announce_reload(os.environ[RELOAD_ID_ENV], time.time())
            except OSError as exc:  # the workers still reload, with an audit entry each
                logging.getLogger("uvicorn.error").warning("reload id not written: %s", exc)
                relay = signal.SIGHUP
            for process in self.processes:
                if process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, relay)

    config = uvicorn.Config(
        "gateway.cli:app_from_env", host=host, port=port, workers=workers, **UVICORN_SETTINGS, **options
    )
    ReloadingMultiprocess(config, sockets=[config.bind_socket()]).run()


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


def _load_or_report(path: str, environ: dict[str, str] | None = None) -> Config | None:
    """The config, or None after printing every problem, one per line on stderr."""
    try:
        return load_config(path, environ)
    except ConfigError as err:
        _print_lines(err.problems)
        return None


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def app_from_env():  # type: ignore[no-untyped-def]
    """uvicorn's factory in each worker process: config from GATEWAY_CONFIG."""
    from gateway.app import create_app
    from gateway.logs import setup_logging

    config = load_config(os.environ["GATEWAY_CONFIG"])
    setup_logging(os.environ.get("GATEWAY_LOG_LEVEL", config.server.log_level))
    for warning in config_warnings(config):
        logging.getLogger("gateway.config").warning(warning)
    return create_app(config, config_path=os.environ["GATEWAY_CONFIG"], tune_gc=True)


def _simulate(args: argparse.Namespace) -> int:
    from gateway.devtools.simulator import run_simulator, settings_from_env

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
# The simulator serves its videos from 127.0.0.1 too: a loopback address the gateway
# fetches only when named here.
artifact_hosts = ["127.0.0.1"]

[store]
url = "sqlite:///{db}"

# The demo's admin key: the console at /admin/ and `runway-gateway admin` sign in with it.
[admin]
keys = ["{admin_hash}"]

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


@dataclass(frozen=True)
class DemoSecrets:
    """What the demo keeps under its data directory so a restart prints the same key."""

    key: str
    webhook_secret: str
    admin_key: str


DEMO_SECRETS_FILE = "demo-secrets.json"


def _demo_secrets(data: Path, new_demo_key: bool) -> DemoSecrets:
    """The kept key and webhook secret, made on the first start; `new_demo_key` replaces
    the key (the config then lists only the new one's hash, so the old one gets 401)."""
    path = data / DEMO_SECRETS_FILE
    kept: dict[str, str] = {}
    if path.is_file():
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            pass
    if not isinstance(kept, dict):
        kept = {}
    current = DemoSecrets(
        key=new_key() if new_demo_key or not kept.get("key") else kept["key"],
        webhook_secret=kept.get("webhook_secret") or secrets.token_urlsafe(32),
        admin_key=kept.get("admin_key") or new_key(),  # a demo kept before the console: one now
    )
    if kept != asdict(current):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(current), f)
    return current


def _busy_ports(ports: dict[str, tuple[int, str]]) -> list[str]:
    """One sentence per port of `ports` ({option: (port, what listens)}) that cannot be
    listened on: checked before the demo prints a key it could not serve."""
    busy: list[str] = []
    for option, (port, what) in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
            except OSError as exc:
                busy.append(
                    f"demo: port {port} for the {what} is busy ({exc.strerror}): "
                    f"stop what uses it or choose another with {option} PORT"
                )
    return busy


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    """True once something accepts on `port`; False if `process` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class _Stopped(Exception):
    """SIGTERM or SIGINT reached the demo: stop the gateway, then the simulator."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


DEMO_LOCK_FILE = "demo.lock"


def _lock_demo_data(data: Path, port: int) -> int | str:
    """An open descriptor holding an exclusive lock on `data` for this demo's life (the
    kernel drops it when the process ends, however it ends), or the sentence refusing a
    second demo on the same directory: it would rewrite the first one's config and key."""
    fd = os.open(data / DEMO_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").split()
        os.close(fd)
        who = f" (pid {holder[0]}, gateway on port {holder[1]})" if len(holder) == 2 else ""
        return (
            f"demo: {data} is in use by another demo{who}: stop that one, "
            "or give this one a directory of its own with --data DIR"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {port}\n".encode())
    return fd


def _print_banner_when_up(port: int, banner: str, done: threading.Event) -> None:
    """Print `banner` once the gateway answers /readyz, so the URL and curl line it shows
    work the moment they appear; give up silently when the gateway stopped first."""
    import urllib.request

    while not done.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1.0) as answer:
                if answer.status == 200:
                    print(banner, flush=True)
                    return
        except OSError:  # refused, not ready (HTTPError), or too slow: ask again
            pass
        done.wait(0.05)


def _demo(port: int, upstream_port: int, data: Path, new_demo_key: bool) -> int:
    from gateway.auth import key_hash

    if port == upstream_port:
        print(f"demo: --port and --upstream-port are both {port}; give them different ports", file=sys.stderr)
        return 1
    busy = _busy_ports({"--port": (port, "gateway"), "--upstream-port": (upstream_port, "simulator")})
    if busy:
        _print_lines(busy)
        return 1
    data.mkdir(parents=True, exist_ok=True)
    lock = _lock_demo_data(data, port)
    if isinstance(lock, str):
        print(lock, file=sys.stderr)
        return 1
    kept = _demo_secrets(data, new_demo_key)
    config_path = data / "gateway.toml"
    config_path.write_text(
        DEMO_CONFIG.format(
            port=port,
            upstream_port=upstream_port,
            db=(data / "gateway.db").resolve(),
            key_hash=key_hash(kept.key),
            hook_secret=kept.webhook_secret,
            admin_hash=key_hash(kept.admin_key),
        )
    )
    # uvicorn restores these after its graceful shutdown and re-raises the signal it got:
    # _Stopped then unwinds to the `finally` that stops the simulator (the default SIGTERM
    # action would end the process there and leave the simulator holding its port).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stopped)
    simulator = subprocess.Popen(
        [sys.executable, "-m", "gateway", "simulate-upstream", "--port", str(upstream_port), "--seconds-to-finish", "8"]
    )
    up = threading.Event()
    try:
        if not _wait_for_port(upstream_port, simulator):
            print(f"demo: the simulator did not start on port {upstream_port}", file=sys.stderr)
            return 1
        banner = (
            f"\nrunway-gateway demo\n  gateway:  http://127.0.0.1:{port}\n"
            f"  upstream: http://127.0.0.1:{upstream_port} (simulator)\n"
            f"  config:   {config_path}\n  demo key: {kept.key}\n"
            f"            (kept in {data / DEMO_SECRETS_FILE}; `runway-gateway demo --new-key` replaces it)\n"
            f"  console:  http://127.0.0.1:{port}/admin/ (sign in with the admin key)\n"
            f"  admin key: {kept.admin_key}\n\n"
            f"  export RUNWAY_GATEWAY_URL=http://127.0.0.1:{port} RUNWAY_GATEWAY_ADMIN_KEY={kept.admin_key}\n"
            f"  export KEY={kept.key}\n"
            f'  curl -s http://127.0.0.1:{port}/runway/tasks -H "Authorization: Bearer $KEY" '
            "-H 'Content-Type: application/json' \\\n"
            '    -d \'{"taskType":"gen2","options":{"gen2Options":{"text_prompt":"The wind blows hair up."}}}\'\n'
        )
        threading.Thread(target=_print_banner_when_up, args=(port, banner, up), daemon=True).start()
        return _serve(str(config_path), "127.0.0.1", port, 1)
    except _Stopped:
        return 0
    finally:
        up.set()
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        simulator.terminate()
        simulator.wait(timeout=10)
        os.close(lock)
