"""JWT key sources besides a PEM file: a JWKS URL (fetched, cached) and an HS256 secret."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import GatewayProcess, Simulator, TenantSpec, free_port
from cryptography.hazmat.primitives.asymmetric import ec


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, ec.EllipticCurvePrivateKey, list[int]]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "k1", "use": "sig", "alg": "ES256"})
    body = json.dumps({"keys": [jwk]}).encode()
    hits = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[0] += 1
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/jwks.json", key, hits
    server.shutdown()
    server.server_close()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "https://idp.test", "aud": "runway-gateway", "tenant": "t", "exp": now + 300, **over}


def get(g: GatewayProcess, token: str) -> httpx.Response:
    return httpx.get(g.url + "/runway/tasks", headers={"Authorization": f"Bearer {token}"})


def test_jwks_url_keys_are_fetched_once_and_cached(tmp_path: Path, sim: Simulator, jwks_server) -> None:
    url, key, hits = jwks_server
    extra = f'[auth.jwt]\nalgorithms = ["ES256"]\njwks_url = "{url}"\nissuer = "https://idp.test"\naudience = "runway-gateway"\n'
    g = GatewayProcess(tmp_path, sim.url, [TenantSpec("t")], extra_toml=extra)
    g.start()
    try:
        good = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "k1"})
        for _ in range(5):
            assert get(g, good).status_code == 200
        assert hits[0] == 1
        other = ec.generate_private_key(ec.SECP256R1())
        forged = jwt.encode(claims(), other, algorithm="ES256", headers={"kid": "k1"})
        assert get(g, forged).json()["error"]["code"] == "invalid_api_key"
        unknown_kid = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "nope"})
        assert get(g, unknown_kid).status_code == 401
    finally:
        g.stop()


def test_hs256_secret(tmp_path: Path, sim: Simulator) -> None:
    secret = "a-shared-hs256-secret-long-enough-for-hs384-too-0123456789"
    extra = f'[auth.jwt]\nalgorithms = ["HS256"]\nsecret = "{secret}"\nissuer = "https://idp.test"\naudience = "runway-gateway"\n'
    g = GatewayProcess(tmp_path, sim.url, [TenantSpec("t")], extra_toml=extra)
    g.start()
    try:
        assert get(g, jwt.encode(claims(), secret, algorithm="HS256")).status_code == 200
        assert (
            get(
                g, jwt.encode(claims(), "wrong-secret-wrong-secret-wrong-secret-wrong-secret-xx", algorithm="HS256")
            ).status_code
            == 401
        )
        assert get(g, jwt.encode(claims(), secret, algorithm="HS384")).status_code == 401  # not in the pinned list
        assert (
            get(g, jwt.encode({k: v for k, v in claims().items() if k != "exp"}, secret, algorithm="HS256")).status_code
            == 401
        )
    finally:
        g.stop()
