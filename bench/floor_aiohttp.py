"""Floor: Starlette + one aiohttp ClientSession proxying POST /runway/tasks, no checks.

What a gateway on this stack cannot beat: the same server (uvicorn, same settings as
`runway-gateway serve`), one pooled client, the body passed through untouched, the
upstream key swapped in. `.venv/bin/python bench/floor_aiohttp.py --port P --upstream URL --api-key K`
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def create_app(upstream: str, api_key: str) -> Starlette:
    session: aiohttp.ClientSession | None = None
    url = upstream.rstrip("/") + "/runway/tasks"
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json", "accept": "application/json"}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30))
        try:
            yield
        finally:
            await session.close()

    async def create(request: Request) -> Response:
        assert session is not None
        body = await request.body()
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            return Response(data, status_code=resp.status, media_type="application/json")

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
    a = p.parse_args()
    uvicorn.run(
        create_app(a.upstream, a.api_key),
        host=a.host,
        port=a.port,
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
