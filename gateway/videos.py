"""The OpenAI Videos view of a gen2 task, both ways, in one place (docs/openai.md has the table).

Create params -> gen2 body:

| OpenAI create param                  | gen2 body                                              |
|--------------------------------------|--------------------------------------------------------|
| `model` (`gen2`, the default)        | `taskType: "gen2"`                                     |
| `prompt`                             | `options.gen2Options.text_prompt`                      |
| `seconds` (`"4"` only, the default)  | `options.seconds: 4`                                   |
| `size` (`1280x768` only)             | nothing (gen2 has no size knob; kept in the record)    |
| `input_reference.image_url` / file   | `options.gen2Options.image_prompt` and `init_image`    |
| `seed`, `motion_score`, `interpolate` | `options.gen2Options.<same name>`                      |
| `upscale`, `watermark`               | `options.gen2Options.<same name>`                      |
| `use_motion_score`, `use_motion_vectors` | `options.gen2Options.<same name>`                  |

Task record -> Video object: `id` is the upstream task id, `status` and `progress` come
from the task's `status` and `progressRatio`, `prompt` from `text_prompt`, `model`, `size`
and `seconds` from the record's `meta` (defaults for tasks created natively), times from
the gateway's record. Nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.config import Policy
from gateway.errors import GatewayError, bad_request
from gateway.gen2 import GEN2_SECONDS, Gen2Request, apply_policy, check_gen2_options, fill_defaults
from gateway.gen2_options import MAX_PROMPT_CHARS, https_url_problem
from gateway.jsontypes import a_type_name, is_type
from gateway.store.base import TaskRecord

ARTIFACT_TTL_SECONDS = 24 * 3600  # the gateway's estimate of how long relay artifact links live
GEN2_CREATED = 1686009600  # 2023-06-06, Gen-2's public release: `created` of the model object


@dataclass(frozen=True)
class VideoModel:
    id: str
    sizes: tuple[str, ...]
    seconds: tuple[str, ...]

    @property
    def default_size(self) -> str:
        return self.sizes[0]

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": GEN2_CREATED,
            "owned_by": "runway",
            "sizes": list(self.sizes),
            "default_size": self.default_size,
            "seconds": list(self.seconds),
        }


MODELS = {"gen2": VideoModel("gen2", sizes=("1280x768",), seconds=(str(GEN2_SECONDS),))}
DEFAULT_MODEL = "gen2"

# OpenAI extra field -> gen2Options field, with its type. Multipart sends every value as a
# string; `coerce_form_value` parses it by this type.
GEN2_KNOBS: dict[str, tuple[str, type]] = {
    "seed": ("seed", int),
    "motion_score": ("motion_score", int),
    "interpolate": ("interpolate", bool),
    "upscale": ("upscale", bool),
    "watermark": ("watermark", bool),
    "use_motion_score": ("use_motion_score", bool),
    "use_motion_vectors": ("use_motion_vectors", bool),
}
CREATE_FIELDS: dict[str, type] = {"prompt": str, "model": str, "seconds": str, "size": str, "input_reference": dict}
# Filled after the tenant's policy when still unset: the relay's own documented example.
GEN2_EXAMPLE_DEFAULTS = {
    "interpolate": False,
    "upscale": False,
    "watermark": False,
    "motion_score": 22,
    "use_motion_score": True,
    "use_motion_vectors": False,
}
# gen2 body path -> OpenAI param, to word errors raised by the shared gen2 checks.
GEN2_PARAM = {
    "text_prompt": "prompt",
    "image_prompt": "input_reference.image_url",
    "init_image": "input_reference.image_url",
    **{gen2: name for name, (gen2, _) in GEN2_KNOBS.items()},
}

VIDEO_STATUS = {
    "SUBMITTING": "queued",
    "UNKNOWN": "queued",
    "PENDING": "queued",
    "THROTTLED": "queued",
    "RUNNING": "in_progress",
    "SUCCEEDED": "completed",
    "FAILED": "failed",
    "CANCELLED": "failed",
}
VARIANTS = ("video", "thumbnail", "spritesheet")
_INT_RE = re.compile(r"^-?[0-9]{1,20}$")
_CODE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


# --- create: OpenAI params -> gen2 body ------------------------------------------------


def coerce_form_value(name: str, value: str) -> Any:
    """A multipart field (always a string) as the type its target field has."""
    kind = GEN2_KNOBS[name][1] if name in GEN2_KNOBS else CREATE_FIELDS.get(name, str)
    if kind is int:
        if not _INT_RE.match(value.strip()):
            raise bad_request("invalid_type", f"`{name}` must be an integer.", name)
        return int(value)
    if kind is bool:
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise bad_request("invalid_type", f"`{name}` must be `true` or `false`.", name)
    return value


def check_create_params(raw: Any) -> dict[str, Any]:
    """Names and types of a create body (JSON, or multipart after coercion); returns the
    params with `input_reference` reduced to `image_url` (a string) when given."""
    if not isinstance(raw, dict):
        raise bad_request("invalid_body", "The request body must be a JSON object.")
    params: dict[str, Any] = {}
    for name, value in raw.items():
        kind = GEN2_KNOBS[name][1] if name in GEN2_KNOBS else CREATE_FIELDS.get(name)
        if kind is None:
            raise bad_request("unknown_parameter", f"Unknown parameter `{name}`.", name)
        if name == "seconds" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # JSON clients send 4 as often as "4"
        if name == "input_reference":
            params["image_url"] = _image_url(value)
            continue
        if not is_type(value, kind):
            raise bad_request("invalid_type", f"`{name}` must be {a_type_name(kind)}.", name)
        params[name] = value
    if "prompt" not in params:
        raise bad_request("missing_required_parameter", "`prompt` is required.", "prompt")
    return params


def _image_url(value: Any) -> str:
    if not isinstance(value, dict):
        raise bad_request(
            "invalid_type",
            '`input_reference` must be an image file or an object `{"image_url": "https://..."}`.',
            "input_reference",
        )
    if "file_id" in value:
        raise bad_request(
            "unsupported_parameter",
            "`input_reference.file_id` is not supported: upload the image or give `image_url`.",
            "input_reference.file_id",
        )
    for key in value:
        if key != "image_url":
            raise bad_request(
                "unknown_parameter", f"Unknown parameter `input_reference.{key}`.", f"input_reference.{key}"
            )
    url = value.get("image_url")
    if not isinstance(url, str) or not url:
        raise bad_request(
            "invalid_type", "`input_reference.image_url` must be a non-empty string.", "input_reference.image_url"
        )
    return url


def video_model(params: dict[str, Any]) -> VideoModel:
    name = params.get("model", DEFAULT_MODEL)
    model = MODELS.get(name)
    if model is None:
        raise bad_request(
            "model_not_found", f"The model `{name}` does not exist. Available: {', '.join(MODELS)}.", "model"
        )
    return model


def to_gen2(params: dict[str, Any], policy: Policy, image_url: str | None = None) -> tuple[Gen2Request, dict[str, Any]]:
    """Checked params (`check_create_params`) -> the upstream body and the record's meta.

    `image_url` replaces params["image_url"] (an uploaded image's signed gateway URL)."""
    model = video_model(params)
    seconds = params.get("seconds", model.seconds[0])
    if seconds not in model.seconds:
        raise bad_request(
            "invalid_value",
            f"`{model.id}` makes {' or '.join(model.seconds)}-second clips only; "
            f"`seconds` must be {_quoted(model.seconds)}.",
            "seconds",
        )
    size = params.get("size", model.default_size)
    if size not in model.sizes:
        raise bad_request("invalid_value", f"`{model.id}` supports `size` {_quoted(model.sizes)} only.", "size")
    prompt = params["prompt"]
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad_request("prompt_too_long", f"The prompt is longer than {MAX_PROMPT_CHARS} characters.", "prompt")
    image = image_url if image_url is not None else params.get("image_url")
    if image is not None:
        problem = https_url_problem(image)
        if problem:
            raise bad_request("invalid_url", f"`input_reference.image_url` {problem}.", "input_reference.image_url")
    if not prompt.strip() and image is None:
        raise bad_request(
            "missing_required_parameter",
            "`prompt` must not be empty unless an `input_reference` image is given.",
            "prompt",
        )
    gen2: dict[str, Any] = {"mode": "gen2", "text_prompt": prompt}
    if image is not None:
        gen2["image_prompt"] = gen2["init_image"] = image
    for name, (field, _) in GEN2_KNOBS.items():
        if name in params:
            gen2[field] = params[name]
    try:
        checked = check_gen2_options(gen2, prefix="gen2")
    except GatewayError as err:
        raise _in_openai_terms(err) from None
    gen2 = apply_policy(checked, policy)
    for field, value in GEN2_EXAMPLE_DEFAULTS.items():
        gen2.setdefault(field, value)
    options: dict[str, Any] = {
        "seconds": int(seconds),
        "gen2Options": gen2,
        "exploreMode": False,
        "assetGroupName": "Generative Video",
    }
    fill_defaults(options)
    body = {"taskType": "gen2", "internal": False, "options": options}
    return Gen2Request(body, ""), {"model": model.id, "size": size, "seconds": seconds}


def _in_openai_terms(err: GatewayError) -> GatewayError:
    """An error of the shared gen2 checks, with its param named as the OpenAI client knows it."""
    if err.param and err.param.startswith("gen2."):
        field = err.param.removeprefix("gen2.")
        name = GEN2_PARAM.get(field, field)
        err.param = name
        err.message = err.message.replace(f"`{field}`", f"`{name}`")
    return err


# --- read: task record -> Video object -------------------------------------------------


def video_object(record: TaskRecord) -> dict[str, Any]:
    task = record.task or {}
    meta = record.meta or {}
    model = MODELS.get(meta.get("model", DEFAULT_MODEL), MODELS[DEFAULT_MODEL])
    status = video_status(record.status)
    created_at = int(record.created_at)
    finished = status in ("completed", "failed")
    video: dict[str, Any] = {
        "id": record.task_id or task.get("id"),
        "object": "video",
        "created_at": created_at,
        "model": model.id,
        "status": status,
        "progress": 100 if status == "completed" else progress_percent(task.get("progressRatio")),
        "seconds": meta.get("seconds") or _task_seconds(task),
        "size": meta.get("size") or model.default_size,
        "prompt": _prompt(task),
        "error": video_error(task, record.status) if status == "failed" else None,
        "completed_at": int(record.updated_at) if finished else None,
        "expires_at": created_at + ARTIFACT_TTL_SECONDS if status == "completed" else None,
        "remixed_from_video_id": None,
    }
    return video


def video_status(task_status: str) -> str:
    """Unknown upstream states are in progress (not final), as the store ranks them."""
    return VIDEO_STATUS.get(task_status, "in_progress")


def progress_percent(ratio: Any) -> int:
    """progressRatio (0..1, a number or a numeric string) as 0..100."""
    if isinstance(ratio, bool):
        return 0
    if isinstance(ratio, str):
        try:
            ratio = float(ratio)
        except ValueError:
            return 0
    if not isinstance(ratio, (int, float)) or ratio != ratio:  # NaN
        return 0
    return max(0, min(100, round(ratio * 100)))


def video_error(task: dict[str, Any], task_status: str) -> dict[str, str]:
    """The upstream's error (a string, or an object with message/reason/code) as {code, message}."""
    err = task.get("error")
    default_code = "cancelled" if task_status == "CANCELLED" else "generation_failed"
    code, message = default_code, ""
    if isinstance(err, str):
        message = err
    elif isinstance(err, dict):
        for key in ("code", "reason"):
            value = err.get(key)
            if isinstance(value, str) and _CODE_RE.match(value):
                code = value
                break
        for key in ("message", "reason", "msg"):
            value = err.get(key)
            if isinstance(value, str) and value:
                message = value
                break
    if not message:
        message = "The task was cancelled." if task_status == "CANCELLED" else "The video generation failed."
    return {"code": code, "message": message[:1000]}


def artifact_url(task: dict[str, Any], variant: str) -> str | None:
    """The first artifact's URL for a variant: `url` for the video, the first of
    `previewUrls` for the thumbnail. Artifacts may be plain URL strings."""
    artifacts = task.get("artifacts")
    if not isinstance(artifacts, list) or not artifacts:
        return None
    first = artifacts[0]
    if isinstance(first, str):
        return (first or None) if variant == "video" else None
    if not isinstance(first, dict):
        return None
    if variant == "video":
        url = first.get("url")
    elif variant == "thumbnail":
        previews = first.get("previewUrls")
        url = previews[0] if isinstance(previews, list) and previews else first.get("thumbnailUrl")
    else:
        url = None
    return url if isinstance(url, str) and url else None


def _prompt(task: dict[str, Any]) -> str | None:
    options = task.get("options")
    gen2 = options.get("gen2Options") if isinstance(options, dict) else None
    prompt = gen2.get("text_prompt") if isinstance(gen2, dict) else None
    return prompt if isinstance(prompt, str) else None


def _task_seconds(task: dict[str, Any]) -> str:
    options = task.get("options")
    seconds = options.get("seconds") if isinstance(options, dict) else None
    return str(seconds) if isinstance(seconds, int) and not isinstance(seconds, bool) else str(GEN2_SECONDS)


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join(f'"{v}"' for v in values)
