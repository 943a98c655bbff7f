"""Redis store URLs: `redis[s]://[[user]:password@]host[:port][/db][?prefix=P&...]`.

A module of its own that imports nothing of the gateway's: config validation checks a
store URL (and its TLS files) with it, and the store layer imports nothing from config,
so there is no import cycle between the two.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class Address:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ssl_ca_certs: str | None = None  # PEM file of the CA(s) to trust instead of the system's
    ssl_certfile: str | None = None  # PEM client certificate (mutual TLS)
    ssl_keyfile: str | None = None  # its private key, when not inside ssl_certfile


def parse_url(url: str) -> Address:
    """`redis://[[user]:password@]host[:port][/db]`; `rediss://` for TLS, with optional
    `?ssl_ca_certs=/ca.pem&ssl_certfile=/client.pem&ssl_keyfile=/client.key`. Any other
    query parameter is refused (a misspelt one would otherwise be silently ignored)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis:// or rediss://)")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the Redis database must be a number, not {path!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the Redis port must be a number") from None
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    for name, value in params.items():
        if name not in TLS_PARAMS:
            raise ValueError(f"unknown Redis URL parameter {name!r} (known: prefix, {', '.join(TLS_PARAMS)})")
        if parts.scheme != "rediss":
            raise ValueError(f"{name} needs a rediss:// URL")
        if not os.path.isabs(value):
            raise ValueError(f"{name} must be an absolute file path, not {value!r}")
    return Address(
        tls=parts.scheme == "rediss",
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        **params,
    )


def tls_context(address: Address) -> ssl.SSLContext | None:
    """The TLS context of a `rediss://` address (None for `redis://`), its files loaded now,
    once per client: a missing or malformed one is a ValueError naming the parameter
    (check-config reports it)."""
    if not address.tls:
        return None
    if address.ssl_keyfile and not address.ssl_certfile:
        raise ValueError("ssl_keyfile needs ssl_certfile")
    try:
        context = ssl.create_default_context(cafile=address.ssl_ca_certs)
    except OSError as exc:  # ssl.SSLError is one
        raise ValueError(f"ssl_ca_certs {address.ssl_ca_certs}: {exc.strerror or exc}") from None
    if address.ssl_certfile:
        try:
            context.load_cert_chain(address.ssl_certfile, address.ssl_keyfile)
        except OSError as exc:
            files = " and ".join(f for f in (address.ssl_certfile, address.ssl_keyfile) if f)
            raise ValueError(f"ssl_certfile/ssl_keyfile {files}: {exc.strerror or exc}") from None
    return context


def split_prefix(url: str) -> tuple[str, str | None]:
    """Take a `prefix=` query parameter out of a store URL (`redis://h:6379/0?prefix=gw:`),
    so `[store] url` alone can namespace a deployment."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [v for k, v in query if k == "prefix"]
    if not prefixes:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefixes[-1]
