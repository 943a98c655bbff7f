"""A local stand-in for the paid Runway gen2 relay (gateway contract, section 8).

The demo, the tests and the benchmarks run against this instead of the real relay, so it
speaks the relay's protocol (`upstream-api.md`) strictly enough that gateway bugs show up
here rather than on the bill, and it can be told to misbehave the ways relays do.

Relay protocol:
  POST /runway/tasks          create; answers {"task": {...}} with status PENDING
  GET  /runway/tasks/{id}     the task's current state, same body
Lifecycle, over `seconds_to_finish` (captured when the task is created): RUNNING at 20 %,
progressRatio "0.5" (a string, as some relays send) at 50 %, 0.8 at 80 %, then SUCCEEDED
(progressRatio "1", one artifact) or FAILED (error {message, reason}) at 100 %. The create
answer carries PENDING; `notify_hook` receives one POST per later status change, RUNNING
then the terminal state (progress alone is not a status change, so it is not posted).

Artifacts: GET /_sim/artifacts/{id}.mp4 | {id}.jpg (the bundled sample files) and
GET /_sim/big?bytes=N (N deterministic bytes, byte i == i % 256, streamed).

Test hooks (no auth; the simulator is a local tool):
  GET|POST /_sim/control   read | merge fields of `Control` (unknown field or bad type: 400)
  POST /_sim/reset         defaults again; forgets tasks, records, in-flight lifecycles
  GET  /_sim/requests      {"creates": [{"headers", "body", "task_id"}], "creates_total",
                            "status_calls", "status_calls_by_id", "callbacks": [...]}
  GET  /_sim/tasks         {"tasks": [task, ...]} every task created since the last reset
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import random
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("gateway.devtools.simulator")

ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE_MP4 = ASSETS / "sample.mp4"
SAMPLE_JPG = ASSETS / "sample.jpg"
MAX_SEED = 4_294_967_295
MAX_BIG_BYTES = 64 << 30
MAX_RECORDED_CREATES = 10_000  # benchmarks send far more; keep memory flat
HANG_LIMIT_SECONDS = 3600.0
_PATTERN = bytes(range(256)) * 1024  # 256 KiB chunk of /_sim/big; a multiple of 256 keeps i % 256
_GARBAGE = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
_BOOL, _INT, _STR = "boolean", "integer", "string"
_OPTION_FIELDS = {"name": _STR, "seconds": _INT, "exploreMode": _BOOL, "assetGroupName": _STR}
_GEN2_FIELDS = {
    "mode": _STR,
    "seed": _INT,
    "interpolate": _BOOL,
    "upscale": _BOOL,
    "watermark": _BOOL,
    "motion_score": _INT,
    "use_motion_score": _BOOL,
    "use_motion_vectors": _BOOL,
    "text_prompt": _STR,
    "image_prompt": _STR,
    "init_image": _STR,
}


@dataclass
class SimulatorSettings:
    """Start-up settings: `Control` starts from them and `/_sim/reset` returns to them."""

    api_keys: tuple[str, ...] = ("sk-sim-upstream",)
    seconds_to_finish: float = 6.0
    fail_rate: float = 0.0
    public_url: str = ""  # base of artifact URLs; "" -> the create request's own base URL

    def __post_init__(self) -> None:
        keys = self.api_keys
        self.api_keys = (keys,) if isinstance(keys, str) else tuple(keys)  # never a tuple of chars
        if not self.api_keys or not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys: at least one non-empty key is required")
        if self.seconds_to_finish < 0.0:
            raise ValueError("seconds_to_finish: must be >= 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate: must be within 0..1")


def settings_from_env(**overrides: Any) -> SimulatorSettings:
    """Settings from SIMULATOR_API_KEYS (comma-separated), SIMULATOR_SECONDS_TO_FINISH,
    SIMULATOR_FAIL_RATE and SIMULATOR_PUBLIC_URL, then `overrides`. None and empty
    overrides are skipped so a CLI can pass its unset flags straight through."""
    env = os.environ
    values: dict[str, Any] = {}
    if keys := [k.strip() for k in env.get("SIMULATOR_API_KEYS", "").split(",") if k.strip()]:
        values["api_keys"] = tuple(keys)
    if raw := env.get("SIMULATOR_SECONDS_TO_FINISH"):
        values["seconds_to_finish"] = float(raw)
    if raw := env.get("SIMULATOR_FAIL_RATE"):
        values["fail_rate"] = float(raw)
    if raw := env.get("SIMULATOR_PUBLIC_URL"):
        values["public_url"] = raw
    values.update({k: v for k, v in overrides.items() if v is not None and v != [] and v != ()})
    return SimulatorSettings(**values)


@dataclass
class Control:
    """Runtime behaviour, merged from POST /_sim/control so tests can make it misbehave."""

    seconds_to_finish: float
    fail_rate: float
    latency_seconds: float = 0.0  # sleep before answering creates and status calls
    create_status: int = 0  # 0 = normal; else answer creates with it and a JSON error
    create_fail_rate: float = 0.0  # this share of creates answered with an error (create_status, or 500)
    status_status: int = 0  # same for GET /runway/tasks/{id}
    retry_after: int = 1  # the `retry-after` seconds of those answers when they are 429s; 0 sends none
    garbage: bool = False  # answer creates 200 text/html (no task is created)
    drop_callbacks: bool = False
    duplicate_callbacks: bool = False
    reverse_callbacks: bool = False  # post the terminal state first, then RUNNING
    hang_after_create: bool = False  # create the task, then hold the answer until the client leaves
    artifact_bytes: int = 0  # > 0: new tasks' artifact is /_sim/big?bytes=N

    def merged(self, changes: Any) -> Control:
        """A copy with `changes` applied; ValueError names the first bad field."""
        if not isinstance(changes, dict):
            raise ValueError("control: body must be a JSON object")
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        for name, value in changes.items():
            if name not in kinds:
                raise ValueError(f"{name}: unknown control field")
            if not _control_value_ok(name, kinds[name], value):
                raise ValueError(f"{name}: invalid value for a {kinds[name]} field")
        return dataclasses.replace(self, **changes)


def _control_value_ok(name: str, kind: Any, value: Any) -> bool:
    """Type and range rules for one control field (types are strings under __future__)."""
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
        return False
    if name in ("create_status", "status_status"):
        return value == 0 or 400 <= value <= 599
    return 0 <= value <= (1 if name in ("fail_rate", "create_fail_rate") else MAX_BIG_BYTES)


def _now() -> str:
    """ISO-8601 UTC with milliseconds and Z, as the relay writes timestamps."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class SimTask:
    """One task as the relay keeps it; `body()` renders the relay's `{"task": {...}}`."""

    id: str
    name: str
    options: dict[str, Any]
    base_url: str
    notify_hook: str | None
    eta_seconds: float
    created_at: str = field(default_factory=_now)
    updated_at: str = ""
    status: str = "PENDING"
    error: dict[str, str] | None = None
    progress_ratio: float | str | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {
            "task": {
                "id": self.id,
                "name": self.name,
                "image": None,
                "createdAt": self.created_at,
                "updatedAt": self.updated_at or self.created_at,
                "taskType": "gen2",
                "options": self.options,
                "status": self.status,
                "error": self.error,
                "progressText": None,
                "progressRatio": self.progress_ratio,
                "estimatedTimeToStartSeconds": self.eta_seconds,
                "artifacts": self.artifacts,
                "sharedAsset": None,
            }
        }


@dataclass(frozen=True)
class _Plan:
    """What a task will do, fixed at creation so later control changes affect new tasks only."""

    seconds: float
    fail: bool
    artifact_bytes: int
    reverse_callbacks: bool


def _json(status: int, payload: Any, **kwargs: Any) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", **kwargs)


def _error(status: int, message: str, code: str, retry_after: int = 1) -> Response:
    headers = {"retry-after": str(retry_after)} if status == 429 and retry_after else None
    return _json(status, {"error": {"message": message, "type": "simulator_error", "code": code}}, headers=headers)


def _is_url(value: Any, schemes: tuple[str, ...]) -> bool:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return False
    parts = urlsplit(value)
    return parts.scheme in schemes and bool(parts.hostname)


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def _check_types(prefix: str, obj: dict[str, Any], kinds: dict[str, str]) -> str | None:
    for name, kind in kinds.items():
        if name in obj and not _type_ok(obj[name], kind):
            return f"{prefix}.{name}: must be a {kind}"
    return None


def _check_gen2_values(options: dict[str, Any], gen2: dict[str, Any]) -> str | None:
    if "seconds" in options and options["seconds"] <= 0:
        return "options.seconds: must be a positive integer"
    if "mode" in gen2 and gen2["mode"] != "gen2":
        return 'options.gen2Options.mode: must be "gen2"'
    if "seed" in gen2 and not 0 <= gen2["seed"] <= MAX_SEED:
        return f"options.gen2Options.seed: must be within 0..{MAX_SEED}"
    for name in ("image_prompt", "init_image"):  # the docs: omit the field when empty
        if name in gen2 and not _is_url(gen2[name], ("https",)):
            return f"options.gen2Options.{name}: must be an https URL (omit it when empty)"
    return None


def validate_create(body: Any) -> str | None:
    """The first problem with a create body, or None. Unknown extra fields pass, as relays
    ignore them; every documented field must have its documented type and range."""
    if not isinstance(body, dict):
        return "body: must be a JSON object"
    if body.get("taskType") != "gen2":
        return 'taskType: must be "gen2"'
    if "internal" in body and not isinstance(body["internal"], bool):
        return "internal: must be a boolean"
    if "notify_hook" in body and not _is_url(body["notify_hook"], ("http", "https")):
        return "notify_hook: must be an http(s) URL"
    options = body.get("options")
    if not isinstance(options, dict):
        return "options: required, must be an object"
    gen2 = options.get("gen2Options")
    if not isinstance(gen2, dict):
        return "options.gen2Options: required, must be an object"
    return (
        _check_types("options", options, _OPTION_FIELDS)
        or _check_types("options.gen2Options", gen2, _GEN2_FIELDS)
        or _check_gen2_values(options, gen2)
    )


async def _pattern_stream(total: int) -> AsyncIterator[bytes]:
    """`total` bytes of the repeating pattern, one chunk at a time (never all in memory)."""
    sent = 0
    while sent < total:
        size = min(len(_PATTERN), total - sent)
        yield _PATTERN if size == len(_PATTERN) else _PATTERN[:size]
        sent += size


class Simulator:
    """All state of one simulator app: settings, control, tasks, records, the hook client."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.control = self._default_control()
        self.tasks: dict[str, SimTask] = {}
        self.creates: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED_CREATES)
        self.creates_total = 0
        self.status_calls: Counter[str] = Counter()
        self.callbacks: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED_CREATES)
        self._lifecycles: dict[str, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None
        self._random = random.Random()
        self._keys = [k.encode() for k in settings.api_keys]

    def _default_control(self) -> Control:
        return Control(seconds_to_finish=self.settings.seconds_to_finish, fail_rate=self.settings.fail_rate)

    def routes(self) -> list[Route]:
        return [
            Route("/runway/tasks", self.create_task, methods=["POST"]),
            Route("/runway/tasks/{task_id}", self.get_task, methods=["GET"]),
            Route("/_sim/artifacts/{name}", self.artifact, methods=["GET"]),
            Route("/_sim/big", self.big, methods=["GET"]),
            Route("/_sim/control", self.get_control, methods=["GET"]),
            Route("/_sim/control", self.set_control, methods=["POST"]),
            Route("/_sim/reset", self.reset, methods=["POST"]),
            Route("/_sim/requests", self.requests, methods=["GET"]),
            Route("/_sim/tasks", self.list_tasks, methods=["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop every lifecycle and close the hook client, so shutdown leaves nothing behind."""
        await self._cancel_lifecycles()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- relay protocol -------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(given, k) for k in self._keys)

    def _record_create(self, request: Request, raw: bytes) -> tuple[dict[str, Any], bool]:
        """Keep what the gateway sent (headers lowercased, body parsed) for tests to inspect."""
        try:
            body, parsed = orjson.loads(raw), True
        except orjson.JSONDecodeError:
            body, parsed = None, False
        record: dict[str, Any] = {"headers": dict(request.headers.items()), "body": body, "task_id": None}
        if not parsed:
            record["raw_body"] = raw.decode("utf-8", "replace")
        self.creates.append(record)
        self.creates_total += 1
        return record, parsed

    async def create_task(self, request: Request) -> Response:
        record, parsed = self._record_create(request, await request.body())
        ctl = self.control
        if ctl.latency_seconds:
            await asyncio.sleep(ctl.latency_seconds)
        if ctl.create_status and not ctl.create_fail_rate:
            return _error(ctl.create_status, "simulated upstream error", "simulated", ctl.retry_after)
        if ctl.create_fail_rate and self._random.random() < ctl.create_fail_rate:
            return _error(ctl.create_status or 500, "simulated upstream error", "simulated", ctl.retry_after)
        if ctl.garbage:
            return Response(_GARBAGE, media_type="text/html")
        if not self._authorized(request):
            return _error(401, "invalid or missing API key", "invalid_api_key")
        body = record["body"]
        problem = validate_create(body) if parsed else "body: not valid JSON"
        if problem:
            return _error(400, problem, "invalid_request")
        task, plan = self._new_task(body, self.settings.public_url or str(request.base_url))
        record["task_id"] = task.id
        if ctl.hang_after_create:
            await self._start(task, plan)
            await self._hang(request)
            return _error(504, "simulated hang ended", "hang")
        return _json(200, task.body(), background=BackgroundTask(self._start, task, plan))

    def _new_task(self, body: dict[str, Any], base_url: str) -> tuple[SimTask, _Plan]:
        ctl = self.control
        options = dict(body["options"])
        options.setdefault("seconds", 4)
        options["recordingEnabled"] = True
        seed = options["gen2Options"].get("seed", self._random.randint(0, MAX_SEED))
        task = SimTask(
            id=str(uuid.uuid4()),
            name=options.get("name") or f"Gen-2 {seed}",
            options=options,
            base_url=base_url.rstrip("/"),
            notify_hook=body.get("notify_hook"),
            eta_seconds=round(ctl.seconds_to_finish * 0.2, 3),
        )
        plan = _Plan(
            float(ctl.seconds_to_finish),
            self._random.random() < ctl.fail_rate,
            ctl.artifact_bytes,
            ctl.reverse_callbacks,
        )
        self.tasks[task.id] = task
        return task, plan

    async def _hang(self, request: Request) -> None:
        """Hold the answer until the client gives up (its timeout) or the hang limit passes.
        uvicorn cancels held requests at shutdown; that ends an intended hang, not an error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANG_LIMIT_SECONDS
        with contextlib.suppress(asyncio.CancelledError):
            while loop.time() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.05)

    async def get_task(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        self.status_calls[task_id] += 1
        ctl = self.control
        if ctl.latency_seconds:
            await asyncio.sleep(ctl.latency_seconds)
        if ctl.status_status:
            return _error(ctl.status_status, "simulated upstream error", "simulated", ctl.retry_after)
        if not self._authorized(request):
            return _error(401, "invalid or missing API key", "invalid_api_key")
        task = self.tasks.get(task_id)
        if task is None:
            return _error(404, "task not found", "not_found")
        return _json(200, task.body())

    # ---- lifecycle ------------------------------------------------------------------

    async def _start(self, task: SimTask, plan: _Plan) -> None:
        """Spawn the lifecycle; async so Starlette runs it on the loop right after the answer."""
        job = asyncio.create_task(self._lifecycle(task, plan), name=f"sim-task-{task.id}")
        self._lifecycles[task.id] = job
        job.add_done_callback(lambda _: self._lifecycles.pop(task.id, None))

    async def _lifecycle(self, task: SimTask, plan: _Plan) -> None:
        """Walk one task to its terminal state on the schedule in the module docstring."""
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def until(fraction: float) -> None:
            await asyncio.sleep(max(0.0, start + fraction * plan.seconds - loop.time()))

        await until(0.2)
        self._update(task, status="RUNNING", progress_ratio=0)
        running = orjson.dumps(task.body())
        if not plan.reverse_callbacks:
            await self._notify(task, "RUNNING", running)
        await until(0.5)
        self._update(task, progress_ratio="0.5")
        await until(0.8)
        self._update(task, progress_ratio=0.8)
        await until(1.0)
        self._finish(task, plan)
        await self._notify(task, task.status, orjson.dumps(task.body()))
        if plan.reverse_callbacks:
            await self._notify(task, "RUNNING", running)

    def _update(self, task: SimTask, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(task, name, value)
        task.updated_at = _now()

    def _finish(self, task: SimTask, plan: _Plan) -> None:
        if plan.fail:
            error = {"message": "Simulated generation failure.", "reason": "SIMULATED_FAILURE"}
            self._update(task, status="FAILED", error=error)
        else:
            self._update(task, status="SUCCEEDED", progress_ratio="1", artifacts=[self._artifact(task, plan)])
        log.debug("simulated task %s finished %s", task.id, task.status)

    def _artifact(self, task: SimTask, plan: _Plan) -> dict[str, Any]:
        base = task.base_url
        if plan.artifact_bytes:
            url, size = f"{base}/_sim/big?bytes={plan.artifact_bytes}", plan.artifact_bytes
        else:
            url, size = f"{base}/_sim/artifacts/{task.id}.mp4", SAMPLE_MP4.stat().st_size
        return {
            "id": str(uuid.uuid4()),
            "taskId": task.id,
            "createdAt": task.updated_at,
            "filename": f"{task.name}.mp4",
            "url": url,
            "fileSize": str(size),
            "previewUrls": [f"{base}/_sim/artifacts/{task.id}.jpg"],
            "metadata": {
                "frameRate": 24,
                "duration": 2.0,
                "dimensions": [320, 192],
                "size": {"width": 320, "height": 192},
            },
        }

    async def _notify(self, task: SimTask, status: str, payload: bytes) -> None:
        """POST one status change to the task's hook, honouring drop/duplicate controls."""
        if task.notify_hook is None or self.control.drop_callbacks:
            return
        for _ in range(2 if self.control.duplicate_callbacks else 1):
            await self._post_callback(task.notify_hook, task.id, status, payload)

    async def _post_callback(self, url: str, task_id: str, status: str, payload: bytes) -> None:
        record: dict[str, Any] = {"task_id": task_id, "status": status, "url": url}
        self.callbacks.append(record)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=1.0))
        try:
            response = await self._client.post(url, content=payload, headers={"content-type": "application/json"})
            record["response_status"] = response.status_code
        except Exception as exc:  # deliberately broad: a failing hook must never stop the lifecycle
            record["error"] = type(exc).__name__
            log.debug("callback to task %s hook failed: %r", task_id, exc)

    async def _cancel_lifecycles(self) -> None:
        jobs = list(self._lifecycles.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        self._lifecycles.clear()

    # ---- artifacts ------------------------------------------------------------------

    async def artifact(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        if name.endswith(".mp4"):
            return FileResponse(SAMPLE_MP4, media_type="video/mp4")
        if name.endswith(".jpg"):
            return FileResponse(SAMPLE_JPG, media_type="image/jpeg")
        return _error(404, "no such artifact", "not_found")

    async def big(self, request: Request) -> Response:
        raw = request.query_params.get("bytes", "")
        total = int(raw) if raw.isascii() and raw.isdigit() else -1
        if not 0 <= total <= MAX_BIG_BYTES:
            return _error(400, f"bytes: must be an integer within 0..{MAX_BIG_BYTES}", "invalid_request")
        headers = {"content-length": str(total)}
        return StreamingResponse(_pattern_stream(total), media_type="video/mp4", headers=headers)

    # ---- test hooks -----------------------------------------------------------------

    async def get_control(self, request: Request) -> Response:
        return _json(200, dataclasses.asdict(self.control))

    async def set_control(self, request: Request) -> Response:
        try:
            self.control = self.control.merged(orjson.loads(await request.body()))
        except orjson.JSONDecodeError:
            return _error(400, "control: body is not valid JSON", "invalid_request")
        except ValueError as exc:
            return _error(400, str(exc), "invalid_request")
        return _json(200, dataclasses.asdict(self.control))

    async def reset(self, request: Request) -> Response:
        """Back to start-up settings with nothing recorded, so one test cannot leak into the next."""
        await self._cancel_lifecycles()
        self.control = self._default_control()
        self.tasks.clear()
        self.creates.clear()
        self.creates_total = 0
        self.status_calls.clear()
        self.callbacks.clear()
        return _json(200, dataclasses.asdict(self.control))

    async def requests(self, request: Request) -> Response:
        return _json(
            200,
            {
                "creates": list(self.creates),
                "creates_total": self.creates_total,
                "status_calls": sum(self.status_calls.values()),
                "status_calls_by_id": dict(self.status_calls),
                "callbacks": list(self.callbacks),
            },
        )

    async def list_tasks(self, request: Request) -> Response:
        return _json(200, {"tasks": [task.body()["task"] for task in self.tasks.values()]})


def create_simulator_app(settings: SimulatorSettings) -> Starlette:
    """A fresh simulator; all its state lives on this app (`app.state.simulator`)."""
    simulator = Simulator(settings)
    app = Starlette(routes=simulator.routes(), lifespan=simulator.lifespan)
    app.state.simulator = simulator
    return app


def run_simulator(host: str, port: int, settings: SimulatorSettings) -> None:
    """Serve the simulator until interrupted. The graceful-shutdown bound stops a create held
    open by `hang_after_create` from blocking Ctrl-C."""
    uvicorn.run(create_simulator_app(settings), host=host, port=port, access_log=False, timeout_graceful_shutdown=2)
