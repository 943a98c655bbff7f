"""SIGHUP re-reads the config file in every worker, without a restart and without dropping a
request; a broken file changes nothing; gateway_config_reloads_total counts both."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import jwt
import pytest
from conftest import GatewayProcess, Simulator, TenantSpec, gen2_body, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.reload import ReloadIds, announce_reload
from gateway.store import open_store
from gateway.store.base import AuditEntry


def reloads(gw: GatewayProcess, result: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=5).text
    found = re.search(rf'^gateway_config_reloads_total\{{result="{result}"\}} (\S+)$', text, re.M)
    assert found, f"no {result} series"
    return float(found.group(1))


def status(gw: GatewayProcess, key: str) -> int:
    return httpx.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code


def every_worker(gw: GatewayProcess, key: str, expected: int) -> bool:
    """Four answers running, each on a new connection (either worker may take it)."""
    return all(status(gw, key) == expected for _ in range(4))


def hangup(gw: GatewayProcess) -> None:
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)  # the `serve` process a supervisor started


def reload_audit(store_url: str) -> list[AuditEntry]:
    async def read() -> list[AuditEntry]:
        store = open_store(store_url)
        await store.open()
        try:
            return (await store.list_audit(limit=100, action="config.reload"))[0]
        finally:
            await store.close()

    return asyncio.run(read())


def test_sighup_reloads_every_worker_and_refuses_a_broken_file(tmp_path: Path, sim: Simulator) -> None:
    old, new = TenantSpec("team-old"), TenantSpec("team-new")
    gw = GatewayProcess(tmp_path, sim.url, [old], workers=2)
    gw.start()
    try:
        # /readyz answered from one worker; the other may still be starting and would read
        # the file as the test is about to change it: wait for both to have started
        wait_until(lambda: gw.log_text().count("Application startup complete") >= 2, 30, 0.05, "both workers started")
        assert reloads(gw, "ok") == 0 and reloads(gw, "error") == 0  # exported from the first scrape
        assert status(gw, new.key) == 401

        # requests keep flowing through the reload: none is dropped
        failures: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    code = status(gw, old.key)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                else:
                    if code != 200:
                        failures.append(str(code))

        runner = threading.Thread(target=traffic)
        runner.start()
        text = gw.config_path.read_text().replace("max_body_bytes = 65536", "max_body_bytes = 65537")
        gw.config_path.write_text(text + new.toml())
        hangup(gw)
        wait_until(lambda: every_worker(gw, new.key, 200), 10, 0.05, "the added key on every worker")
        wait_until(lambda: reloads(gw, "ok") >= 2, 10, 0.1, "one ok reload per worker")
        stop.set()
        runner.join()
        assert failures == []
        warning = "server.max_body_bytes changed but takes effect only at the next restart"
        wait_until(lambda: gw.log_text().count(warning) >= 2, 10, 0.05, "each worker's restart-only warning")
        assert gw.log_text().count(warning) == 2

        # a broken file: refused whole, every key as before, the process keeps serving
        broken = gw.config_path.read_text().replace("max_body_bytes = 65537", "max_body_bytes = -1")
        gw.config_path.write_text(broken.replace(new.toml(), ""))  # and team-new's key gone: not applied
        hangup(gw)
        wait_until(lambda: reloads(gw, "error") >= 2, 10, 0.1, "one error reload per worker")
        assert "config reload refused: server.max_body_bytes: must be a positive integer" in gw.log_text()
        assert every_worker(gw, old.key, 200) and every_worker(gw, new.key, 200)
        assert reloads(gw, "ok") == 2

        # one entry per reload, not one per worker (both workers wrote it, under one id)
        entries = reload_audit(f"sqlite:///{tmp_path / f'gw-{gw.port}.db'}")
        assert [entry.changes for entry in entries] == [
            {"result": "error", "problems": 1},
            {"result": "ok", "problems": 0},
        ]
        assert all(entry.actor_type == "config" and entry.actor_id == "sighup" for entry in entries)

        # a SIGHUP straight to one worker (not through the supervisor) gets its own entry
        worker = next(int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", gw.log_text()))
        os.kill(worker, signal.SIGHUP)
        wait_until(lambda: reloads(gw, "error") + reloads(gw, "ok") >= 5, 10, 0.1, "the worker's reload")
        wait_until(lambda: len(reload_audit(f"sqlite:///{tmp_path / f'gw-{gw.port}.db'}")) == 3, 10, 0.1, "its entry")
    finally:
        gw.stop()


def test_sighup_removes_a_key_from_a_single_process(tmp_path: Path, sim: Simulator) -> None:
    kept, dropped = TenantSpec("team-kept"), TenantSpec("team-dropped")
    gw = GatewayProcess(tmp_path, sim.url, [kept, dropped])
    gw.start()
    try:
        assert status(gw, dropped.key) == 200
        gw.config_path.write_text(gw.config_path.read_text().replace(dropped.toml(), ""))
        hangup(gw)
        wait_until(lambda: status(gw, dropped.key) == 401, 10, 0.05, "the removed key refused")
        assert status(gw, kept.key) == 200 and reloads(gw, "ok") == 1
        hangup(gw)  # again, the file unchanged: a second reload, a second entry
        wait_until(lambda: reloads(gw, "ok") == 2, 10, 0.05, "the second reload")
        entries = wait_until(
            lambda: len(found := reload_audit(f"sqlite:///{tmp_path / f'gw-{gw.port}.db'}")) == 2 and found,
            10,
            0.1,
            "two entries",
        )
        assert [e.changes["result"] for e in entries] == ["ok", "ok"] and entries[0].id != entries[1].id
    finally:
        gw.stop()


@pytest.mark.parametrize(
    "key_file",
    [
        "unreadable",
        "unparsable",
    ],
)
def test_a_reload_refused_for_its_jwt_key_file_changes_nothing(
    tmp_path: Path, own_sim: Simulator, key_file: str
) -> None:
    """A valid TOML file whose `[auth.jwt] public_key_file` cannot be read or parsed is
    refused whole: the new price, upstream timeout, tenants and keys in it are not applied."""
    own_sim.control(latency_seconds=1.0)  # within the 3 s timeout, past the new file's 0.5 s
    kept, removed, added = TenantSpec("team-kept"), TenantSpec("team-removed"), TenantSpec("team-added")
    gw = GatewayProcess(tmp_path, own_sim.url, [kept, removed])
    gw.start()
    try:
        with gw.client("team-kept") as c:
            assert c.post("/runway/tasks", json=gen2_body()).status_code == 200
        assert gw.usage("team-kept")["credits_today"] == 10  # [pricing] gen2's default
        if key_file == "unparsable":
            key_path = tmp_path / "jwt-public.pem"
            key_path.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
        elif os.geteuid() != 0:
            key_path = tmp_path / "jwt-public.pem"
            key_path.write_text("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n")
            key_path.chmod(0)
        else:  # root reads any file despite its mode: a regular file whose read fails (EIO)
            key_path = Path("/proc/self/mem")
        text = gw.config_path.read_text().replace("timeout_seconds = 3\n", "timeout_seconds = 0.5\n")
        text = text.replace(removed.toml(), added.toml())
        gw.config_path.write_text(
            f'{text}\n[pricing]\ngen2 = 77\n\n[auth.jwt]\nalgorithms = ["RS256"]\npublic_key_file = "{key_path}"\n'
        )
        hangup(gw)
        wait_until(lambda: reloads(gw, "error") == 1, 10, 0.05, "the reload refused")
        assert reloads(gw, "ok") == 0
        assert status(gw, removed.key) == 200 and status(gw, added.key) == 401 and status(gw, kept.key) == 200
        with gw.client("team-kept") as c:
            created = c.post("/runway/tasks", json=gen2_body())  # the old timeout: no 504 after 0.5 s
        assert created.status_code == 200, created.text
        assert gw.usage("team-kept")["credits_today"] == 10 + 10  # the old price
    finally:
        gw.stop()


def test_sighup_refuses_a_jwt_key_file_without_a_key_and_keeps_the_old_one(tmp_path: Path, sim: Simulator) -> None:
    """A key file that no longer holds a key is refused whole on SIGHUP: JWTs keep working
    with the key read before (accepting it would have made every JWT a 401)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "idp.pem").write_bytes(pem)
    extra = '[auth.jwt]\nalgorithms = ["RS256"]\npublic_key_file = "idp.pem"\n'
    gw = GatewayProcess(tmp_path, sim.url, [TenantSpec("team-jwt")], extra_toml=extra)
    gw.start()
    try:
        token = jwt.encode({"tenant": "team-jwt", "exp": int(time.time()) + 600}, key, algorithm="RS256")
        assert status(gw, token) == 200
        (tmp_path / "idp.pem").write_text("-----BEGIN PUBLIC KEY-----\nbroken\n-----END PUBLIC KEY-----\n")
        hangup(gw)
        wait_until(lambda: reloads(gw, "error") == 1, 10, 0.05, "the refused reload")
        assert "config reload refused: auth.jwt.public_key_file: idp.pem: holds no public key" in gw.log_text()
        assert status(gw, token) == 200 and reloads(gw, "ok") == 0
    finally:
        gw.stop()


def test_ten_quick_sighups_to_two_workers_write_ten_entries(tmp_path: Path, sim: Simulator) -> None:
    """One config.reload entry per signal to the supervisor, however close together: the
    workers of one reload share its id; a worker reading the file late for one relay (or
    getting two relays merged into one by the kernel) takes every id announced since its
    last, never a fresh one for a supervisor's reload (which made 13-14 entries)."""
    gw = GatewayProcess(tmp_path, sim.url, [TenantSpec("team-quick")], workers=2)
    gw.start()
    try:
        wait_until(lambda: gw.log_text().count("Application startup complete") >= 2, 30, 0.05, "both workers started")
        for _ in range(10):
            hangup(gw)
            time.sleep(0.2)  # the spacing under test, not a wait for a state
        url = f"sqlite:///{tmp_path / f'gw-{gw.port}.db'}"
        wait_until(lambda: len(reload_audit(url)) >= 10, 20, 0.1, "ten entries")
        time.sleep(1.0)  # a reload takes milliseconds: an extra entry would be written by now
        entries = reload_audit(url)
        assert len(entries) == 10, [e.id for e in entries]
        assert all(e.changes == {"result": "ok", "problems": 0} for e in entries)
    finally:
        gw.stop()


def test_a_worker_takes_every_announced_id_once_and_none_from_before_it_started(tmp_path: Path) -> None:
    path = str(tmp_path / "reload-id")
    assert ReloadIds(path).announced() == []  # nothing announced yet
    before = announce_reload(path, time.time())
    worker = ReloadIds(path)
    first, second = announce_reload(path, time.time()), announce_reload(path, time.time())
    assert worker.announced() == [first, second] and before not in (first, second)
    assert worker.announced() == []  # a relay merged into the one before finds nothing new
    third = announce_reload(path, time.time())
    assert worker.announced() == [third]
    assert ReloadIds(None).announced() == []  # no supervisor
