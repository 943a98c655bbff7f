"""OpenAI Videos API routes (contract §3.2): the official SDKs work by changing base_url and key.

Same tenant, same task: a video is the tenant's task record seen through `gateway.videos`;
creation goes through `TaskService.create` like the native route, so quotas, idempotency,
callbacks and webhooks behave the same. Uploaded images are kept by `gateway.uploads` and
served back to the upstream at `GET /assets/{token}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway import videos
from gateway.errors import GatewayError, bad_request, not_found
from gateway.relays.client import UpstreamFailure
from gateway.routes.common import (
    authenticate,
    context,
    create_once,
    json_response,
    own_task,
    page_limit,
    read_json,
    services,
    submit_task,
    tenant_request,
)
from gateway.store.base import TaskRecord
from gateway.tasks import Created
from gateway.uploads import (
    MAX_UPLOAD_BYTES,
    Image,
    asset_not_found,
    check_image,
    decode_data_url,
    is_data_url,
    require_upload_url,
)

MAX_FORM_FIELDS = 64
POLL_AFTER_MS_WITH_CALLBACKS = 1000
EXPIRED_LINK_STATUSES = (403, 404, 410)
DEFAULT_CONTENT_TYPES = {"video": "video/mp4", "thumbnail": "image/jpeg"}
ASSET_HEADERS = {"cache-control": "private, no-store", "x-content-type-options": "nosniff"}


# --- models --------------------------------------------------------------------------


async def list_models(request: Request) -> Response:
    await tenant_request(request, "read")
    return json_response({"object": "list", "data": [m.as_openai() for m in videos.MODELS.values()]})


async def get_model(request: Request) -> Response:
    await tenant_request(request, "read")
    model = videos.MODELS.get(request.path_params["id"])
    if model is None:
        raise GatewayError(
            404, "model_not_found", f"The model `{request.path_params['id']}` does not exist.", param="model"
        )
    return json_response(model.as_openai())


# --- videos --------------------------------------------------------------------------


async def create_video(request: Request) -> Response:
    s = services(request)
    principal = authenticate(request, "create")
    max_upload = min(s.config.server.max_body_bytes, MAX_UPLOAD_BYTES)
    raw, image = await _read_create_body(request, max_upload)

    async def create() -> Response:
        """Validate, create: inside the idempotent run, so a kept 400 replays. An upload
        gets its link now and is stored by `create` only once admitted."""
        params = videos.check_create_params(raw)
        image_url = params.get("image_url")
        upload = image
        if upload is None and image_url is not None and is_data_url(image_url):
            upload = decode_data_url(image_url, max_upload)
        pending = s.uploads.pending(upload) if upload is not None else None
        if pending is not None:
            image_url = s.uploads.url(require_upload_url(s.config), s.signer, pending.asset_id)
        req, meta = videos.to_gen2(params, principal.tenant.policy, image_url=image_url)
        created = await submit_task(request, principal, req, meta, pending)
        return json_response(videos.video_object(_created_record(created)))

    return await create_once(
        request, principal, "/v1/videos", lambda: _fingerprint(raw, image), create, _video_response
    )


def _video_response(record: TaskRecord) -> Response:
    return json_response(videos.video_object(record))


async def get_video(request: Request) -> Response:
    s = services(request)
    record = await _own_record(request)
    s.tasks.refresh_soon(record)
    video = videos.video_object(record)
    headers = None
    if video["status"] in ("queued", "in_progress"):
        headers = {"openai-poll-after-ms": str(_poll_after_ms(s.config))}
    return json_response(video, headers=headers)


async def list_videos(request: Request) -> Response:
    s = services(request)
    principal = await tenant_request(request, "read")
    order = request.query_params.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise bad_request("invalid_value", "`order` must be `asc` or `desc`.", "order")
    limit = page_limit(request)
    after = request.query_params.get("after") or None
    records, has_more = await s.store.list_tasks(principal.tenant.id, limit=limit, after=after, order=order)
    data = [videos.video_object(r) for r in records]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


async def delete_video(request: Request) -> Response:
    s = services(request)
    principal = await tenant_request(request, "delete")
    video_id = request.path_params["id"]
    if not await s.store.hide_task(principal.tenant.id, video_id):
        raise not_found("No video with that id.")
    context(request).task_id = video_id
    return json_response({"id": video_id, "object": "video.deleted", "deleted": True})


async def video_content(request: Request) -> Response:
    variant = request.query_params.get("variant") or "video"
    if variant not in videos.VARIANTS:
        raise bad_request("invalid_value", f"`variant` must be one of {', '.join(videos.VARIANTS)}.", "variant")
    record = await _own_record(request)
    status = videos.video_status(record.status)
    if status != "completed":
        raise GatewayError(
            404,
            "video_not_ready",
            f"The video is {status}; its content can be downloaded once it is completed.",
            param="id",
        )
    url = videos.artifact_url(record.task, variant)
    if url is None:
        raise GatewayError(404, "variant_not_available", f"This video has no `{variant}` content.", param="variant")
    upstream_resp, chunks = await _open_artifact(request, record, variant, url)
    headers = {"content-type": upstream_resp.headers.get("content-type") or DEFAULT_CONTENT_TYPES[variant]}
    length = upstream_resp.headers.get("content-length")
    if (
        length is not None
        and length.isdigit()
        and upstream_resp.headers.get("content-encoding", "identity") == "identity"
    ):
        headers["content-length"] = length  # aiohttp decodes a compressed body: its length is not the upstream's
    if request.method == "HEAD":
        upstream_resp.close()
        return Response(headers=headers)
    return ArtifactResponse(upstream_resp, chunks, headers)


class ArtifactResponse(StreamingResponse):
    """The upstream's bytes, chunk by chunk as the client takes them (uvicorn's send waits
    for the socket, aiohttp pauses reading when its buffer is full), so memory stays flat
    whatever the size. The upstream connection is closed however the response ends,
    including a client that goes away mid-stream."""

    def __init__(self, upstream: aiohttp.ClientResponse, chunks: AsyncIterator[bytes], headers: dict[str, str]):
        super().__init__(chunks, headers=headers)
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.upstream.content.at_eof():
                self.upstream.release()
            else:
                self.upstream.close()


async def _open_artifact(
    request: Request, record: TaskRecord, variant: str, url: str
) -> tuple[aiohttp.ClientResponse, AsyncIterator[bytes]]:
    """Open the artifact URL; an expired link (403/404/410) gets one retry with the URL of
    a fresh upstream status, when the upstream has a status path."""
    s = services(request)
    request_id = context(request).request_id
    relay = s.relays.get(record.relay)  # the task's own relay: its artifact_hosts, its key
    resp, chunks = await relay.stream(url, request_id)
    if 200 <= resp.status < 300:
        return resp, chunks
    resp.close()
    status = resp.status
    if status in EXPIRED_LINK_STATUSES and relay.config.status_path and record.task_id:
        try:
            fresh = await relay.status(record.task_id, record.key_index, request_id)
        except UpstreamFailure:
            fresh = None
        fresh_url = videos.artifact_url(fresh, variant) if fresh else None
        if fresh_url and fresh_url != url:
            resp, chunks = await relay.stream(fresh_url, request_id)
            if 200 <= resp.status < 300:
                return resp, chunks
            resp.close()
            status = resp.status
    if status in EXPIRED_LINK_STATUSES:
        raise GatewayError(
            404, "video_expired", "The upstream no longer serves this video's content (its link expired).", param="id"
        )
    raise GatewayError(502, "upstream_error", f"The upstream answered the content download with {status}.", "api_error")


# --- uploaded images -----------------------------------------------------------------


async def get_asset(request: Request) -> Response:
    """An uploaded image, for the upstream: no tenant key, the signed token is the credential."""
    s = services(request)
    asset_id = s.signer.read_asset_token(request.path_params["token"])
    found = await s.uploads.find(asset_id) if asset_id else None
    if found is None:
        raise asset_not_found()
    content_type, data = found
    return Response(data, media_type=content_type, headers=ASSET_HEADERS)


# --- helpers -------------------------------------------------------------------------


async def _read_create_body(request: Request, max_upload: int) -> tuple[Any, Image | None]:
    """JSON, or a form (what the SDK sends) with bracketed names (`input_reference[image_url]`)
    and string values parsed by the type of the field they name."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await read_json(request), None
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=max_upload)
    except HTTPException as exc:
        raise bad_request("invalid_multipart", f"The form body could not be parsed: {exc.detail}") from None
    raw: dict[str, Any] = {}
    image: Image | None = None
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "input_reference":
                    raise bad_request(
                        "unknown_parameter",
                        f"Unexpected file field `{name}`; only `input_reference` takes a file.",
                        name,
                    )
                image = check_image(await value.read(), value.content_type, max_upload)
                continue
            _put_form_field(raw, name, value)
    finally:
        await form.close()
    if image is not None and "input_reference" in raw:
        raise bad_request(
            "invalid_value",
            "Give `input_reference` as an uploaded file or as `image_url`, not both.",
            "input_reference",
        )
    return raw, image


def _put_form_field(raw: dict[str, Any], name: str, value: str) -> None:
    """`a` -> raw["a"] (parsed by the field's type); `a[b]` -> raw["a"]["b"] (a string)."""
    base, sep, rest = name.partition("[")
    if not sep:
        if base in raw:
            raise bad_request("invalid_value", f"`{base}` is given more than once.", base)
        raw[base] = videos.coerce_form_value(base, value) if base in videos.GEN2_KNOBS else value
        return
    if not rest.endswith("]") or "[" in rest or not rest[:-1]:
        raise bad_request("unknown_parameter", f"Unsupported form field `{name}`.", name)
    key = rest[:-1]
    nested = raw.setdefault(base, {})
    if not isinstance(nested, dict) or key in nested:
        raise bad_request("invalid_value", f"`{base}` is given more than once.", base)
    nested[key] = value


def _fingerprint(raw: Any, image: Image | None) -> Any:
    """What makes two creates the same request: the parsed fields, and an upload's hash
    (a retried multipart upload has a fresh boundary, so never the raw bytes)."""
    if image is None:
        return raw
    return {"fields": raw, "input_reference": {"sha256": image.sha256, "content_type": image.content_type}}


def _created_record(created: Created) -> TaskRecord:
    record = created.record
    if not record.task:
        record.task = created.task
        record.task_id = record.task_id or created.task.get("id")
        record.status = str(created.task.get("status") or record.status)
    return record


async def _own_record(request: Request) -> TaskRecord:
    record = await own_task(request, request.path_params["id"])
    if record is None:
        raise not_found("No video with that id.")
    return record


def _poll_after_ms(config: Any) -> int:
    """How soon a poll can show news: callbacks arrive at once; else the upstream poll interval."""
    if config.server.public_url:
        return POLL_AFTER_MS_WITH_CALLBACKS
    return int(min(max(config.upstream.poll_interval_seconds, 1.0), 10.0) * 1000)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{id}", get_model, methods=["GET"]),
    Route("/v1/videos", create_video, methods=["POST"]),
    Route("/v1/videos", list_videos, methods=["GET"]),
    Route("/v1/videos/{id}", get_video, methods=["GET"]),
    Route("/v1/videos/{id}", delete_video, methods=["DELETE"]),
    Route("/v1/videos/{id}/content", video_content, methods=["GET"]),
    Route("/assets/{token}", get_asset, methods=["GET"]),
]
