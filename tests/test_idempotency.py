"""Idempotent creates (`Idempotency-Key`), through real servers: concurrent retries make one
task, a different body under the same key is 409, a 5xx frees the key, a 400 replays.

Then a create whose upstream outcome is unknown. The simulator holds a create's answer past the gateway's 3 s timeout (`hang_after_create`:
the task exists upstream, the gateway answers 504) or answers it with garbage. A retry
with the same Idempotency-Key must never create a second task: it gets 409
`idempotency_outcome_unknown` until a callback identifies the task, then the task itself.
An unknown outcome never identified frees its active slot after
`unknown_outcome_timeout_seconds`, its charge kept.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from conftest import UPSTREAM_KEY, GatewayProcess, Simulator, TenantSpec, gen2_body, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks client.videos deprecated


def hold_the_answer(sim: Simulator) -> None:
    """The next create makes its task but never answers in time; its callbacks are held
    back (dropped) until the test lets them through. It finishes 8 s after creation: the
    test has ~5 s after the 504 to check the 409s before the last callback goes out."""
    sim.control(hang_after_create=True, drop_callbacks=True, seconds_to_finish=8)


def only_sim_task(sim: Simulator) -> str:
    tasks = sim.tasks()
    assert len(tasks) == 1, tasks
    return tasks[0]["id"]


def first_answer_or_none(call: Callable[[], Any]) -> Any:
    """The SDK call's answer, or None while it raises 409 (outcome still unknown)."""
    try:
        return call()
    except openai.ConflictError:
        return None


def test_native_retry_after_a_timeout_waits_for_the_task_instead_of_buying_another(
    own_sim: Simulator, start_gateway
) -> None:
    g: GatewayProcess = start_gateway(own_sim.url, [TenantSpec("t")])
    hold_the_answer(own_sim)
    body, key = gen2_body("Once, even after a timeout."), {"Idempotency-Key": "order-unknown-1"}
    with g.client("t") as c:
        first = c.post("/runway/tasks", json=body, headers=key)
        assert first.status_code == 504 and first.json()["error"]["code"] == "upstream_timeout"
        charged = g.usage("t")
        assert (charged["tasks_today"], charged["active"]) == (1, 1)

        again = c.post("/runway/tasks", json=body, headers=key)
        assert again.status_code == 409, again.text
        assert again.json()["error"] == {
            "message": again.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": "Idempotency-Key",
            "code": "idempotency_outcome_unknown",
        }
        assert int(again.headers["retry-after"]) >= 1
        assert own_sim.requests()["creates_total"] == 1
        other = c.post("/runway/tasks", json=gen2_body("another body"), headers=key)
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"

        own_sim.control(drop_callbacks=False)  # the task's next callback identifies it
        task_id = only_sim_task(own_sim)
        replay: httpx.Response = wait_until(
            lambda: (r := c.post("/runway/tasks", json=body, headers=key)).status_code != 409 and r,
            20,
            0.2,
            "the replay",
        )
    assert replay.status_code == 200, replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["task"]["id"] == task_id and "notify_hook" not in replay.json()["task"]
    assert own_sim.requests()["creates_total"] == 1
    usage = g.usage("t")
    assert (usage["tasks_today"], usage["credits_today"]) == (1, charged["credits_today"])


def test_sdk_retry_after_a_timeout_gets_409_then_the_video(own_sim: Simulator, start_gateway) -> None:
    g: GatewayProcess = start_gateway(own_sim.url, [TenantSpec("t")])
    hold_the_answer(own_sim)
    client = openai.OpenAI(base_url=g.url + "/v1", api_key=g.tenants["t"].key, max_retries=0, timeout=20)
    key = {"Idempotency-Key": "video-unknown-1"}

    def create() -> Any:
        return client.videos.with_raw_response.create(prompt="A lighthouse, bought once", extra_headers=key)

    with pytest.raises(openai.InternalServerError) as first:
        create()
    assert first.value.status_code == 504 and first.value.code == "upstream_timeout"
    charged = g.usage("t")
    with pytest.raises(openai.ConflictError) as again:
        create()
    assert again.value.code == "idempotency_outcome_unknown" and again.value.param == "Idempotency-Key"
    assert int(again.value.response.headers["retry-after"]) >= 1
    assert own_sim.requests()["creates_total"] == 1

    own_sim.control(drop_callbacks=False)
    task_id = only_sim_task(own_sim)
    raw = wait_until(lambda: first_answer_or_none(create), 20, 0.2, "the replayed video")
    video = raw.parse()
    assert raw.headers["idempotent-replayed"] == "true"
    assert video.id == task_id and video.object == "video" and video.prompt == "A lighthouse, bought once"
    assert client.videos.retrieve(task_id).id == task_id
    assert own_sim.requests()["creates_total"] == 1
    usage = g.usage("t")
    assert (usage["tasks_today"], usage["credits_today"]) == (1, charged["credits_today"])


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_an_unknown_outcome_frees_its_slot_after_unknown_outcome_timeout_seconds(
    own_sim: Simulator, start_gateway, store: str, request: pytest.FixtureRequest
) -> None:
    store_url = request.getfixturevalue("redis_store_url") if store == "redis" else None
    tenant = TenantSpec("t", limits={"max_active_tasks": 1})
    g: GatewayProcess = start_gateway(
        own_sim.url, [tenant], store_url=store_url, upstream_section="unknown_outcome_timeout_seconds = 2"
    )
    own_sim.control(garbage=True, drop_callbacks=True)  # 200 text/html: sent, no task to identify
    with g.client("t") as c:
        first = c.post("/runway/tasks", json=gen2_body())
        assert first.status_code == 502 and first.json()["error"]["code"] == "upstream_error"
        charged = g.usage("t")
        assert (charged["active"], charged["tasks_today"]) == (1, 1)
        refused = c.post("/runway/tasks", json=gen2_body())
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"

        own_sim.control(garbage=False)
        admitted: httpx.Response = wait_until(
            lambda: (r := c.post("/runway/tasks", json=gen2_body())).status_code != 429 and r, 20, 0.2, "the slot freed"
        )
    assert admitted.status_code == 200, admitted.text
    usage = g.usage("t")  # the unknown create's charge stands
    assert (usage["tasks_today"], usage["credits_today"]) == (2, 2 * charged["credits_today"])
    logs = g.access_log()
    [unknown] = [line for line in logs if line.get("event") == "create_outcome_unknown"]
    [expired] = [line for line in logs if line.get("event") == "create_outcome_unknown_expired"]
    assert expired["level"] == "warning" and expired["tenant"] == "t" and expired["rid"] == unknown["rid"]
    text = g.log_text()
    assert UPSTREAM_KEY not in text and tenant.key not in text


def test_concurrent_idempotent_creates_make_one_task(own_sim: Simulator, start_gateway) -> None:
    own_sim.control(latency_seconds=0.3)
    g = start_gateway(own_sim.url, [TenantSpec("t", limits={"credits_per_day": 1000})])
    body = gen2_body("idempotent")

    def post(_: int) -> httpx.Response:
        with g.client("t") as c:
            return c.post("/runway/tasks", json=body, headers={"Idempotency-Key": "order-42"})

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(post, range(20)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 19
    assert own_sim.requests()["creates_total"] == 1
    assert g.usage("t")["credits_today"] == 10
    reordered = json.loads(json.dumps(body, sort_keys=True))
    with g.client("t") as c:
        again = c.post("/runway/tasks", json=reordered, headers={"Idempotency-Key": "order-42"})
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        other = c.post("/runway/tasks", json=gen2_body("another body"), headers={"Idempotency-Key": "order-42"})
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
        bad = c.post("/runway/tasks", json=body, headers={"Idempotency-Key": "has space"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_idempotency_key"
    assert own_sim.requests()["creates_total"] == 1


def test_idempotency_key_freed_after_5xx(own_sim: Simulator, start_gateway) -> None:
    g = start_gateway(own_sim.url, [TenantSpec("t")])
    own_sim.control(create_status=500)
    with g.client("t") as c:
        assert c.post("/runway/tasks", json=gen2_body(), headers={"Idempotency-Key": "k1"}).status_code == 502
        own_sim.control(create_status=0)
        second = c.post("/runway/tasks", json=gen2_body(), headers={"Idempotency-Key": "k1"})
        assert second.status_code == 200 and "idempotent-replayed" not in second.headers
        bad = c.post("/runway/tasks", json={"taskType": "gen9"}, headers={"Idempotency-Key": "k2"})
        replay = c.post("/runway/tasks", json={"taskType": "gen9"}, headers={"Idempotency-Key": "k2"})
        assert bad.status_code == replay.status_code == 400 and replay.headers["idempotent-replayed"] == "true"


def test_idempotency_key_freed_after_429(sim: Simulator, start_gateway) -> None:
    """A 429 is not kept: once requests_per_minute has a token again, a retry with the same
    key makes the task instead of replaying the refusal."""
    g = start_gateway(sim.url, [TenantSpec("t", limits={"requests_per_minute": 30})])
    fresh_keys = (f"after-429-{i}" for i in itertools.count())
    with g.client("t") as c:

        def post(key: str) -> httpx.Response:
            return c.post("/runway/tasks", json=gen2_body("after a 429"), headers={"Idempotency-Key": key})

        def refused_create() -> tuple[str, httpx.Response] | None:
            while c.get("/runway/tasks").status_code != 429:  # drain the bucket
                pass
            key = next(fresh_keys)  # a token may come back before the POST: then try anew
            answer = post(key)
            return (key, answer) if answer.status_code == 429 else None

        key, refused = wait_until(refused_create, 10, 0, "a create refused by requests_per_minute")
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        retried = wait_until(lambda: (r := post(key)).status_code != 429 and r, 10, 0.2, "the retry past the 429")
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers, retried.text
    assert retried.json()["task"]["id"] in {create["task_id"] for create in sim.requests()["creates"]}


def key_lifetime(g: GatewayProcess, store_url: str | None, tenant: str, key: str) -> float:
    """Seconds the store still keeps an Idempotency-Key: its Redis hash's TTL, or its
    SQLite row's `expires_at` from now (0 when the key is gone)."""
    import hashlib
    import sqlite3
    import time

    import redis

    from gateway.store.redis.url import split_prefix

    if store_url is None:
        with sqlite3.connect(g.config_path.with_suffix(".db")) as db:
            row = db.execute(
                "SELECT expires_at FROM idempotency WHERE tenant = ? AND key = ?", (tenant, key)
            ).fetchone()
        return 0.0 if row is None else float(row[0]) - time.time()
    url, prefix = split_prefix(store_url)
    name = f"{prefix or ''}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"
    return max(0.0, redis.Redis.from_url(url).pttl(name) / 1000)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_retry_after_the_gateway_died_mid_create_never_buys_a_second_task(
    own_sim: Simulator, start_gateway, store: str, request: pytest.FixtureRequest
) -> None:
    """The crash window: the gateway is SIGKILLed while the upstream holds the create's
    answer (the task exists upstream), before it could keep an answer or bind the key.
    The key was bound to the reservation at admission, so it outlives the dead holder's
    lease (the upstream timeout, 3 s, plus 5 s) by the 24 h of an unknown outcome: a retry
    gets 409 `idempotency_outcome_unknown`, even well after the lease, never a second
    task, and the task itself once its callback reaches the restarted gateway."""
    import signal
    import threading
    import time

    store_url = request.getfixturevalue("redis_store_url") if store == "redis" else None
    g: GatewayProcess = start_gateway(own_sim.url, [TenantSpec("t")], store_url=store_url)
    own_sim.control(hang_after_create=True, drop_callbacks=True, seconds_to_finish=30)
    body, key = gen2_body("Bought once, even across a crash."), {"Idempotency-Key": "order-crash-1"}

    def doomed() -> None:
        with g.client("t") as c, pytest.raises(httpx.TransportError):
            c.post("/runway/tasks", json=body, headers=key)

    sent_at = time.time()
    first = threading.Thread(target=doomed)
    first.start()
    wait_until(lambda: own_sim.requests()["creates_total"] == 1, 10, message="the create upstream")
    g.kill(signal.SIGKILL)
    first.join(10)
    lease_end = sent_at + 3 + 5  # the latest the dead holder's lease can end
    own_sim.control(hang_after_create=False)  # a second create would now succeed at once
    g.start()
    with g.client("t") as c:
        # While the dead holder's lease runs a retry waits for it (409 in use); after it the
        # key is bound to the reservation: outcome unknown. Never a 200 for a new task.
        codes: set[str] = set()

        def unknown() -> bool:
            r = c.post("/runway/tasks", json=body, headers=key)
            assert r.status_code == 409, r.text
            codes.add(r.json()["error"]["code"])
            return r.json()["error"]["code"] == "idempotency_outcome_unknown"

        wait_until(unknown, 20, 0.5, "the key bound to the reservation")
        assert codes <= {"idempotency_key_in_use", "idempotency_outcome_unknown"}, codes
        # The key is kept for the 24 h of an unknown outcome, counted from the lease's end.
        left = key_lifetime(g, store_url, "t", "order-crash-1")
        assert 86400 - 30 < left <= lease_end + 86400 - time.time() + 1, left
        wait_until(lambda: time.time() > lease_end + 4, 10, 0.2, "well after the lease")
        late = c.post("/runway/tasks", json=body, headers=key)
        assert late.status_code == 409 and late.json()["error"]["code"] == "idempotency_outcome_unknown", late.text
        assert own_sim.requests()["creates_total"] == 1
        assert g.usage("t")["tasks_today"] == 1
        own_sim.control(drop_callbacks=False)  # the task's next callback identifies it
        task_id = only_sim_task(own_sim)
        replay: httpx.Response = wait_until(
            lambda: (r := c.post("/runway/tasks", json=body, headers=key)).status_code != 409 and r,
            30,
            0.3,
            "the replay",
        )
    assert replay.status_code == 200, replay.text
    assert replay.json()["task"]["id"] == task_id
    assert own_sim.requests()["creates_total"] == 1
    assert g.usage("t")["tasks_today"] == 1
