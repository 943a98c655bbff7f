"""The admin console: static files from `gateway/console/` at `/admin/`.

Public content (no credential is needed to load it): every data call the console makes is
an admin API request with the operator's key as a Bearer header. The files are read once,
when the routes are built, and served with an ETag that is the hash of their content (the
browser revalidates each time and gets a 304 while nothing changed) and a strict
Content-Security-Policy: scripts and styles from this origin only, no inline code, no
framing, no third-party origin.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.errors import not_found

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # revalidate every time: the ETag makes that a 304 while the files are unchanged
    "cache-control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
INDEX = "index.html"


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str  # quoted, as in the header

    def response(self, request: Request) -> Response:
        headers = {**SECURITY_HEADERS, "etag": self.etag}
        tags = _etags(request.headers.get("if-none-match", ""))
        if self.etag in tags or "*" in tags:
            return Response(status_code=304, headers=headers)
        return Response(self.body, headers=headers, media_type=self.media_type)


def _etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header (weak ones compare as strong: the
    body is the same bytes either way)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",")} if header else set()


def load_assets() -> dict[str, Asset]:
    """Every file of the console by name (the folder is flat), read from the package."""
    assets: dict[str, Asset] = {}
    for entry in resources.files("gateway").joinpath("console").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in MEDIA_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            assets[entry.name] = Asset(body, MEDIA_TYPES[suffix], etag)
    return assets


def routes() -> list[Route]:
    """`/admin/` (the page), `/admin/assets/<name>` (its modules, styles and icon) and
    `/admin`, which redirects to `/admin/` so the page's relative URLs resolve."""
    assets = load_assets()
    index = assets[INDEX]

    async def page(request: Request) -> Response:
        return index.response(request)

    async def asset(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None or found is index:
            raise not_found("No such console file.", "not_found", None)
        return found.response(request)

    async def redirect(request: Request) -> Response:
        return RedirectResponse("/admin/", status_code=308)

    return [
        Route("/admin", redirect, methods=["GET"]),
        Route("/admin/", page, methods=["GET"]),
        Route("/admin/assets/{name}", asset, methods=["GET"]),
    ]
