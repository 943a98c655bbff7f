"""Floor: Starlette + one httpx.AsyncClient proxying POST /runway/tasks, no checks.

`--transport default` is httpx's own (httpcore) pool; `--transport aiohttp` is the
httpx-aiohttp transport (the httpx API over an aiohttp session), the other candidate for
the gateway's upstream client. Same server settings as `runway-gateway serve`.
`.venv/bin/python bench/floor_httpx.py --port P --upstream URL --api-key K [--transport aiohttp]`
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def _client(transport: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256, keepalive_expiry=30)
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=30)
    return httpx.AsyncClient(limits=limits, timeout=30)


def create_app(upstream: str, api_key: str, transport: str = "default") -> Starlette:
    client: httpx.AsyncClient | None = None
    url = upstream.rstrip("/") + "/runway/tasks"
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json", "accept": "application/json"}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal client
        client = _client(transport)
        try:
            yield
        finally:
            await client.aclose()

    async def create(request: Request) -> Response:
        assert client is not None
        body = await request.body()
        resp = await client.post(url, content=body, headers=headers)
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[Route("/runway/tasks", create, methods=["POST"]), Route("/healthz", healthz)], lifespan=lifespan
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--transport", choices=("default", "aiohttp"), default="default")
    a = p.parse_args()
    uvicorn.run(
        create_app(a.upstream, a.api_key, a.transport),
        host=a.host,
        port=a.port,
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
