"""Images uploaded with `POST /v1/videos`: checked, kept, and served back by a signed URL.

The relay takes an image only as an https URL that it fetches itself. So the gateway keeps
an uploaded file (one file under `[server] upload_dir`) and gives the upstream
`{public_url}/assets/{token}`, where `token` is a signed, expiring token naming the file
(`TokenSigner.asset_token`, valid `upload_ttl_seconds`). Files are swept a while after
their last link expired. All workers of one host share the directory; replicas on several
hosts need it on a shared volume (docs/openai.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gateway.config import Config
from gateway.errors import GatewayError, bad_request
from gateway.tokens import TokenSigner

ALLOWED_TYPES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
TYPE_BY_EXT = {ext: ctype for ctype, ext in ALLOWED_TYPES.items()}
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # and never more than the body limit, max_body_bytes
ASSET_ID_RE = re.compile(r"^[0-9a-f]{32}\.(jpg|png|webp)$")
SWEEP_EVERY_SECONDS = 60.0
SWEEP_GRACE_SECONDS = 300.0  # a file outlives its last link by this much
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
        raise bad_request("unsupported_file_type", f"The uploaded file is not an image of an accepted type ({_allowed()}).", PARAM)
    if declared in ALLOWED_TYPES and declared != actual:
        raise bad_request("invalid_file", f"The uploaded file is declared `{declared}` but its content is `{actual}`.", PARAM)
    return Image(data, actual)


def decode_data_url(url: str, max_bytes: int = MAX_UPLOAD_BYTES) -> Image:
    """`data:image/png;base64,...` (OpenAI's other form of `image_url`) as an upload."""
    match = _DATA_URL_RE.match(url)
    if match is None or not (match.group(2) or "").lower().endswith(";base64"):
        raise bad_request("invalid_url", "`input_reference.image_url` data URLs must be base64 (`data:image/png;base64,...`).", f"{PARAM}.image_url")
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("invalid_url", "`input_reference.image_url` is not valid base64.", f"{PARAM}.image_url") from None
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
            "Give `input_reference` as {\"image_url\": \"https://...\"} instead.", PARAM,
        )
    if not public_url.startswith("https://"):
        raise bad_request(
            "upload_not_supported",
            "The relay fetches images only from https URLs and this gateway's `server.public_url` is not https. "
            "Give `input_reference` as {\"image_url\": \"https://...\"} instead.", PARAM,
        )
    return public_url


class Uploads:
    """Kept uploads under one directory; file name = asset id (random hex + extension)."""

    def __init__(self, directory: Path, ttl_seconds: float, clock: Callable[[], float] = time.time):
        self.directory = directory
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._next_sweep = 0.0

    @classmethod
    def from_config(cls, config: Config, clock: Callable[[], float] = time.time) -> "Uploads":
        return cls(upload_dir(config), config.server.upload_ttl_seconds, clock)

    def new_asset_id(self, content_type: str) -> str:
        return f"{secrets.token_hex(16)}.{ALLOWED_TYPES[content_type]}"

    def url(self, base_url: str, signer: TokenSigner, asset_id: str) -> str:
        expires_at = math.ceil(self.clock() + self.ttl_seconds)
        return f"{base_url}/assets/{signer.asset_token(asset_id, expires_at)}"

    async def save(self, asset_id: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, asset_id, data)
        now = self.clock()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY_SECONDS
            await asyncio.to_thread(self.sweep, now)

    def _write(self, asset_id: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{asset_id}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / asset_id)

    def find(self, asset_id: str) -> tuple[Path, str] | None:
        """The kept file and its content type; None for an unknown or malformed id."""
        if not ASSET_ID_RE.match(asset_id):
            return None
        path = self.directory / asset_id
        if not path.is_file():
            return None
        return path, TYPE_BY_EXT[asset_id.rsplit(".", 1)[1]]

    def sweep(self, now: float) -> int:
        """Delete files whose every link has expired (and stray temporaries)."""
        cutoff = now - self.ttl_seconds - SWEEP_GRACE_SECONDS
        removed = 0
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed


def upload_dir(config: Config) -> Path:
    """`[server] upload_dir`; else `uploads` beside the SQLite file; else data/uploads."""
    if config.server.upload_dir:
        return Path(config.server.upload_dir)
    url = config.store.url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).parent / "uploads"
    return Path("data/uploads")


def asset_not_found() -> GatewayError:
    return GatewayError(404, "asset_not_found", "Unknown or expired asset link.", "invalid_request_error")


def _allowed() -> str:
    return ", ".join(ALLOWED_TYPES)
