"""Configuration: TOML in, validated dataclasses out.

Loading reports *every* problem at once, each with its key path
(`tenants[1].limits.max_active_tasks: must be a positive integer`), so an operator fixes a
file in one pass. `${NAME}` / `${NAME:-default}` are replaced from the environment in every
string before validation, so secrets never need to be written into the file.

The dataclasses are the schema: a section's known keys are its fields, a key left out
takes the field's default, and a field the file sets plainly carries its value check
(`_setting(default, check)`). Keys that need more (required, cross-checked, nested) are
read by hand in `_Validator`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt as pyjwt

from gateway.gen2_options import GEN2_OPTION_TYPES, option_value_problem
from gateway.jsontypes import a_type_name, is_type
from gateway.ssrf import entry_problem
from gateway.store.base import Limits  # re-exported: a tenant's limits are the store's input
from gateway.store.redis.url import parse_url, split_prefix, tls_context

TENANT_ID_RE = re.compile(r"^[a-z0-9-]{1,64}\Z")
RELAY_ID_RE = re.compile(r"^[a-z0-9-]{1,32}\Z")
DEFAULT_RELAY_ID = "default"  # the one relay of a file with the old [upstream] table
MAX_RELAY_WEIGHT = 1000
KEY_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
ENV_LINE_RE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
MIN_HS_SECRET_BYTES = 32
JWT_ALGORITHMS = {
    *("HS256", "HS384", "HS512", "RS256", "RS384", "RS512"),
    *("ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"),
}
LOG_LEVELS = {"debug", "info", "warning", "error"}
# [admin] key -> Config field
ADMIN_KEYS = {
    "keys": "admin_keys",
    "jwt_claim": "admin_jwt_claim",
    "jwt_role": "admin_jwt_role",
    "audit_retention_days": "audit_retention_days",
}

Check = Callable[[Any], str | None]  # a value's problem, or None when it is fine


class ConfigError(Exception):
    """Every problem found in a config file, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --- value checks: each returns a problem or None -------------------------------------


def _setting(default: Any, check: Check) -> Any:
    """A field the file may set directly: `check` is its value check, `default` its value when
    the key is left out (the validator also keeps it when the check fails)."""
    return field(default=default, metadata={"check": check})


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _non_empty_string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _secret_or_empty(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    if v and len(v) < 32:
        return "must be at least 32 characters (or empty to let the store generate one)"
    return None


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _positive_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else "must be a positive integer"


def _non_negative_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be a non-negative integer"


def _positive_number(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else "must be a positive number"


def _non_negative_number(v: Any) -> str | None:
    return (
        None if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else "must be a non-negative number"
    )


def _one_of(options: set[str]) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(sorted(options))}"

    return check


def _list_of(item: Check) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return "must be an array"
        for i, x in enumerate(v):
            problem = item(x)
            if problem:
                return f"item {i} {problem}"
        return None

    return check


def _key_hashes(v: Any) -> str | None:
    if not isinstance(v, list):
        return 'must be an array of "sha256:<64 hex>" strings'
    for i, x in enumerate(v):
        if not isinstance(x, str) or not KEY_HASH_RE.match(x):
            return f'item {i} must be "sha256:<64 lowercase hex>" (make one with `runway-gateway new-key`)'
    return None


def _algorithms(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
        return "must be an array of algorithm names"
    bad = [a for a in v if a not in JWT_ALGORITHMS]
    if bad:
        return f"unsupported algorithm(s) {', '.join(bad)} (never 'none')"
    return None


def _http_url(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL"
    return None


def _http_url_or_empty(v: Any) -> str | None:
    return None if v == "" else _http_url(v)


def _status_path(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    if v and (not v.startswith("/") or "{id}" not in v):
        return "must be empty or a path starting with / that contains {id}"
    return None


def _store_url(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    if v.startswith("sqlite:///") and len(v) > len("sqlite:///"):
        return None
    if v.startswith(("redis://", "rediss://")):
        try:
            tls_context(parse_url(split_prefix(v)[0]))  # loads the TLS files: they must be usable
        except ValueError as exc:
            return str(exc)
        return None
    return "must be sqlite:///PATH or redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB][?prefix=P&ssl_ca_certs=F&ssl_certfile=F&ssl_keyfile=F]"


def _hook_host(v: Any) -> str | None:
    """Checked by the parser the SSRF rules use (ssrf.entry_problem), so an entry accepted
    here is one the gateway can start with; catch-all CIDRs are refused."""
    if not isinstance(v, str) or not v:
        return "must be a host name, *.suffix, IP address or CIDR"
    if v == "*.":
        return "wildcard needs a suffix"
    return entry_problem(v)


# --- the schema ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    public_url: str = _setting("", _http_url_or_empty)
    max_body_bytes: int = _setting(1_048_576, _positive_int)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _setting((), _list_of(_string))
    signing_secret: str = _setting("", _secret_or_empty)
    log_level: str = _setting("info", _one_of(LOG_LEVELS))
    upload_ttl_seconds: float = _setting(3600.0, _positive_number)  # how long an upload's signed /assets URL works
    # slow and idle clients (gateway/connections.py): a request's headers must arrive
    # within header_timeout_seconds, its body within body_timeout_seconds after them
    header_timeout_seconds: float = _setting(10.0, _positive_number)
    body_timeout_seconds: float = _setting(30.0, _positive_number)
    keepalive_timeout_seconds: float = _setting(5.0, _positive_number)  # an idle keep-alive connection closes then
    max_connections_per_worker: int = _setting(1000, _positive_int)  # beyond it a request gets 503 server_busy


@dataclass(frozen=True)
class UpstreamConfig:
    # required in the file: no default would be safe to send the relay key to
    base_url: str = _setting("", _http_url)
    api_keys: tuple[str, ...] = _setting((), _list_of(_non_empty_string))
    timeout_seconds: float = _setting(30.0, _positive_number)
    status_path: str = _setting("/runway/tasks/{id}", _status_path)
    poll_interval_seconds: float = _setting(5.0, _positive_number)
    task_timeout_seconds: float = _setting(3600.0, _positive_number)
    # an unidentified create (timeout, reset, garbage) frees its slot
    unknown_outcome_timeout_seconds: float = _setting(300.0, _positive_number)
    # Where artifact URLs may point beyond public addresses (the SSRF rules; entries as in
    # hook_hosts). Empty: public addresses only. Set: only matching hosts.
    artifact_hosts: tuple[str, ...] = _setting((), _list_of(_hook_host))


def _integer(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) else "must be an integer"


def _weight(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RELAY_WEIGHT
    return None if ok else f"must be an integer from 1 to {MAX_RELAY_WEIGHT}"


@dataclass(frozen=True)
class RelayConfig(UpstreamConfig):
    """One `[[relays]]` block: every `[upstream]` key, and where the relay stands among the
    others (contract §14). The old `[upstream]` table is one of these with id `default`."""

    id: str = DEFAULT_RELAY_ID  # required in [[relays]]; read by hand
    priority: int = _setting(0, _integer)  # lower is tried first
    weight: int = _setting(1, _weight)  # within one priority, new tasks spread by weight
    enabled: bool = _setting(True, _bool)  # false = drain: no new tasks, its tasks still served

    @classmethod
    def of(cls, upstream: UpstreamConfig, **relay: Any) -> RelayConfig:
        """`upstream`'s settings as a relay (the old `[upstream]` table: id `default`)."""
        if isinstance(upstream, RelayConfig) and not relay:
            return upstream
        values = {f.name: getattr(upstream, f.name) for f in dataclasses.fields(UpstreamConfig)}
        return cls(**values, **relay)


@dataclass(frozen=True)
class RoutingConfig:
    max_attempts: int = _setting(2, _positive_int)  # relays one create may try (1 = no failover)
    # a relay whose circuit opened is skipped this long, then gets one probe create
    cooldown_seconds: float = _setting(10.0, _positive_number)


@dataclass(frozen=True)
class StoreConfig:
    url: str = _setting("sqlite:///data/gateway.db", _store_url)


@dataclass(frozen=True)
class PricingConfig:
    gen2: int = _setting(10, _non_negative_int)
    upscale: int = _setting(5, _non_negative_int)
    interpolate: int = _setting(0, _non_negative_int)
    refund_failed: bool = _setting(True, _bool)

    def price(self, gen2_options: dict[str, Any]) -> int:
        credits = self.gen2
        if gen2_options.get("upscale") is True:
            credits += self.upscale
        if gen2_options.get("interpolate") is True:
            credits += self.interpolate
        return credits


@dataclass(frozen=True)
class JWTConfig:
    algorithms: tuple[str, ...]  # required; read by hand
    public_key_file: str = _setting("", _string)
    jwks_url: str = _setting("", _http_url_or_empty)
    secret: str = _setting("", _string)
    issuer: str = _setting("", _string)
    audience: str = _setting("", _string)
    tenant_claim: str = _setting("tenant", _non_empty_string)
    leeway_seconds: float = _setting(30.0, _non_negative_number)


@dataclass(frozen=True)
class Policy:
    force: dict[str, Any] = field(default_factory=dict)  # gen2Options fields, read by hand
    defaults: dict[str, Any] = field(default_factory=dict)
    hook_hosts: tuple[str, ...] = _setting((), _list_of(_hook_host))
    relays: tuple[str, ...] = _setting((), _list_of(_non_empty_string))  # () = every relay


@dataclass(frozen=True)
class Tenant:
    id: str  # required; read by hand
    keys: tuple[str, ...] = _setting((), _key_hashes)
    webhook_secret: str = _setting("", _string)
    enabled: bool = _setting(True, _bool)
    limits: Limits = field(default_factory=Limits)
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True)
class WebhookConfig:
    max_attempts: int = _setting(20, _positive_int)
    initial_backoff_seconds: float = _setting(2.0, _positive_number)
    max_backoff_seconds: float = _setting(3600.0, _positive_number)

    def backoff(self, attempt: int) -> float:
        """Delay after failed attempt number `attempt` (1-based): 2, 4, 8, ... capped."""
        return min(self.initial_backoff_seconds * 2.0 ** (attempt - 1), self.max_backoff_seconds)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    admin_keys: tuple[str, ...] = _setting((), _key_hashes)  # [admin] keys
    metrics_bearer_token: str = _setting("", _string)  # [metrics] bearer_token
    jwt: JWTConfig | None = None  # [auth.jwt]
    tenants: tuple[Tenant, ...] = ()
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    base_dir: Path = Path(".")
    # [admin]: a JWT is an admin's when its claim `jwt_claim` holds `jwt_role`
    admin_jwt_claim: str = _setting("roles", _non_empty_string)
    admin_jwt_role: str = _setting("runway-gateway-admin", _non_empty_string)
    audit_retention_days: int = _setting(400, _positive_int)
    # [[relays]]; () = the one relay of `upstream` (id `default`), see `relay_list`
    relays: tuple[RelayConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    @property
    def relay_list(self) -> tuple[RelayConfig, ...]:
        """Every relay, in file order: the `[[relays]]`, or `[upstream]` as relay `default`."""
        return self.relays or (RelayConfig.of(self.upstream),)

    @property
    def create_seconds(self) -> float:
        """The longest a create may wait on relays: with one relay its timeout; with
        several, each relay it may try (the `max_attempts` slowest) once per key, since a
        refused key (401/403) moves the create to that relay's next key. The
        Idempotency-Key's wait and lease, and the sweep of lost reservations, use this."""
        relays = self.relay_list
        if len(relays) == 1:
            return relays[0].timeout_seconds
        per_relay = sorted((r.timeout_seconds * len(r.api_keys) for r in relays), reverse=True)
        return sum(per_relay[: self.routing.max_attempts])

    def tenant(self, tenant_id: str) -> Tenant | None:
        for t in self.tenants:
            if t.id == tenant_id:
                return t
        return None


# --- loading -------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Config:
    """Read, substitute and validate a TOML file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: invalid TOML: {exc}"]) from None
    return parse_config(raw, environ if environ is not None else dict(os.environ), base_dir=p.parent)


def parse_config(raw: dict[str, Any], environ: dict[str, str], base_dir: Path = Path(".")) -> Config:
    v = _Validator(environ)
    data = v.substitute(raw, "")
    cfg = v.config(data, base_dir)
    if v.problems:
        raise ConfigError(v.problems)
    return cfg


def parse_policy(raw: Any, path: str = "policy") -> Policy:
    """A tenant's `policy` table checked as the config file's is (gen2Options fields in
    `force` and `defaults`, `hook_hosts` entries), for a policy set through the admin API;
    raise ConfigError listing every problem as `<path>.<key>: <problem>`."""
    v = _Validator({})
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: must be an object"])
    v.known_keys(raw, path, _keys(Policy))
    policy = v.policy(raw, path)
    if v.problems:
        raise ConfigError(v.problems)
    return policy


def config_warnings(config: Config) -> list[str]:
    """Settings that load but are surely not meant: check-config prints them, serve logs them.

    A day or month credit budget below the price of a tenant's cheapest task (its policy's
    `force` included) refuses every create with 429 insufficient_quota."""
    warnings: list[str] = []
    for i, tenant in enumerate(config.tenants):
        cheapest = config.pricing.price(tenant.policy.force)
        for name in ("credits_per_day", "credits_per_month"):
            budget = getattr(tenant.limits, name)
            if budget is not None and budget < cheapest:
                warnings.append(
                    f"tenants[{i}].limits.{name}: {budget} is below the price of one task ({cheapest} credits): "
                    "every create of this tenant will be refused with 429 insufficient_quota"
                )
    enabled = {relay.id for relay in config.relay_list if relay.enabled}
    if not enabled:
        warnings.append("relays: every relay is drained (enabled = false): every create will be refused with 503")
    for i, tenant in enumerate(config.tenants):
        if enabled and tenant.policy.relays and not enabled & set(tenant.policy.relays):
            warnings.append(
                f"tenants[{i}].policy.relays: every relay it names is drained (enabled = false): "
                "every create of this tenant will be refused with 503"
            )
    return warnings + _gateway_wide_warnings(config) + _placeholder_warnings(config)


# [[relays]] keys whose first relay's value applies to every task, whichever relay has it
GATEWAY_WIDE_RELAY_SETTINGS = ("task_timeout_seconds", "unknown_outcome_timeout_seconds", "poll_interval_seconds")


def _gateway_wide_warnings(config: Config) -> list[str]:
    """The task lifecycle's clocks (slot timeout, unknown-outcome settlement, poll pace,
    callback token lifetime) are the gateway's, taken from the first relay: another
    relay's own value is accepted but has no effect, which its operator should know."""
    first = config.relay_list[0]
    return [
        f"relays[{i}].{name}: {getattr(relay, name):g} differs from the first relay's ({getattr(first, name):g}), "
        "which applies to every task: set them equal"
        for i, relay in enumerate(config.relays)
        for name in GATEWAY_WIDE_RELAY_SETTINGS
        if i > 0 and getattr(relay, name) != getattr(first, name)
    ]


PLACEHOLDER_RELAY_KEY = "replace-me"  # config/gateway.example.toml's sk-replace-me
PLACEHOLDER_HASH = "sha256:" + "0" * 64  # the example's tenant key: no key hashes to it


def _placeholder_warnings(config: Config) -> list[str]:
    """The example config's placeholders, left in a copy: they load, but the relay refuses
    the key and no key matches the hash. Named by path only, never by value."""
    relay_keys = (
        [(f"relays[{i}].api_keys", r.api_keys) for i, r in enumerate(config.relays)]
        if config.relays
        else [("upstream.api_keys", config.upstream.api_keys)]
    )
    warnings = [
        f"{path}[{j}] is the example's placeholder ({PLACEHOLDER_RELAY_KEY}): "
        "the relay will refuse it; set UPSTREAM_API_KEY or the relay's key"
        for path, keys in relay_keys
        for j, k in enumerate(keys)
        if PLACEHOLDER_RELAY_KEY in k
    ]
    hashes = [("admin.keys", config.admin_keys)] + [
        (f"tenants[{i}].keys", t.keys) for i, t in enumerate(config.tenants)
    ]
    warnings += [
        f"{path}[{j}] is the all-zero placeholder hash: no key matches it (make one with `runway-gateway new-key`)"
        for path, keys in hashes
        for j, k in enumerate(keys)
        if k == PLACEHOLDER_HASH
    ]
    return warnings


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """`KEY=VALUE` lines as docker compose's env files have them: blank lines and `#`
    comments skipped, an optional `export `, the value in optional quotes (unquoted, ` #`
    starts a comment). Raise ConfigError naming every line that is none of these."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found"]) from None
    env: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = ENV_LINE_RE.match(stripped)
        if not m:
            problems.append(f"{p}:{number}: not a KEY=VALUE line")
            continue
        env[m.group(1)] = _env_value(m.group(2))
    if problems:
        raise ConfigError(problems)
    return env


def _env_value(raw: str) -> str:
    value = raw.strip()
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        if end > 0:
            return value[1:end]
    return re.sub(r"\s+#.*$", "", value)


class _Validator:
    """Walks the parsed TOML, collecting problems instead of stopping at the first."""

    def __init__(self, environ: dict[str, str]):
        self.environ = environ
        self.problems: list[str] = []
        self.unset_paths: list[str] = []  # values whose ${NAME} had no value

    def fail(self, path: str, message: str) -> None:
        """Record a problem, unless it only repeats an unset variable's: a value left empty
        by a missing ${NAME} (or the list or table holding it) is reported once, by name."""
        if any(_is_within(unset, path) for unset in self.unset_paths):
            return
        self.problems.append(f"{path}: {message}")

    # ${VAR} substitution ------------------------------------------------------------
    def substitute(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            return self._sub_str(value, path)
        if isinstance(value, list):
            return [self.substitute(x, f"{path}[{i}]") for i, x in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.substitute(x, _join(path, k)) for k, x in value.items()}
        return value

    def _sub_str(self, s: str, path: str) -> str:
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = self.environ.get(name)
            if default is not None and not value:
                return default  # as in a shell, ":-" also replaces an empty value
            if value is not None:
                return value
            # each missing variable has its line, even beside another in the same string
            self.problems.append(f"{path}: environment variable {name} is not set and has no default")
            self.unset_paths.append(path)
            return ""

        return ENV_RE.sub(repl, s)

    # typed getters ------------------------------------------------------------------
    def table(self, data: dict[str, Any], key: str, path: str, known: set[str]) -> dict[str, Any]:
        """`data[key]`, a table with only `known` keys; {} when absent."""
        value = data.get(key, {})
        full = _join(path, key)
        if not isinstance(value, dict):
            self.fail(full, "must be a table")
            return {}
        self.known_keys(value, full, known)
        return value

    def known_keys(self, t: dict[str, Any], path: str, known: set[str]) -> None:
        for k in t:
            if k not in known:
                self.fail(_join(path, k), "unknown key")

    def get(self, data: dict[str, Any], key: str, path: str, default: Any, check: Check) -> Any:
        if key not in data:
            return default
        value = data[key]
        problem = check(value)
        if problem:
            self.fail(_join(path, key), problem)
            return default
        return value

    def setting(self, f: dataclasses.Field[Any], t: dict[str, Any], path: str, key: str = "") -> Any:
        """`_setting` field `f` read from table `t` (under `key`, its name by default): the
        file's value if it passes the field's check, else the default; an array as a tuple
        and a number for a float field as a float, as the dataclass holds them."""
        value = self.get(t, key or f.name, path, f.default, f.metadata["check"])
        if isinstance(f.default, tuple):
            return tuple(value)
        if isinstance(f.default, float):
            return float(value)
        return value

    def settings(self, schema: type, t: dict[str, Any], path: str) -> dict[str, Any]:
        """Every `_setting` field of `schema` read from table `t`, by name."""
        return {f.name: self.setting(f, t, path) for f in dataclasses.fields(schema) if "check" in f.metadata}

    def section(self, data: dict[str, Any], key: str, schema: type) -> dict[str, Any]:
        """Top-level table `key` read as `schema`'s `_setting` fields."""
        return self.settings(schema, self.table(data, key, "", _keys(schema)), key)

    # sections -----------------------------------------------------------------------
    def config(self, data: dict[str, Any], base_dir: Path) -> Config:
        # The file's tables; [admin], [metrics] and [auth] each hold one field of Config.
        self.known_keys(
            data,
            "",
            {"server", "upstream", "relays", "routing", "store", "pricing", "admin", "metrics", "auth", "tenants"}
            | {"webhooks"},
        )
        server = self.server(self.section(data, "server", ServerConfig))
        relays: tuple[RelayConfig, ...] = ()
        if "relays" in data:
            if "upstream" in data:
                self.fail("upstream", "give either [upstream] (one relay) or [[relays]] blocks, not both")
            relays = self.relays(data["relays"])
            upstream: UpstreamConfig = relays[0] if relays else UpstreamConfig()
        else:
            upstream = self.upstream(self.table(data, "upstream", "", _keys(UpstreamConfig)))
        routing = RoutingConfig(**self.section(data, "routing", RoutingConfig))
        store = StoreConfig(**self.section(data, "store", StoreConfig))
        pricing = PricingConfig(**self.section(data, "pricing", PricingConfig))
        admin = self.admin(self.table(data, "admin", "", set(ADMIN_KEYS)))
        metrics_token = self.one_field(data, "metrics", "bearer_token", "metrics_bearer_token")
        auth_t = self.table(data, "auth", "", {"jwt"})
        jwt_cfg = self.jwt(auth_t["jwt"], base_dir) if "jwt" in auth_t else None
        tenants = self.tenants(data.get("tenants", []))
        self.tenant_relays(tenants, {r.id for r in relays} if relays else {DEFAULT_RELAY_ID})
        webhooks = self.webhooks(self.section(data, "webhooks", WebhookConfig))
        return Config(
            server,
            upstream,
            store,
            pricing,
            metrics_bearer_token=metrics_token,
            jwt=jwt_cfg,
            tenants=tenants,
            webhooks=webhooks,
            base_dir=base_dir,
            relays=relays,
            routing=routing,
            **admin,
        )

    def admin(self, t: dict[str, Any]) -> dict[str, Any]:
        """`[admin]`: each key is a Config field of its own (ADMIN_KEYS names which)."""
        fields = {f.name: f for f in dataclasses.fields(Config)}
        return {name: self.setting(fields[name], t, "admin", key) for key, name in ADMIN_KEYS.items()}

    def one_field(self, data: dict[str, Any], section: str, key: str, name: str) -> Any:
        """`[section] key`, a table of one key that is Config's `_setting` field `name`."""
        (f,) = (f for f in dataclasses.fields(Config) if f.name == name)
        return self.setting(f, self.table(data, section, "", {key}), section, key)

    def server(self, values: dict[str, Any]) -> ServerConfig:
        proxies: list[Any] = []
        for i, cidr in enumerate(values["trusted_proxies"]):
            try:
                proxies.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                self.fail(f"server.trusted_proxies[{i}]", "must be an IP address or CIDR")
        values.update(public_url=values["public_url"].rstrip("/"), trusted_proxies=tuple(proxies))
        return ServerConfig(**values)

    def upstream(self, t: dict[str, Any], path: str = "upstream", schema: type = UpstreamConfig) -> Any:
        """`[upstream]`, or one `[[relays]]` block (`schema` RelayConfig, its own keys too)."""
        values = self.settings(schema, t, path)
        if not values["api_keys"] and not t.get("api_keys"):  # a bad list was reported already
            self.fail(f"{path}.api_keys", "must list at least one upstream API key")
        if "base_url" not in t:
            self.fail(f"{path}.base_url", "required: the relay's URL (no default: the relay keys are sent there)")
        values.update(
            base_url=values["base_url"].rstrip("/"),
            artifact_hosts=tuple(h.lower() for h in values["artifact_hosts"]),
        )
        return schema(**values, **({"id": t["id"]} if schema is RelayConfig else {}))

    def relays(self, items: Any) -> tuple[RelayConfig, ...]:
        """`[[relays]]`: each block checked as `[upstream]`, ids unique, at least one."""
        if not isinstance(items, list) or not items:
            self.fail("relays", "must be one or more [[relays]] tables")
            return ()
        blocks = self.blocks(items, "relays", RelayConfig, RELAY_ID_RE, "required: must match [a-z0-9-]{1,32}")
        return tuple(self.upstream({**t, "id": rid}, path, RelayConfig) for path, rid, t in blocks)

    def blocks(
        self, items: list[Any], section: str, schema: type, id_re: re.Pattern[str], id_rule: str
    ) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """Each table of the array of tables `section` ([[relays]], [[tenants]]) with its
        path and its id: keys known to `schema`, the id matching `id_re` and unique. A
        table that is not one is skipped; a bad id is reported and stood in for."""
        seen: set[str] = set()
        noun = section.removesuffix("s")
        for i, t in enumerate(items):
            path = f"{section}[{i}]"
            if not isinstance(t, dict):
                self.fail(path, "must be a table")
                continue
            self.known_keys(t, path, _keys(schema))
            ident = t.get("id")
            if not isinstance(ident, str) or not id_re.match(ident):
                self.fail(f"{path}.id", id_rule)
                ident = f"invalid-{i}"
            elif ident in seen:
                self.fail(f"{path}.id", f"duplicate {noun} id {ident!r}")
            seen.add(ident)
            yield path, ident, t

    def tenant_relays(self, tenants: tuple[Tenant, ...], known: set[str]) -> None:
        """A tenant's `policy.relays` may name only configured relays."""
        for i, tenant in enumerate(tenants):
            for j, rid in enumerate(tenant.policy.relays):
                if rid not in known:
                    self.fail(
                        f"tenants[{i}].policy.relays[{j}]",
                        f"unknown relay {rid!r} (configured: {', '.join(sorted(known))})",
                    )

    def jwt(self, t: Any, base_dir: Path) -> JWTConfig | None:
        path = "auth.jwt"
        if not isinstance(t, dict):
            self.fail(path, "must be a table")
            return None
        self.known_keys(t, path, _keys(JWTConfig))
        algs = self.get(t, "algorithms", path, [], _algorithms)
        if not algs and not t.get("algorithms"):  # a bad list was reported already
            self.fail(f"{path}.algorithms", "must list at least one algorithm")
        sources = [k for k in ("public_key_file", "jwks_url", "secret") if t.get(k)]
        if len(sources) != 1:
            self.fail(path, "set exactly one of public_key_file, jwks_url or secret")
        values = self.settings(JWTConfig, t, path)
        secret = values["secret"]
        if secret and len(secret.encode("utf-8")) < MIN_HS_SECRET_BYTES:
            self.fail(
                f"{path}.secret",
                f"must be at least {MIN_HS_SECRET_BYTES} bytes: "
                "a shorter HS256/HS384/HS512 secret can be guessed offline from one token",
            )
        if secret and any(not a.startswith("HS") for a in algs):
            self.fail(f"{path}.algorithms", "a shared secret works only with HS256/HS384/HS512")
        if "secret" not in t and any(a.startswith("HS") for a in algs):
            self.fail(
                f"{path}.algorithms",
                "HS* algorithms need `secret`; with a public key or JWKS they would accept forged tokens",
            )
        key_file = values["public_key_file"]
        if key_file:
            kp = Path(key_file) if os.path.isabs(key_file) else base_dir / key_file
            if not kp.is_file():
                self.fail(f"{path}.public_key_file", f"file {key_file} not found")
            else:
                values["public_key_file"] = str(kp)
                if problem := public_key_problem(kp, algs):
                    self.fail(f"{path}.public_key_file", f"{key_file}: {problem}")
        return JWTConfig(algorithms=tuple(algs), **values)

    def tenants(self, items: Any) -> tuple[Tenant, ...]:
        if not isinstance(items, list):
            self.fail("tenants", "must be an array of tables ([[tenants]])")
            return ()
        out: list[Tenant] = []
        seen_keys: dict[str, str] = {}
        for path, tid, t in self.blocks(items, "tenants", Tenant, TENANT_ID_RE, "must match [a-z0-9-]{1,64}"):
            values = self.settings(Tenant, t, path)
            for j, k in enumerate(values["keys"]):
                if k in seen_keys:
                    self.fail(f"{path}.keys[{j}]", f"already used by tenant {seen_keys[k]!r}")
                seen_keys[k] = tid
            limits_t = self.table(t, "limits", path, _keys(Limits))
            limits = Limits(
                **{
                    f.name: self.get(limits_t, f.name, f"{path}.limits", None, _positive_int)
                    for f in dataclasses.fields(Limits)
                }
            )
            policy = self.policy(self.table(t, "policy", path, _keys(Policy)), f"{path}.policy")
            out.append(Tenant(id=tid, limits=limits, policy=policy, **values))
        return tuple(out)

    def policy(self, t: dict[str, Any], path: str) -> Policy:
        force = self.gen2_fields(t.get("force", {}), f"{path}.force")
        defaults = self.gen2_fields(t.get("defaults", {}), f"{path}.defaults")
        values = self.settings(Policy, t, path)
        return Policy(
            force=force,
            defaults=defaults,
            hook_hosts=tuple(h.lower() for h in values["hook_hosts"]),
            relays=tuple(dict.fromkeys(values["relays"])),
        )

    def gen2_fields(self, t: Any, path: str) -> dict[str, Any]:
        if not isinstance(t, dict):
            self.fail(path, "must be a table of gen2Options fields")
            return {}
        for k, val in t.items():
            expected = GEN2_OPTION_TYPES.get(k)
            if expected is None:
                self.fail(_join(path, k), "not a gen2Options field")
            elif not is_type(val, expected):
                self.fail(_join(path, k), f"must be {a_type_name(expected)}")
            elif problem := option_value_problem(k, val):
                self.fail(_join(path, k), problem)
        return dict(t)

    def webhooks(self, values: dict[str, Any]) -> WebhookConfig:
        cfg = WebhookConfig(**values)
        if cfg.max_backoff_seconds < cfg.initial_backoff_seconds:
            self.fail("webhooks.max_backoff_seconds", "must not be below initial_backoff_seconds")
        return cfg


def public_key_problem(path: Path, algorithms: list[str]) -> str | None:
    """Why the JWT key file holds no key PyJWT can verify any of `algorithms` with, or None.
    Parsed when the config loads (check-config, start, SIGHUP) so a file that would turn
    every JWT into a 401 is refused whole instead. One key serves one family (RSA, EC,
    EdDSA), so it must fit at least one of the algorithms, not all."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    names = [a for a in algorithms if not a.startswith("HS")]  # HS* with a key file: refused apart
    for name in names:
        try:
            pyjwt.get_algorithm_by_name(name).prepare_key(data)
        except (pyjwt.PyJWTError, ValueError, TypeError, NotImplementedError):
            continue
        return None
    return f"holds no public key usable with {' or '.join(names)} (expected a PEM public key)"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_within(path: str, container: str) -> bool:
    """True if `path` is `container` itself or a key or item inside it."""
    return path == container or path.startswith((container + ".", container + "["))


def _keys(schema: type) -> set[str]:
    """The keys a section may have: its dataclass's fields."""
    return {f.name for f in dataclasses.fields(schema)}
