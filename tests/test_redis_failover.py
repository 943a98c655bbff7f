"""Redis failover under load: a replica is promoted, the old primary demoted, and the name
the gateway connects to moves from one to the other. No create answers 500, none is lost
or charged twice, and /readyz says 503 while the store cannot take writes.

What is real here: two `redis-server` processes (B a replica of A), a real gateway process
(uvicorn) on Redis in front of the simulator, creates sent continuously over HTTP, and the
failover done with Redis's own commands: `REPLICAOF NO ONE` promotes B, `REPLICAOF B`
demotes A, which then answers `-READONLY` on the connections already open to it, the
state the issue describes.

The one stand-in is the moving name. A DNS name (or a Kubernetes Service, or a cloud
Redis endpoint) cannot be moved deterministically from a test without root or a resolver
of our own, so `NameSwitch` plays it: a TCP forwarder on a fixed port whose *new*
connections go to its current target, while connections already open stay with the server
they reached, exactly as after a DNS change. The gateway must therefore drop its connection
to follow, which is the behaviour under test.

The failover is lossless on the Redis side, as a managed failover is (Redis's own
`FAILOVER` does the same): writes on A are paused (`CLIENT PAUSE WRITE`) until B has
replicated everything, then the roles switch and A is unpaused. So every charge the gateway
made on A is on B, and any mismatch in the counts is the gateway's.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import GatewayProcess, RedisServer, Simulator, TenantSpec, gen2_body, wait_until

PRICE = 10  # the default gen2 price: credits per task


class NameSwitch:
    """A TCP name for Redis that an operator moves: new connections go to `target`."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="name-switch", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]

    def move_to(self, port: int) -> None:
        """What a DNS update does: later connections reach `port`, open ones stay."""
        self.target_port = port

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _listen(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._forward, "127.0.0.1", 0)

    async def _forward(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
        finally:
            client_w.close()
            server_w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side ends; then close the other side too."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@pytest.fixture
def redis_pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A (primary) and B (its replica), with the replication link up."""
    a = RedisServer(tmp_path)
    a.start()
    b = RedisServer(tmp_path, extra=("--replicaof", "127.0.0.1", str(a.port)))
    b.start()
    wait_until(lambda: b.client().info("replication").get("master_link_status") == "up", 10, message="B replicating A")
    yield a, b
    b.stop()
    a.stop()


@pytest.fixture
def name_switch(redis_pair: tuple[RedisServer, RedisServer]) -> Iterator[NameSwitch]:
    switch = NameSwitch(redis_pair[0].port)
    switch.start()
    yield switch
    switch.stop()


class CreateLoad:
    """Creates sent continuously from a few threads, each reply recorded."""

    def __init__(self, gw: GatewayProcess, tenant: str, threads: int = 4):
        self.gw, self.tenant = gw, tenant
        self.replies: list[tuple[int, str | None, str | None]] = []  # status, error code, task id
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> CreateLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)

    def _run(self, worker: int) -> None:
        with self.gw.client(self.tenant, timeout=30) as client:
            n = 0
            while not self.stopping.is_set():
                n += 1
                resp = client.post("/runway/tasks", json=gen2_body(f"failover {worker}-{n}"))
                body: dict[str, Any] = resp.json()
                reply = (resp.status_code, (body.get("error") or {}).get("code"), (body.get("task") or {}).get("id"))
                with self.lock:
                    self.replies.append(reply)

    def count(self, status: int) -> int:
        with self.lock:
            return sum(1 for s, _, _ in self.replies if s == status)


def _ready(gw: GatewayProcess) -> int:
    return httpx.get(gw.url + "/readyz", timeout=10).status_code


def _fail_over(old: RedisServer, new: RedisServer) -> None:
    """Promote `new`, demote `old` to its replica; nothing written to `old` is lost."""
    o, n = old.client(), new.client()
    o.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
    target = o.info("replication")["master_repl_offset"]
    wait_until(lambda: n.info("replication")["slave_repl_offset"] >= target, 5, message="the replica caught up")
    n.execute_command("REPLICAOF", "NO", "ONE")
    o.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
    o.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.timeout(180)
def test_creates_survive_a_redis_failover_without_500s_or_lost_or_double_charges(
    tmp_path: Path, own_sim: Simulator, redis_pair: tuple[RedisServer, RedisServer], name_switch: NameSwitch
) -> None:
    a, b = redis_pair
    # No callback during the test (only creates count), and each create waits 0.3 s at the
    # upstream: creates are always in flight there, so some are charged on A and must be
    # recorded after the switch, on B (the gateway retries that write through the outage).
    own_sim.control(seconds_to_finish=600, latency_seconds=0.3)
    gw = GatewayProcess(tmp_path, own_sim.url, [TenantSpec("t")], store_url=f"redis://127.0.0.1:{name_switch.port}/0")
    gw.start()
    try:
        with CreateLoad(gw, "t", threads=6) as load:
            wait_until(lambda: load.count(200) >= 20, 30, message="creates before the failover")
            _fail_over(a, b)
            upstream_at_failover = len(own_sim.tasks())
            # The name still points at the demoted A (DNS not moved yet): every write there
            # is refused, so the gateway is not ready and a new create gets 503 (it is not
            # admitted: nothing charged, nothing sent upstream).
            wait_until(lambda: _ready(gw) == 503, 15, message="/readyz 503 while the store cannot take writes")
            assert "gateway_ready 0.0" in httpx.get(gw.url + "/metrics", timeout=10).text
            with gw.client("t") as client:
                refused = client.post("/runway/tasks", json=gen2_body("during the failover"))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable", refused.text
            # Creates admitted (and charged) on A before the switch get their upstream answer
            # now; recording it on A fails, and the gateway keeps trying until the name moves.
            wait_until(
                lambda: len(own_sim.tasks()) > upstream_at_failover,
                15,
                message="an upstream answer during the failover",
            )
            name_switch.move_to(b.port)
            wait_until(lambda: _ready(gw) == 200, 15, message="/readyz 200 on the new primary")
            assert "gateway_ready 1.0" in httpx.get(gw.url + "/metrics", timeout=10).text
            after = load.count(200)
            wait_until(lambda: load.count(200) >= after + 20, 30, message="creates after the failover")
        replies = list(load.replies)
        statuses = Counter(status for status, _, _ in replies)
        assert set(statuses) <= {200, 503}, statuses  # zero 500s (or anything else)
        assert {code for status, code, _ in replies if status == 503} <= {"store_unavailable"}
        created = [task_id for status, _, task_id in replies if status == 200]
        upstream_ids = {task["id"] for task in own_sim.tasks()}
        # Each 2xx is one upstream task, and each upstream task one 2xx: none lost, none twice.
        assert len(created) == len(set(created)) and set(created) == upstream_ids
        usage = gw.usage("t")  # read from B, the new primary
        assert usage["tasks_today"] == len(created) and usage["credits_today"] == PRICE * len(created), usage
        assert usage["active"] == len(created)
        assert b.client().info("replication")["role"] == "master" and a.client().info("replication")["role"] == "slave"
        assert {e["status"] for e in gw.access_log() if e.get("route") == "/runway/tasks"} <= {200, 503}
    finally:
        gw.stop()
