"""The upstream simulator, driven over real HTTP the way the gateway will drive it.

One simulator (uvicorn in a background thread) serves the module; every test starts from
POST /_sim/reset. Callbacks land in a tiny threaded HTTP server. States are polled, never
waited for with fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import eventually, wait_until

from gateway.devtools.simulator import (
    SAMPLE_JPG,
    SAMPLE_MP4,
    SimulatorSettings,
    create_simulator_app,
    settings_from_env,
)

KEY = "sk-sim-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
FINISH = 0.3  # seconds_to_finish for these tests: quick, yet RUNNING is observable
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
IMAGE = "https://d2jqrm6oza8nb6.cloudfront.net/previews/x.jpeg?_jwt=abc"
TASK_KEYS = {
    "id",
    "name",
    "image",
    "createdAt",
    "updatedAt",
    "taskType",
    "options",
    "status",
    "error",
    "progressText",
    "progressRatio",
    "estimatedTimeToStartSeconds",
    "artifacts",
    "sharedAsset",
}


def example_body(**top: Any) -> dict[str, Any]:
    """The relay documentation's example request."""
    body: dict[str, Any] = {
        "taskType": "gen2",
        "internal": False,
        "options": {
            "name": "Gen-2 1919715046",
            "gen2Options": {
                "mode": "gen2",
                "seed": 1919715046,
                "interpolate": True,
                "upscale": False,
                "watermark": True,
                "motion_score": 22,
                "use_motion_score": True,
                "use_motion_vectors": False,
                "text_prompt": "The wind blows hair up.",
                "image_prompt": IMAGE,
                "init_image": IMAGE,
            },
            "exploreMode": False,
            "assetGroupName": "Generative Video",
        },
    }
    body.update(top)
    return body


def _free_socket() -> socket.socket:
    """A bound TCP socket on a free port. proto=IPPROTO_TCP matters: asyncio only sets
    TCP_NODELAY on sockets whose proto says TCP, and without it every answer waits ~40 ms."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    """A real simulator on a free port, in a thread with its own event loop."""
    sock = _free_socket()
    app = create_simulator_app(SimulatorSettings(api_keys=(KEY, "sk-second"), seconds_to_finish=FINISH))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 10, 0.01, "the simulator to start")
    assert server.started, "simulator did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@dataclass
class HookReceiver:
    """Collects the JSON bodies POSTed to it; `url` is what goes into notify_hook."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def statuses(self, task_id: str) -> list[str]:
        with self.lock:
            return [b["task"]["status"] for b in self.bodies if b["task"]["id"] == task_id]


@pytest.fixture
def hooks() -> Iterator[HookReceiver]:
    receiver = HookReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with receiver.lock:
                receiver.bodies.append(body)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture
async def client(sim_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim_url, timeout=5) as http:
        assert (await http.post("/_sim/reset")).status_code == 200
        yield http


async def create(client: httpx.AsyncClient, **top: Any) -> dict[str, Any]:
    response = await client.post("/runway/tasks", headers=AUTH, json=example_body(**top))
    assert response.status_code == 200, response.text
    return response.json()["task"]


async def wait_terminal(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    async def terminal() -> dict[str, Any] | None:
        task = (await client.get(f"/runway/tasks/{task_id}", headers=AUTH)).json()["task"]
        return task if task["status"] in ("SUCCEEDED", "FAILED") else None

    return await eventually(terminal)


async def control(client: httpx.AsyncClient, **fields: Any) -> None:
    response = await client.post("/_sim/control", json=fields)
    assert response.status_code == 200, response.text


async def test_create_answers_the_relays_exact_shape(client: httpx.AsyncClient) -> None:
    sent = example_body()
    response = await client.post("/runway/tasks", headers=AUTH, json=sent)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["task"]
    task = body["task"]
    assert set(task) == TASK_KEYS
    assert uuid.UUID(task["id"]).version == 4
    assert task["name"] == "Gen-2 1919715046"
    assert ISO_MS.match(task["createdAt"]) and ISO_MS.match(task["updatedAt"])
    assert task["options"] == {**sent["options"], "seconds": 4, "recordingEnabled": True}
    assert (task["taskType"], task["status"], task["artifacts"]) == ("gen2", "PENDING", [])
    assert task["image"] is task["error"] is task["progressText"] is task["progressRatio"] is None
    assert task["sharedAsset"] is None
    assert isinstance(task["estimatedTimeToStartSeconds"], float)


async def test_second_key_and_client_seconds_are_kept(client: httpx.AsyncClient) -> None:
    body = example_body()
    body["options"]["seconds"] = 8
    del body["options"]["name"]
    response = await client.post("/runway/tasks", headers={"authorization": "bearer sk-second"}, json=body)
    task = response.json()["task"]
    assert (response.status_code, task["options"]["seconds"], task["name"]) == (200, 8, "Gen-2 1919715046")


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}]
)
async def test_bad_key_is_401_with_json_error(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.post("/runway/tasks", headers=headers, json=example_body())
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert (await client.get(f"/runway/tasks/{uuid.uuid4()}", headers=headers)).status_code == 401
    assert (await client.get("/_sim/tasks")).json() == {"tasks": []}


def _mutate(path: str, value: Any) -> dict[str, Any]:
    """The example body with one field (dotted path) set to `value`, or removed if DELETE."""
    body = example_body()
    *parents, last = path.split(".")
    target = body
    for name in parents:
        target = target[name]
    if value == "DELETE":
        del target[last]
    else:
        target[last] = value
    return body


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("taskType", "gen3"),
        ("taskType", "DELETE"),
        ("internal", "no"),
        ("options", "DELETE"),
        ("options", []),
        ("options.gen2Options", "DELETE"),
        ("options.gen2Options", "x"),
        ("options.name", 5),
        ("options.seconds", "4"),
        ("options.gen2Options.mode", "gen3"),
        ("options.gen2Options.seed", 4294967296),
        ("options.gen2Options.seed", -1),
        ("options.gen2Options.seed", True),
        ("options.gen2Options.seed", 1.5),
        ("options.gen2Options.interpolate", "true"),
        ("options.gen2Options.motion_score", 2.5),
        ("options.gen2Options.text_prompt", None),
        ("options.gen2Options.image_prompt", ""),
        ("options.gen2Options.image_prompt", "http://example.com/a.jpg"),
        ("options.gen2Options.init_image", "not a url"),
        ("notify_hook", "ftp://example.com/hook"),
        ("notify_hook", None),
    ],
)
async def test_bad_bodies_are_400(client: httpx.AsyncClient, path: str, value: Any) -> None:
    response = await client.post("/runway/tasks", headers=AUTH, json=_mutate(path, value))
    assert response.status_code == 400, path
    assert response.json()["error"]["message"].startswith(path.split(".")[0])


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'"gen2"', b""])
async def test_non_object_bodies_are_400(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post("/runway/tasks", headers={**AUTH, "content-type": "application/json"}, content=content)
    assert response.status_code == 400
    assert "error" in response.json()


async def test_seed_bounds_and_omitted_image_are_accepted(client: httpx.AsyncClient) -> None:
    for seed in (0, 4294967295):
        body = _mutate("options.gen2Options.seed", seed)
        del body["options"]["gen2Options"]["image_prompt"], body["options"]["gen2Options"]["init_image"]
        assert (await client.post("/runway/tasks", headers=AUTH, json=body)).status_code == 200


async def test_task_succeeds_and_callbacks_carry_running_then_succeeded(
    client: httpx.AsyncClient, hooks: HookReceiver, sim_url: str
) -> None:
    await control(client, seconds_to_finish=2)  # RUNNING lasts long enough to be seen under load
    task = await create(client, notify_hook=hooks.url)
    assert task["status"] == "PENDING"
    seen = {task["status"]}
    while "SUCCEEDED" not in seen:  # poll, recording every state observed on the way
        current = (await client.get(f"/runway/tasks/{task['id']}", headers=AUTH)).json()["task"]
        seen.add(current["status"])
        await asyncio.sleep(0.02)
    assert seen == {"PENDING", "RUNNING", "SUCCEEDED"}
    await eventually(lambda: len(hooks.statuses(task["id"])) == 2)
    assert hooks.statuses(task["id"]) == ["RUNNING", "SUCCEEDED"]
    final = hooks.bodies[-1]["task"]
    assert final == current
    assert final["progressRatio"] == "1" and final["error"] is None
    [artifact] = final["artifacts"]
    assert artifact["url"] == f"{sim_url}/_sim/artifacts/{task['id']}.mp4"
    assert artifact["previewUrls"] == [f"{sim_url}/_sim/artifacts/{task['id']}.jpg"]
    assert artifact["filename"].endswith(".mp4") and artifact["metadata"]["frameRate"] == 24
    assert final["updatedAt"] > final["createdAt"]


async def test_artifact_bytes_are_the_sample_files(client: httpx.AsyncClient) -> None:
    task = await wait_terminal(client, (await create(client))["id"])
    video = await client.get(task["artifacts"][0]["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content == SAMPLE_MP4.read_bytes()
    assert int(video.headers["content-length"]) == SAMPLE_MP4.stat().st_size
    assert video.content[4:8] == b"ftyp"
    thumb = await client.get(task["artifacts"][0]["previewUrls"][0])
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content == SAMPLE_JPG.read_bytes()
    assert thumb.content[:2] == b"\xff\xd8"
    assert (await client.get("/_sim/artifacts/x.gif")).status_code == 404


async def test_fail_rate_one_gives_failed(client: httpx.AsyncClient, hooks: HookReceiver) -> None:
    await control(client, fail_rate=1)
    task = await wait_terminal(client, (await create(client, notify_hook=hooks.url))["id"])
    assert task["status"] == "FAILED" and task["artifacts"] == []
    assert set(task["error"]) == {"message", "reason"}
    await eventually(lambda: hooks.statuses(task["id"]) == ["RUNNING", "FAILED"])


async def test_zero_seconds_finishes_at_once(client: httpx.AsyncClient) -> None:
    await control(client, seconds_to_finish=0)
    started = time.monotonic()
    task = await wait_terminal(client, (await create(client))["id"])
    assert task["status"] == "SUCCEEDED" and time.monotonic() - started < 3  # FINISH would be 0.3 s


@pytest.mark.parametrize("status", [500, 429, 503])
async def test_create_status_answers_that_status(client: httpx.AsyncClient, status: int) -> None:
    await control(client, create_status=status)
    response = await client.post("/runway/tasks", headers=AUTH, json=example_body())
    assert response.status_code == status and "error" in response.json()
    assert ("retry-after" in response.headers) == (status == 429)
    assert (await client.get("/_sim/tasks")).json() == {"tasks": []}
    await control(client, create_status=0)
    await create(client)


async def test_create_fail_rate_fails_that_share_of_creates_before_any_task(client: httpx.AsyncClient) -> None:
    await control(client, create_fail_rate=1, create_status=503)
    response = await client.post("/runway/tasks", headers=AUTH, json=example_body())
    assert response.status_code == 503 and "error" in response.json()
    await control(client, create_fail_rate=0.5, create_status=0)
    statuses = [(await client.post("/runway/tasks", headers=AUTH, json=example_body())).status_code for _ in range(60)]
    assert set(statuses) == {200, 500} and 10 <= statuses.count(500) <= 50
    assert len((await client.get("/_sim/tasks")).json()["tasks"]) == statuses.count(200)


async def test_garbage_answers_200_html(client: httpx.AsyncClient) -> None:
    await control(client, garbage=True)
    response = await client.post("/runway/tasks", headers=AUTH, json=example_body())
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)


async def test_status_status_and_unknown_id(client: httpx.AsyncClient) -> None:
    task = await create(client)
    assert (await client.get(f"/runway/tasks/{uuid.uuid4()}", headers=AUTH)).status_code == 404
    await control(client, status_status=502)
    response = await client.get(f"/runway/tasks/{task['id']}", headers=AUTH)
    assert response.status_code == 502 and "error" in response.json()


async def test_latency_delays_creates_and_status_calls(client: httpx.AsyncClient) -> None:
    await control(client, latency_seconds=0.2)
    started = time.monotonic()
    task = await create(client)
    await client.get(f"/runway/tasks/{task['id']}", headers=AUTH)
    assert time.monotonic() - started >= 0.4


async def test_callback_misbehaviour(client: httpx.AsyncClient, hooks: HookReceiver) -> None:
    await control(client, duplicate_callbacks=True)
    doubled = await create(client, notify_hook=hooks.url)
    await eventually(lambda: len(hooks.statuses(doubled["id"])) == 4)
    assert hooks.statuses(doubled["id"]) == ["RUNNING", "RUNNING", "SUCCEEDED", "SUCCEEDED"]

    await control(client, duplicate_callbacks=False, reverse_callbacks=True)
    reversed_ = await create(client, notify_hook=hooks.url)
    await eventually(lambda: len(hooks.statuses(reversed_["id"])) == 2)
    assert hooks.statuses(reversed_["id"]) == ["SUCCEEDED", "RUNNING"]

    await control(client, reverse_callbacks=False, drop_callbacks=True)
    dropped = await create(client, notify_hook=hooks.url)
    assert (await wait_terminal(client, dropped["id"]))["status"] == "SUCCEEDED"
    # a callback is recorded as it is decided, before the status that causes it is visible
    callbacks = (await client.get("/_sim/requests")).json()["callbacks"]
    assert [c for c in callbacks if c["task_id"] == dropped["id"]] == []
    assert hooks.statuses(dropped["id"]) == []


async def test_unreachable_hook_does_not_stop_the_task(client: httpx.AsyncClient) -> None:
    closed = _free_socket()  # bound, never listening: connection refused
    hook = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    try:
        task = await wait_terminal(client, (await create(client, notify_hook=hook))["id"])
    finally:
        closed.close()
    assert task["status"] == "SUCCEEDED"
    callbacks = (await client.get("/_sim/requests")).json()["callbacks"]
    assert [c["status"] for c in callbacks] == ["RUNNING", "SUCCEEDED"] and "error" in callbacks[0]


async def test_big_streams_exact_deterministic_bytes(client: httpx.AsyncClient) -> None:
    size = 3 * 262144 + 1001
    async with client.stream("GET", f"/_sim/big?bytes={size}") as response:
        assert response.headers["content-type"] == "video/mp4"
        assert response.headers["content-length"] == str(size)
        data = b"".join([chunk async for chunk in response.aiter_raw()])
    assert data == bytes(i % 256 for i in range(size))
    for bad in ("-1", "x", "", "1e3"):
        assert (await client.get(f"/_sim/big?bytes={bad}")).status_code == 400


async def test_artifact_bytes_points_new_tasks_at_big(client: httpx.AsyncClient, sim_url: str) -> None:
    await control(client, artifact_bytes=200 * 1024 * 1024)
    task = await wait_terminal(client, (await create(client))["id"])
    url = task["artifacts"][0]["url"]
    assert url == f"{sim_url}/_sim/big?bytes={200 * 1024 * 1024}"
    async with client.stream("GET", url) as response:
        assert response.headers["content-length"] == str(200 * 1024 * 1024)
        first = await anext(response.aiter_raw())
    assert first[:4] == bytes([0, 1, 2, 3])


async def test_hang_after_create_records_the_task_and_never_answers(client: httpx.AsyncClient) -> None:
    await control(client, hang_after_create=True)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/runway/tasks", headers=AUTH, json=example_body(), timeout=0.3)
    [task] = (await client.get("/_sim/tasks")).json()["tasks"]
    assert (await wait_terminal(client, task["id"]))["status"] == "SUCCEEDED"


async def test_observation_endpoints_and_reset(client: httpx.AsyncClient) -> None:
    task = await create(client)
    await client.post("/runway/tasks", headers=AUTH, content=b"oops")
    for _ in range(3):
        await client.get(f"/runway/tasks/{task['id']}", headers=AUTH)
    seen = (await client.get("/_sim/requests")).json()
    first, second = seen["creates"]
    assert first["headers"]["authorization"] == AUTH["Authorization"]
    assert first["headers"]["content-type"] == "application/json"
    assert all(name == name.lower() for name in first["headers"])
    assert (first["body"], first["task_id"]) == (example_body(), task["id"])
    assert (second["body"], second["raw_body"], second["task_id"]) == (None, "oops", None)
    assert (seen["creates_total"], seen["status_calls"]) == (2, 3)
    assert seen["status_calls_by_id"] == {task["id"]: 3}
    [listed] = (await client.get("/_sim/tasks")).json()["tasks"]
    assert listed["id"] == task["id"] and listed["status"] in ("PENDING", "RUNNING", "SUCCEEDED")

    await control(client, fail_rate=0.5, latency_seconds=0.01)
    reset = (await client.post("/_sim/reset")).json()
    assert (reset["fail_rate"], reset["latency_seconds"], reset["seconds_to_finish"]) == (0.0, 0.0, FINISH)
    assert (await client.get("/_sim/tasks")).json() == {"tasks": []}
    assert (await client.get(f"/runway/tasks/{task['id']}", headers=AUTH)).status_code == 404
    cleared = (await client.get("/_sim/requests")).json()
    assert (cleared["creates"], cleared["creates_total"], cleared["callbacks"]) == ([], 0, [])
    assert cleared["status_calls_by_id"] == {task["id"]: 1}  # the 404 call just made


@pytest.mark.parametrize(
    "content",
    [
        b"nope",
        b"[]",
        b'{"bogus": 1}',
        b'{"garbage": 1}',
        b'{"fail_rate": 2}',
        b'{"create_fail_rate": 1.5}',
        b'{"create_status": 200}',
        b'{"artifact_bytes": 1.5}',
        b'{"latency_seconds": -1}',
        b'{"drop_callbacks": "yes"}',
        b'{"seconds_to_finish": true}',
    ],
)
async def test_bad_control_is_400_and_changes_nothing(client: httpx.AsyncClient, content: bytes) -> None:
    before = (await client.get("/_sim/control")).json()
    response = await client.post("/_sim/control", content=content)
    assert response.status_code == 400 and "error" in response.json()
    assert (await client.get("/_sim/control")).json() == before


async def test_control_merges_fields(client: httpx.AsyncClient) -> None:
    await control(client, latency_seconds=0.5)
    await control(client, create_status=429)
    state = (await client.get("/_sim/control")).json()
    assert (state["latency_seconds"], state["create_status"], state["garbage"]) == (0.5, 429, False)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMULATOR_API_KEYS", " sk-a, sk-b ,,")
    monkeypatch.setenv("SIMULATOR_FAIL_RATE", "0.25")
    settings = settings_from_env(seconds_to_finish=1.5, public_url=None, api_keys=[])
    assert settings == SimulatorSettings(api_keys=("sk-a", "sk-b"), seconds_to_finish=1.5, fail_rate=0.25)
    assert settings_from_env(api_keys=["sk-c"]).api_keys == ("sk-c",)
    assert settings_from_env(api_keys="sk-d").api_keys == ("sk-d",)
    monkeypatch.delenv("SIMULATOR_API_KEYS")
    assert settings_from_env().api_keys == ("sk-sim-upstream",)
    with pytest.raises(ValueError):
        SimulatorSettings(fail_rate=1.5)


def test_apps_share_no_state() -> None:
    first = create_simulator_app(SimulatorSettings())
    second = create_simulator_app(SimulatorSettings(seconds_to_finish=1))
    assert first.state.simulator is not second.state.simulator
    assert first.state.simulator.tasks is not second.state.simulator.tasks
