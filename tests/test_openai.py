"""The OpenAI Videos API through the official `openai` SDK, sync and async.

Real processes: the session gateway and simulator, plus gateways of their own for an
exhausted budget, uploads (an https public_url, a short link lifetime) and a 200 MB
artifact whose streaming must not grow the gateway's memory.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import ROOT, GatewayProcess, Simulator, TenantSpec, gen2_body, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks client.videos deprecated

SAMPLE_JPG = (ROOT / "gateway" / "devtools" / "assets" / "sample.jpg").read_bytes()
SAMPLE_MP4 = (ROOT / "gateway" / "devtools" / "assets" / "sample.mp4").read_bytes()


def sdk(gw: GatewayProcess, tenant: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key=gw.tenants[tenant].key, max_retries=kw.pop("max_retries", 0), **kw
    )


def async_sdk(gw: GatewayProcess, tenant: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.tenants[tenant].key, max_retries=0)


def sim_create(sim: Simulator, task_id: str) -> dict[str, Any]:
    return next(c for c in sim.requests()["creates"] if c["task_id"] == task_id)


def sim_task(sim: Simulator, task_id: str) -> dict[str, Any]:
    return next(t for t in sim.tasks() if t["id"] == task_id)


def wait_completed(client: openai.OpenAI, video_id: str, timeout: float = 15) -> Any:
    return wait_until(
        lambda: (v := client.videos.retrieve(video_id)).status in ("completed", "failed") and v,
        timeout,
        0.1,
        "video finished",
    )


def raises(
    exc: type[openai.APIStatusError], call: Callable[[], Any], code: str | None = None, param: str | None = "__any__"
) -> openai.APIStatusError:
    with pytest.raises(exc) as info:
        call()
    err = info.value
    if code is not None:
        assert err.code == code, err.body
    if param != "__any__":
        assert err.param == param, err.body
    return err


# --- models ---------------------------------------------------------------------------


def test_models(gw: GatewayProcess) -> None:
    c = sdk(gw, "team-a")
    models = c.models.list()
    assert [m.id for m in models.data] == ["gen2"]
    gen2 = c.models.retrieve("gen2")
    assert gen2.object == "model" and gen2.owned_by == "runway"
    assert gen2.model_extra["sizes"] == ["1280x768"] and gen2.model_extra["seconds"] == ["4"]
    raises(openai.NotFoundError, lambda: c.models.retrieve("sora-2"), "model_not_found")
    raises(
        openai.AuthenticationError,
        lambda: openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong", max_retries=0).models.list(),
        "invalid_api_key",
    )


# --- the whole life of a video ----------------------------------------------------------


def test_create_retrieve_download_list_delete(gw: GatewayProcess, sim: Simulator) -> None:
    c = sdk(gw, "team-a")
    video = c.videos.create(
        model="gen2",
        prompt="A red fox in the snow",
        size="1280x768",
        seconds="4",
        extra_body={"seed": 42, "motion_score": 5, "upscale": True, "watermark": False},
    )
    assert video.object == "video" and video.model == "gen2" and video.status == "queued"
    assert (video.seconds, video.size, video.prompt, video.progress) == ("4", "1280x768", "A red fox in the snow", 0)
    assert abs(video.created_at - time.time()) < 10 and video.completed_at is None

    sent = sim_create(sim, video.id)["body"]
    gen2 = sent["options"]["gen2Options"]
    assert sent["taskType"] == "gen2" and sent["options"]["seconds"] == 4
    assert (gen2["text_prompt"], gen2["seed"], gen2["motion_score"], gen2["upscale"], gen2["watermark"]) == (
        "A red fox in the snow",
        42,
        5,
        True,
        False,
    )
    assert "image_prompt" not in gen2 and "init_image" not in gen2

    try:  # the shared simulator finishes a task 1 s after its create
        c.videos.download_content(video.id)
    except openai.NotFoundError as err:
        assert err.code == "video_not_ready", err.body
    else:
        assert c.videos.retrieve(video.id).status == "completed"  # it finished meanwhile: then it may download
    done = wait_completed(c, video.id)
    assert done.status == "completed" and done.progress == 100 and done.error is None
    assert done.completed_at >= done.created_at and done.expires_at > done.completed_at

    artifact = sim_task(sim, video.id)["artifacts"][0]
    content = c.videos.download_content(video.id)
    assert content.read() == httpx.get(artifact["url"]).content == SAMPLE_MP4
    assert content.response.headers["content-type"] == "video/mp4"
    assert content.response.headers["content-length"] == str(len(SAMPLE_MP4))
    thumb = c.videos.download_content(video.id, variant="thumbnail")
    assert thumb.read() == SAMPLE_JPG and thumb.response.headers["content-type"] == "image/jpeg"
    raises(
        openai.NotFoundError,
        lambda: c.videos.download_content(video.id, variant="spritesheet"),
        "variant_not_available",
        "variant",
    )

    assert video.id in [v.id for v in c.videos.list(limit=100).data]
    deleted = c.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    raises(openai.NotFoundError, lambda: c.videos.retrieve(video.id), "task_not_found")
    raises(openai.NotFoundError, lambda: c.videos.delete(video.id), "task_not_found")
    assert video.id not in [v.id for v in c.videos.list(limit=100).data]
    with gw.client("team-a") as native:
        assert native.get(f"/runway/tasks/{video.id}").status_code == 404


async def test_async_client_create_and_poll(gw: GatewayProcess, sim: Simulator) -> None:
    c = async_sdk(gw, "team-a")
    video = await c.videos.create_and_poll(model="gen2", prompt="Waves at dusk", poll_interval_ms=100)
    assert video.status == "completed" and video.progress == 100
    assert (await c.videos.download_content(video.id)).read() == SAMPLE_MP4
    assert video.id in [v.id async for v in c.videos.list(limit=5)]
    assert (await c.videos.delete(video.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await c.videos.retrieve(video.id)
    await c.close()


def test_sync_create_and_poll_and_poll_hint(gw: GatewayProcess) -> None:
    c = sdk(gw, "team-a")
    raw = c.videos.with_raw_response.create(prompt="A lighthouse in a storm")
    video = raw.parse()
    polled = c.videos.with_raw_response.retrieve(video.id)
    if polled.parse().status in ("queued", "in_progress"):
        assert polled.headers["openai-poll-after-ms"] == "1000"
    assert c.videos.create_and_poll(prompt="A lighthouse at noon", poll_interval_ms=100).status == "completed"


def test_failed_video_has_error(own_sim: Simulator, start_gateway: Callable[..., GatewayProcess]) -> None:
    own_sim.control(fail_rate=1.0, seconds_to_finish=0.3)
    try:
        g = start_gateway(own_sim.url, [TenantSpec("fails")])
        video = sdk(g, "fails").videos.create_and_poll(prompt="doomed", poll_interval_ms=100)
        assert video.status == "failed" and video.completed_at is not None and video.expires_at is None
        assert (video.error.code, video.error.message) == ("SIMULATED_FAILURE", "Simulated generation failure.")
        raises(openai.NotFoundError, lambda: sdk(g, "fails").videos.download_content(video.id), "video_not_ready")
        # a 5xx from the gateway (the upstream refused the create) is the SDK's APIStatusError
        own_sim.control(create_status=500)
        err = raises(openai.APIStatusError, lambda: sdk(g, "fails").videos.create(prompt="x"), "upstream_error")
        assert err.status_code == 502 and isinstance(err, openai.InternalServerError)
    finally:
        own_sim.reset()


def test_cancelled_video_is_failed_with_its_error(
    own_sim: Simulator, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """The relay may end a task CANCELLED: the SDK sees a final `failed` video whose error
    carries the relay's message, with the code `cancelled` when the relay gives none."""
    own_sim.control(seconds_to_finish=600)  # the relay's own lifecycle stays out of the way
    g = start_gateway(own_sim.url, [TenantSpec("t")])
    client = sdk(g, "t")
    video_id = client.videos.create(prompt="to be cancelled").id
    hook = sim_create(own_sim, video_id)["body"]["notify_hook"]
    cancelled = {
        **sim_task(own_sim, video_id),
        "status": "CANCELLED",
        "error": {"message": "Cancelled by an operator."},
    }
    assert httpx.post(hook, json={"task": cancelled}).json()["result"] == "applied"
    video = client.videos.retrieve(video_id)
    assert video.status == "failed" and video.completed_at is not None
    assert (video.error.code, video.error.message) == ("cancelled", "Cancelled by an operator.")


# --- one record, two views ---------------------------------------------------------------


def test_native_and_openai_routes_share_the_task(gw: GatewayProcess) -> None:
    c = sdk(gw, "team-a")
    with gw.client("team-a") as native:
        made = native.post("/runway/tasks", json=gen2_body("Made natively")).json()["task"]
        video = c.videos.retrieve(made["id"])
        assert (video.id, video.prompt, video.model, video.seconds, video.size) == (
            made["id"],
            "Made natively",
            "gen2",
            "4",
            "1280x768",
        )

        via_sdk = c.videos.create(prompt="Made through the SDK")
        task = native.get(f"/runway/tasks/{via_sdk.id}").json()["task"]
        assert task["id"] == via_sdk.id and task["options"]["gen2Options"]["text_prompt"] == "Made through the SDK"
        wait_until(lambda: native.get(f"/runway/tasks/{via_sdk.id}").json()["task"]["status"] == "SUCCEEDED", 15)
        assert c.videos.retrieve(via_sdk.id).status == "completed"
        native_ids = [t["id"] for t in native.get("/runway/tasks", params={"limit": 100}).json()["data"]]
        assert via_sdk.id in native_ids and made["id"] in [v.id for v in c.videos.list(limit=100).data]


def test_list_pagination(gw: GatewayProcess) -> None:
    c = sdk(gw, "team-b")
    made = [c.videos.create(prompt=f"page {i}").id for i in range(3)]
    first = c.videos.list(limit=2)
    assert [v.id for v in first.data] == made[::-1][:2] and first.has_more is True
    assert c.videos.list(limit=2, after=made[1]).data[0].id == made[0]
    assert [v.id for v in c.videos.list(order="asc", after=made[0], limit=2).data] == made[1:]
    everything = [v.id for v in c.videos.list(limit=2)]  # the SDK follows last_id / has_more
    assert everything[:3] == made[::-1] and len(everything) == len(set(everything))
    with httpx.Client(base_url=gw.url, headers=gw.tenants["team-b"].headers()) as h:
        page = h.get("/v1/videos", params={"limit": 2}).json()
        assert (
            page["object"] == "list"
            and page["first_id"] == made[2]
            and page["last_id"] == made[1]
            and page["has_more"] is True
        )
        assert h.get("/v1/videos", params={"order": "sideways"}).json()["error"]["param"] == "order"


# --- errors the SDK turns into its classes -------------------------------------------------


def test_errors(gw: GatewayProcess) -> None:
    a, b = sdk(gw, "team-a"), sdk(gw, "team-b")
    video = a.videos.create(prompt="Only for team A")
    for call in (
        lambda: b.videos.retrieve(video.id),
        lambda: b.videos.download_content(video.id),
        lambda: b.videos.delete(video.id),
    ):
        raises(openai.NotFoundError, call, "task_not_found")
    assert a.videos.retrieve(video.id).id == video.id  # B's delete hid nothing

    raises(openai.BadRequestError, lambda: a.videos.create(prompt="x", seconds="12"), "invalid_value", "seconds")
    raises(openai.BadRequestError, lambda: a.videos.create(prompt="x", model="sora-2"), "model_not_found", "model")
    raises(openai.BadRequestError, lambda: a.videos.create(prompt="x", size="1280x720"), "invalid_value", "size")
    raises(
        openai.BadRequestError, lambda: a.videos.create(prompt="x", extra_body={"seed": "abc"}), "invalid_type", "seed"
    )
    raises(
        openai.BadRequestError,
        lambda: a.videos.create(prompt="x", extra_body={"upscale": "maybe"}),
        "invalid_type",
        "upscale",
    )
    raises(
        openai.BadRequestError, lambda: a.videos.create(prompt="x", extra_body={"seed": 2**33}), "invalid_value", "seed"
    )
    raises(
        openai.BadRequestError,
        lambda: a.videos.create(prompt="x", extra_body={"style": "noir"}),
        "unknown_parameter",
        "style",
    )
    raises(openai.BadRequestError, lambda: a.videos.create(prompt="x" * 2001), "prompt_too_long", "prompt")
    raises(
        openai.BadRequestError,
        lambda: a.videos.create(
            prompt="x", extra_body={"input_reference": {"image_url": "http://plain.example/a.png"}}
        ),
        "invalid_url",
        "input_reference.image_url",
    )
    raises(
        openai.BadRequestError,
        lambda: a.videos.create(
            prompt="x", extra_body={"input_reference": {"image_url": "https://x.example:99999/a.png"}}
        ),
        "invalid_url",
        "input_reference.image_url",
    )
    raises(
        openai.BadRequestError,
        lambda: a.videos.create(prompt="x", extra_body={"input_reference": {"file_id": "file-1"}}),
        "unsupported_parameter",
        "input_reference.file_id",
    )
    raises(
        openai.AuthenticationError,
        lambda: openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-nope", max_retries=0).videos.list(),
    )
    with gw.client("team-off") as off:
        assert off.get("/v1/videos").status_code == 403


def test_json_body_and_image_url(gw: GatewayProcess, sim: Simulator) -> None:
    with httpx.Client(base_url=gw.url, headers=gw.tenants["team-a"].headers(), timeout=10) as h:
        url = "https://images.example.com/cat.png"
        r = h.post(
            "/v1/videos",
            json={
                "prompt": "A cat",
                "seconds": 4,
                "input_reference": {"image_url": url},
                "seed": 7,
                "interpolate": True,
            },
        )
        assert r.status_code == 200, r.text
        video = r.json()
        assert video["object"] == "video" and video["seconds"] == "4"
        gen2 = sim_create(sim, video["id"])["body"]["options"]["gen2Options"]
        assert (gen2["image_prompt"], gen2["init_image"], gen2["seed"], gen2["interpolate"]) == (url, url, 7, True)
        r = h.post("/v1/videos", json={"prompt": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = h.post("/v1/videos", json={"model": "gen2"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
        r = h.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        # team-policy forces watermark and defaults motion_score, through this API too
    p = sdk(gw, "team-policy").videos.create(prompt="policed", extra_body={"watermark": False})
    gen2 = sim_create(sim, p.id)["body"]["options"]["gen2Options"]
    assert gen2["watermark"] is True and gen2["motion_score"] == 7


def test_idempotent_create(gw: GatewayProcess, sim: Simulator) -> None:
    c = sdk(gw, "team-a")
    key = {"Idempotency-Key": "video-" + secrets.token_hex(8)}
    before = sim.requests()["creates_total"]
    first = c.videos.with_raw_response.create(prompt="Once only", extra_body={"seed": 1}, extra_headers=key)
    again = c.videos.with_raw_response.create(prompt="Once only", extra_body={"seed": 1}, extra_headers=key)
    assert again.parse().id == first.parse().id and again.headers.get("idempotent-replayed") == "true"
    assert sim.requests()["creates_total"] == before + 1
    raises(
        openai.ConflictError,
        lambda: c.videos.create(prompt="Another body", extra_headers=key),
        "idempotency_key_reused",
    )


# --- budgets -----------------------------------------------------------------------------


def test_exhausted_budget_and_uploads_without_public_url(
    sim: Simulator, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(sim.url, [TenantSpec("thrifty", limits={"credits_per_day": 10})], callbacks=False)
    c = sdk(g, "thrifty")
    err = raises(
        openai.BadRequestError,
        lambda: c.videos.create(prompt="x", input_reference=("cat.jpg", SAMPLE_JPG, "image/jpeg")),
        "upload_not_supported",
        "input_reference",
    )
    assert "public_url" in err.message
    c.videos.create(prompt="the only one today")
    err = raises(openai.RateLimitError, lambda: c.videos.create(prompt="one too many"), "insufficient_quota")
    assert err.response.headers.get("retry-after")


def test_upload_refused_without_https_public_url(gw: GatewayProcess) -> None:
    err = raises(
        openai.BadRequestError,
        lambda: sdk(gw, "team-a").videos.create(prompt="x", input_reference=("cat.jpg", SAMPLE_JPG, "image/jpeg")),
        "upload_not_supported",
        "input_reference",
    )
    assert "https" in err.message


# --- uploads -----------------------------------------------------------------------------


def https_gateway(tmp_path: Path, upstream_url: str, tenants: list[TenantSpec], **kw: Any) -> GatewayProcess:
    """A gateway (not started) whose public_url is https (what the relay fetches images
    from; a TLS front would serve it) and whose upload links live 3 s. Callbacks to it fail
    (plain HTTP behind that URL), so its tasks move by polling."""
    g = GatewayProcess(tmp_path, upstream_url, tenants, **kw)
    text = g.config_path.read_text()
    text = text.replace(f'public_url = "{g.url}"', f'public_url = "https://127.0.0.1:{g.port}"', 1)
    text = text.replace("max_body_bytes = 65536", "max_body_bytes = 65536\nupload_ttl_seconds = 3", 1)
    g.config_path.write_text(text)
    return g


@pytest.fixture
def upload_gateway(tmp_path: Path, sim: Simulator) -> Any:
    g = https_gateway(tmp_path, sim.url, [TenantSpec("uploader")])
    g.start()
    yield g
    g.stop()


def fetch_asset(url: str) -> httpx.Response:
    assert url.startswith("https://127.0.0.1:") and "/assets/" in url
    return httpx.get("http://" + url.removeprefix("https://"), timeout=5)  # the TLS front, skipped


def test_uploaded_image_reaches_upstream_as_expiring_url(upload_gateway: GatewayProcess, sim: Simulator) -> None:
    g = upload_gateway
    c = sdk(g, "uploader")
    key = {"Idempotency-Key": "upload-" + secrets.token_hex(8)}
    before = sim.requests()["creates_total"]
    before_create = time.monotonic()  # the upload link is issued after this
    video = c.videos.create(
        prompt="Animate this", input_reference=("cat.jpg", SAMPLE_JPG, "image/jpeg"), extra_headers=key
    )
    gen2 = sim_create(sim, video.id)["body"]["options"]["gen2Options"]
    url = gen2["image_prompt"]
    assert gen2["init_image"] == url and url.startswith(f"https://127.0.0.1:{g.port}/assets/")
    served = fetch_asset(url)
    assert served.status_code == 200 and served.content == SAMPLE_JPG
    assert served.headers["content-type"] == "image/jpeg" and served.headers["content-length"] == str(len(SAMPLE_JPG))

    # the SDK's retry of the same upload (a fresh multipart boundary) is the same request
    replay = c.videos.with_raw_response.create(
        prompt="Animate this", input_reference=("cat.jpg", SAMPLE_JPG, "image/jpeg"), extra_headers=key
    )
    assert replay.parse().id == video.id and replay.headers.get("idempotent-replayed") == "true"
    png_like = b"\x89PNG\r\n\x1a\n" + SAMPLE_JPG[8:]
    raises(
        openai.ConflictError,
        lambda: c.videos.create(
            prompt="Animate this", input_reference=("cat.png", png_like, "image/png"), extra_headers=key
        ),
    )
    assert sim.requests()["creates_total"] == before + 1

    # a data URL is an upload too
    data_url = "data:image/jpeg;base64," + base64.b64encode(SAMPLE_JPG).decode()
    other = c.videos.create(prompt="Again", extra_body={"input_reference": {"image_url": data_url}})
    other_url = sim_create(sim, other.id)["body"]["options"]["gen2Options"]["image_prompt"]
    assert (
        other_url != url
        and hashlib.sha256(fetch_asset(other_url).content).digest() == hashlib.sha256(SAMPLE_JPG).digest()
    )

    # type and content checked
    raises(
        openai.BadRequestError,
        lambda: c.videos.create(prompt="x", input_reference=("notes.txt", b"hello", "text/plain")),
        "unsupported_file_type",
        "input_reference",
    )
    raises(
        openai.BadRequestError,
        lambda: c.videos.create(prompt="x", input_reference=("cat.png", SAMPLE_JPG, "image/png")),
        "invalid_file",
        "input_reference",
    )
    raises(
        openai.BadRequestError,
        lambda: c.videos.create(prompt="x", input_reference=("fake.jpg", b"GIF89a" + bytes(64), "image/jpeg")),
        "unsupported_file_type",
    )
    big = b"\xff\xd8\xff" + bytes(70_000)
    err = raises(
        openai.APIStatusError, lambda: c.videos.create(prompt="x", input_reference=("big.jpg", big, "image/jpeg"))
    )
    assert err.status_code == 413

    # forged and expired links
    forged = httpx.get(f"{g.url}/assets/not-a-token", timeout=5)
    assert forged.status_code == 404 and forged.json()["error"]["code"] == "asset_not_found"
    # the link lives upload_ttl_seconds (3 s), rounded up to a whole second
    expired = wait_until(lambda: (r := fetch_asset(url)).status_code != 200 and r, 15, 0.1, "the upload link to expire")
    assert 2.9 < time.monotonic() - before_create < 15  # not before its 3 s
    assert expired.status_code == 404 and expired.json()["error"]["code"] == "asset_not_found"
    # the task itself carries on (by polling: callbacks cannot reach this gateway)
    assert wait_completed(c, video.id).status == "completed"


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None: the gateway's own SQLite file; else a Redis URL with a prefix of this test's own."""
    return None if request.param == "sqlite" else request.getfixturevalue("redis_store_url")


def kept_uploads(g: GatewayProcess, store_url: str | None) -> int:
    """Uploads in the store, counted in the store itself (not through the gateway)."""
    if store_url is None:
        with sqlite3.connect(g.config_path.with_suffix(".db")) as db:
            return db.execute("SELECT count(*) FROM assets").fetchone()[0]
    import redis

    base, _, prefix = store_url.partition("?prefix=")
    return sum(1 for _ in redis.Redis.from_url(base).scan_iter(match=prefix + "asset:*", count=1000))


def test_nothing_is_stored_for_a_refused_or_failed_upload(
    tmp_path: Path, own_sim: Simulator, store_url: str | None
) -> None:
    """An upload is stored only once its create is admitted, and removed when the upstream
    then definitely created nothing; an unknown outcome keeps it (the relay may fetch it)."""
    tenants = [TenantSpec("one-a-minute", limits={"tasks_per_minute": 1}), TenantSpec("unlucky")]
    g = https_gateway(tmp_path, own_sim.url, tenants, store_url=store_url)
    g.start()
    try:
        c = sdk(g, "one-a-minute")
        results = []
        for i in range(6):
            try:
                results.append(
                    c.videos.create(prompt=f"upload {i}", input_reference=("cat.jpg", SAMPLE_JPG, "image/jpeg")).id
                )
            except openai.RateLimitError as err:
                assert err.code == "rate_limit_exceeded" and err.response.headers["retry-after"]
                results.append("429")
        assert results[1:] == ["429"] * 5 and results[0] != "429"
        assert kept_uploads(g, store_url) == 1

        u = sdk(g, "unlucky")
        own_sim.control(create_status=500)
        raises(
            openai.InternalServerError,
            lambda: u.videos.create(prompt="x", input_reference=("cat.jpg", SAMPLE_JPG, "image/jpeg")),
            "upstream_error",
        )
        own_sim.control(create_status=429, retry_after=2)
        err = raises(
            openai.InternalServerError,
            lambda: u.videos.create(prompt="x", input_reference=("cat.jpg", SAMPLE_JPG, "image/jpeg")),
            "upstream_rate_limited",
        )
        assert err.status_code == 503 and err.response.headers["retry-after"] == "2"
        data_url = "data:image/jpeg;base64," + base64.b64encode(SAMPLE_JPG).decode()
        raises(
            openai.InternalServerError,
            lambda: u.videos.create(prompt="x", extra_body={"input_reference": {"image_url": data_url}}),
            "upstream_rate_limited",
        )
        assert kept_uploads(g, store_url) == 1
        assert g.usage("unlucky") == {
            "active": 0,
            "tasks_today": 0,
            "credits_today": 0,
            "credits_this_month": 0,
            "tasks_this_month": 0,
        }

        own_sim.control(create_status=0, garbage=True)  # sent, answered with garbage: outcome unknown
        raises(
            openai.InternalServerError,
            lambda: u.videos.create(prompt="x", input_reference=("cat.jpg", SAMPLE_JPG, "image/jpeg")),
        )
        assert kept_uploads(g, store_url) == 2
    finally:
        g.stop()


# --- a big artifact ------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_big_artifact_streams_with_bounded_memory(
    own_sim: Simulator, start_gateway: Callable[..., GatewayProcess]
) -> None:
    size = 200 * 1024 * 1024
    own_sim.control(artifact_bytes=size, seconds_to_finish=0.3)
    try:
        g = start_gateway(own_sim.url, [TenantSpec("big")])
        pid = g.proc.pid  # serve with --workers 1 runs uvicorn in this very process
        assert Path(f"/proc/{pid}/task/{pid}/children").read_text().strip() == ""
        c = sdk(g, "big", timeout=120)
        video = c.videos.create_and_poll(prompt="A very long take", poll_interval_ms=100)
        assert video.status == "completed"
        baseline = _rss_kib(pid)
        peak = baseline
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss_kib(pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        received = 0
        pattern = bytes(range(256)) * (4096 + 2)
        try:
            with c.videos.with_streaming_response.download_content(video.id) as resp:
                assert resp.headers["content-length"] == str(size) and resp.headers["content-type"] == "video/mp4"
                for chunk in resp.iter_bytes(1 << 20):
                    start = received % 256
                    assert chunk == pattern[start : start + len(chunk)], f"wrong bytes at offset {received}"
                    received += len(chunk)
        finally:
            stop.set()
            sampler.join()
        assert received == size
        growth_mib = (peak - baseline) / 1024
        assert growth_mib < 40, f"gateway RSS grew {growth_mib:.1f} MiB while streaming {size >> 20} MiB"
    finally:
        own_sim.reset()


def test_a_kept_400_replays_for_the_same_idempotency_key(gw: GatewayProcess, sim: Simulator) -> None:
    before = sim.requests()["creates_total"]
    key = {"Idempotency-Key": "bad-video-" + secrets.token_hex(6)}
    with gw.client("team-a") as c:
        first = c.post("/v1/videos", json={"prompt": "x", "seconds": "12"}, headers=key)
        again = c.post("/v1/videos", json={"seconds": "12", "prompt": "x"}, headers=key)
    assert first.status_code == again.status_code == 400
    assert first.json() == again.json() and first.json()["error"]["param"] == "seconds"
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert sim.requests()["creates_total"] == before
