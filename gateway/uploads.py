"""Images uploaded with `POST /v1/videos`: checked, kept, and served back by a signed URL.

The relay takes an image only as an https URL that it fetches itself. So the gateway keeps
an uploaded file in its store (SQLite or Redis, so any replica can serve it) and gives the
upstream `{public_url}/assets/{token}`, where `token` is a signed, expiring token naming
the file (`TokenSigner.asset_token`, valid `upload_ttl_seconds`). The store forgets the
bytes a little after the link expired.

Nothing is stored for a refused request: the link is made when the body is checked, but
the bytes are stored (`PendingUpload.keep`) only once the create is admitted, and removed
again (`discard`) when the upstream then definitely created nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import Config
from gateway.errors import GatewayError, bad_request
from gateway.store.base import Store
from gateway.tokens import TokenSigner

ALLOWED_TYPES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # and never more than the body limit, max_body_bytes
ASSET_ID_RE = re.compile(r"^[0-9a-f]{32}\.(jpg|png|webp)$")
KEEP_GRACE_SECONDS = 300.0  # bytes outlive their link by this much
PARAM = "input_reference"
_DATA_URL_RE = re.compile(r"^data:([a-z0-9.+/-]+)?(;[^,]*)?,", re.IGNORECASE)


@dataclass(frozen=True)
class Image:
    data: bytes
    content_type: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def sniff(data: bytes) -> str | None:
    """The image type by its magic bytes (JPEG, PNG, WebP), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_image(data: bytes, declared: str | None, max_bytes: int = MAX_UPLOAD_BYTES) -> Image:
    """An upload's type (declared and by content) and size, or a 400 naming the problem.
    A missing or generic declared type (application/octet-stream) defers to the content."""
    declared = (declared or "").split(";")[0].strip().lower()
    if not data:
        raise bad_request("invalid_file", "The uploaded `input_reference` file is empty.", PARAM)
    if len(data) > max_bytes:
        raise bad_request("file_too_large", f"The uploaded image is larger than {max_bytes} bytes.", PARAM)
    if declared and declared != "application/octet-stream" and declared not in ALLOWED_TYPES:
        raise bad_request("unsupported_file_type", f"Unsupported image type `{declared}`; upload {_allowed()}.", PARAM)
    actual = sniff(data)
    if actual is None:
        raise bad_request(
            "unsupported_file_type", f"The uploaded file is not an image of an accepted type ({_allowed()}).", PARAM
        )
    if declared in ALLOWED_TYPES and declared != actual:
        raise bad_request(
            "invalid_file", f"The uploaded file is declared `{declared}` but its content is `{actual}`.", PARAM
        )
    return Image(data, actual)


def decode_data_url(url: str, max_bytes: int = MAX_UPLOAD_BYTES) -> Image:
    """`data:image/png;base64,...` (OpenAI's other form of `image_url`) as an upload."""
    match = _DATA_URL_RE.match(url)
    if match is None or not (match.group(2) or "").lower().endswith(";base64"):
        raise bad_request(
            "invalid_url",
            "`input_reference.image_url` data URLs must be base64 (`data:image/png;base64,...`).",
            f"{PARAM}.image_url",
        )
    try:
        data = base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(
            "invalid_url", "`input_reference.image_url` is not valid base64.", f"{PARAM}.image_url"
        ) from None
    return check_image(data, match.group(1), max_bytes)


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def require_upload_url(config: Config) -> str:
    """The base the upstream fetches uploads from, or a 400 that says why uploads are off."""
    public_url = config.server.public_url
    if not public_url:
        raise bad_request(
            "upload_not_supported",
            "This gateway has no `server.public_url`, so the relay cannot fetch an uploaded image from it. "
            'Give `input_reference` as {"image_url": "https://..."} instead.',
            PARAM,
        )
    if not public_url.startswith("https://"):
        raise bad_request(
            "upload_not_supported",
            "The relay fetches images only from https URLs and this gateway's `server.public_url` is not https. "
            'Give `input_reference` as {"image_url": "https://..."} instead.',
            PARAM,
        )
    return public_url


@dataclass(frozen=True)
class PendingUpload:
    """An upload the create body links to, not stored yet: `TaskService.create` keeps it
    after admission and discards it when the create definitely failed."""

    uploads: Uploads
    asset_id: str
    image: Image

    async def keep(self) -> None:
        await self.uploads.save(self.asset_id, self.image)

    async def discard(self) -> None:
        await self.uploads.store.delete_asset(self.asset_id)


class Uploads:
    """Kept uploads, in the store (so every replica can serve the upstream's fetch).

    A file is kept a grace period beyond its link's expiry: the token decides when a link
    stops working, the store's expiry only when the bytes are forgotten."""

    def __init__(self, store: Store, ttl_seconds: float, clock: Callable[[], float] = time.time):
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.clock = clock

    def pending(self, image: Image) -> PendingUpload:
        """A new asset id for `image`, to link to now and store after admission."""
        return PendingUpload(self, f"{secrets.token_hex(16)}.{ALLOWED_TYPES[image.content_type]}", image)

    def url(self, base_url: str, signer: TokenSigner, asset_id: str) -> str:
        expires_at = math.ceil(self.clock() + self.ttl_seconds)
        return f"{base_url}/assets/{signer.asset_token(asset_id, expires_at)}"

    async def save(self, asset_id: str, image: Image) -> None:
        now = self.clock()
        await self.store.put_asset(
            asset_id, image.content_type, image.data, now + self.ttl_seconds + KEEP_GRACE_SECONDS, now
        )

    async def find(self, asset_id: str) -> tuple[str, bytes] | None:
        """(content type, bytes) of a kept upload; None for an unknown or malformed id."""
        if not ASSET_ID_RE.match(asset_id):
            return None
        return await self.store.get_asset(asset_id, self.clock())


def asset_not_found() -> GatewayError:
    return GatewayError(404, "asset_not_found", "Unknown or expired asset link.", "invalid_request_error")


def _allowed() -> str:
    return ", ".join(ALLOWED_TYPES)
