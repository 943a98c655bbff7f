"""GET /openapi.json (contract §11): served without a credential, a valid OpenAPI 3.1
document, and kept true to the code: every route documented (and every documented route
served), every error code a route's code raises listed on its operation, every request body
field the one its check takes, every integer sent bounded, nulls where the gateway sends
them. tests/test_schemathesis.py fuzzes a live gateway against it."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN_KEY, GatewayProcess
from inprocess import gateway_config
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from gateway import admin, gen2, gen2_options, videos
from gateway.app import create_app
from gateway.config import Policy
from gateway.errors import GatewayError
from gateway.openapi import document
from gateway.openapi.errors import ERRORS, code_of

DOC = document()
# Routes that are not the client API of §3, §9, §10: the relay's callbacks (§5).
UNDOCUMENTED = {("post", "/hooks/runway/{token}")}
# §10's routes come from other branches (the usage ledger, webhook operations): until they
# are merged, test_every_documented_operation_is_served names exactly these as missing.
SECTION_10 = {
    ("get", "/admin/v1/usage"),
    ("get", "/admin/v1/webhooks"),
    ("post", "/admin/v1/webhooks/{event_id}/redeliver"),
}


def served_routes(tmp_path: Path) -> dict[tuple[str, str], Callable[..., Any]]:
    """(method, path template) -> endpoint of every route of the app, HEAD aside (Starlette
    serves it for every GET). The admin console's pages and assets (§12: routes/console.py,
    console/) are a web page over this API, not operations of it."""
    app = create_app(gateway_config(tmp_path), background=False)
    served: dict[tuple[str, str], Callable[..., Any]] = {}
    for route in app.routes:
        if isinstance(route, Mount):
            continue  # static files (the console's assets)
        assert isinstance(route, Route), route
        if route.endpoint.__module__.startswith(("gateway.console", "gateway.routes.console")):
            continue
        for method in route.methods or ():
            if method != "HEAD":
                served[(method.lower(), route.path)] = route.endpoint
    return served


def documented() -> set[tuple[str, str]]:
    return {(method, path) for path, item in DOC["paths"].items() for method in item}


# --- the document ----------------------------------------------------------------------


def test_served_without_a_credential_and_valid(gw: GatewayProcess) -> None:
    resp = httpx.get(gw.url + "/openapi.json", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    served = resp.json()
    assert served == DOC
    assert served["openapi"].startswith("3.1")
    validate(served)


def test_both_security_schemes_and_who_needs_which() -> None:
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["tenantBearer"] == {**schemes["tenantBearer"], "type": "http", "scheme": "bearer"}
    assert schemes["adminBearer"] == {**schemes["adminBearer"], "type": "http", "scheme": "bearer"}
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            if path.startswith("/admin/"):
                expected = [{"adminBearer": []}]
            elif path.startswith(("/runway/", "/v1/")):
                expected = [{"tenantBearer": []}]
            else:
                continue
            assert op["security"] == expected, (method, path)
    for open_path in ("/openapi.json", "/healthz", "/readyz", "/assets/{token}"):
        assert DOC["paths"][open_path]["get"]["security"] == []


def test_operation_ids_are_unique_and_links_lead_to_them() -> None:
    ops = {op["operationId"]: op for item in DOC["paths"].values() for op in item.values()}
    assert len(ops) == len(documented())
    links = [
        link
        for item in DOC["paths"].values()
        for op in item.values()
        for answer in op["responses"].values()
        for link in answer.get("links", {}).values()
    ]
    assert len(links) >= 10
    for link in links:
        target = ops[link["operationId"]]
        path_params = {p["name"] for p in target.get("parameters", []) if p.get("in") == "path"}
        assert set(link["parameters"]) <= path_params, link


def test_every_route_is_documented(tmp_path: Path) -> None:
    served = set(served_routes(tmp_path))
    assert served - documented() - UNDOCUMENTED == set()
    assert UNDOCUMENTED <= served  # the exclusions name real routes
    assert not UNDOCUMENTED & documented()


def test_every_documented_operation_is_served(tmp_path: Path) -> None:
    missing = documented() - set(served_routes(tmp_path))
    assert missing == set(), f"documented but not served: {sorted(missing)}" + (
        " (the §10 routes of the usage-ledger and webhook-operations branches)" if missing <= SECTION_10 else ""
    )


def test_every_operation_documents_its_openai_shaped_errors() -> None:
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            statuses = [int(s) for s in op["responses"]]
            if path not in ("/healthz", "/readyz", "/openapi.json"):
                assert any(400 <= s < 500 for s in statuses), (method, path)
            for status, answer in op["responses"].items():
                if int(status) < 400 or path == "/readyz":
                    continue
                media = answer["content"]["application/json"]
                assert media["schema"] == error_ref, (method, path, status)
                for code, example in media["examples"].items():
                    error = example["value"]["error"]
                    assert error["code"] == code
                    assert OAS31Validator({**error_ref, "components": DOC["components"]}).is_valid(example["value"])


def _schemas(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _schemas(value)


def _sent() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema a client sends: parameters and request bodies, refs followed."""
    components = DOC["components"]

    def resolve(node: Any, seen: frozenset[str]) -> Iterator[dict[str, Any]]:
        for schema in _schemas(node):
            target = schema.get("$ref", "")
            if target and target not in seen:
                kind, name = target.split("/")[-2:]
                yield from resolve(components[kind][name], seen | {target})
            else:
                yield schema

    for path, item in DOC["paths"].items():
        for method, op in item.items():
            for schema in resolve([op.get("parameters", []), op.get("requestBody", {})], frozenset()):
                yield f"{method} {path}", schema


def test_every_integer_a_client_sends_has_a_maximum() -> None:
    integers = [(where, s) for where, s in _sent() if "integer" in (s.get("type") or ())]
    assert len(integers) > 20
    for where, schema in integers:
        assert isinstance(schema.get("maximum"), int), (where, schema)
        assert isinstance(schema.get("minimum"), int), (where, schema)
        assert schema["maximum"] <= 2**63 - 1


def test_documented_bounds_are_the_checks_bounds() -> None:
    schemas = DOC["components"]["schemas"]
    documented = schemas["Gen2Options"]["properties"]
    assert documented["seed"]["maximum"] == gen2.MAX_SEED
    assert documented["text_prompt"]["maxLength"] == gen2_options.MAX_PROMPT_CHARS
    assert (
        schemas["TenantCreate"]["properties"]["limits"]["properties"]["credits_per_day"]["maximum"] == admin.MAX_LIMIT
    )
    assert schemas["Rotation"]["properties"]["grace_seconds"]["maximum"] == admin.MAX_SECONDS
    assert schemas["VideoCreate"]["properties"]["size"]["enum"] == ["1280x768"]
    # at the bound: accepted; one past it: the 400 that names the field
    at_max = {"text_prompt": "x", "seed": gen2.MAX_SEED, "motion_score": 100}
    assert gen2.check_gen2_options(at_max)["seed"] == gen2.MAX_SEED
    for name in ("seed", "motion_score"):
        with pytest.raises(GatewayError) as refused:
            gen2.check_gen2_options({**at_max, name: documented[name]["maximum"] + 1})
        assert refused.value.param == f"options.gen2Options.{name}"
    with pytest.raises(GatewayError):
        admin.check_limits({"credits_per_day": admin.MAX_LIMIT + 1})


# --- request bodies: the documented fields are the fields each check takes -------------


def _props(name: str) -> set[str]:
    return set(DOC["components"]["schemas"][name]["properties"])


WRONG = object()  # of no type any check accepts: a field the check knows refuses its value, never its name


def _refusal(check: Callable[[Any], Any], body: dict[str, Any]) -> GatewayError | None:
    try:
        check(body)
    except GatewayError as err:
        return err
    return None


@pytest.mark.parametrize(
    ("schema", "check", "base"),
    [
        ("TenantCreate", lambda b: admin.tenant_create(b, 1e9), {"id": "t"}),
        ("TenantUpdate", admin.tenant_changes, {}),
        ("KeyCreate", lambda b: admin.key_create(b, 1e9), {"name": "k"}),
        ("KeyUpdate", lambda b: admin.key_changes(b, 1e9), {}),
        ("Rotation", admin.grace_seconds, {}),
        ("NativeCreate", lambda b: gen2.validate_native(b, Policy()), {}),
        ("VideoCreate", videos.check_create_params, {"prompt": "p"}),
    ],
)
def test_a_body_schema_has_exactly_the_fields_its_check_takes(
    schema: str, check: Callable[[Any], Any], base: dict[str, Any]
) -> None:
    for field in _props(schema):
        err = _refusal(check, {**base, field: WRONG})
        assert err is None or err.code != "unknown_parameter", (schema, field, err)
    err = _refusal(check, {**base, "not_documented": 1})
    assert err is not None and err.code == "unknown_parameter", (schema, err)


def test_nested_bodies_have_exactly_the_checked_fields() -> None:
    schemas = DOC["components"]["schemas"]
    native = schemas["NativeCreate"]["properties"]
    assert set(native) == set(gen2.TOP_LEVEL)
    assert set(native["options"]["properties"]) == set(gen2.OPTIONS)
    assert _props("Gen2Options") == set(gen2_options.GEN2_OPTION_TYPES)
    assert _props("Policy") == {"force", "defaults", "hook_hosts", "relays"}  # relays: contract §14
    assert set(schemas["TenantCreate"]["properties"]["limits"]["properties"]) == set(admin.ALL_LIMITS)
    form = _props("VideoCreateMultipart")
    assert form == {*videos.CREATE_FIELDS, *videos.GEN2_KNOBS, "input_reference[image_url]"}
    assert _props("VideoCreateForm") == form - {"input_reference"}


# --- answers: nulls included -----------------------------------------------------------


def _check_against(schema_name: str, value: Any) -> None:
    validator = OAS31Validator({"$ref": f"#/components/schemas/{schema_name}", "components": DOC["components"]})
    errors = [e.message for e in validator.iter_errors(value)]
    assert errors == [], (schema_name, errors, value)


def test_config_tenants_and_keys_fit_the_schemas_with_their_nulls(gw: GatewayProcess) -> None:
    admin_auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=gw.url, headers=admin_auth, timeout=10) as client:
        tenants = client.get("/admin/v1/tenants").json()
        _check_against("TenantList", tenants)
        config_tenant = next(t for t in tenants["data"] if t["id"] == "team-a")
        assert config_tenant["created_at"] is None and config_tenant["source"] == "config"
        keys = client.get("/admin/v1/tenants/team-a/keys").json()
        _check_against("ApiKeyList", keys)
        assert keys["data"][-1]["created_at"] is None and keys["data"][-1]["prefix"] is None
        _check_against("TenantWithUsage", client.get("/admin/v1/tenants/team-a").json())
        _check_against("TenantUsage", client.get("/admin/tenants/team-a/usage").json())
    with pytest.raises(AssertionError):
        _check_against("ApiKey", {**keys["data"][-1], "created_at": "never"})  # the check can fail


# --- error codes: what each route's code raises is documented on it ----------------------


def _literal(node: ast.expr | None) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


def _arg(call: ast.Call, index: int, name: str) -> ast.expr | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == name), None)


def _raised(call: ast.Call) -> tuple[int, str] | None:
    """(status, code) of an error built by this call, when both are literals."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if name in ("GatewayError", "UpstreamFailure"):
        status, code = _literal(_arg(call, 0, "status")), _literal(_arg(call, 1, "code"))
    elif name == "bad_request":
        status, code = 400, _literal(_arg(call, 0, "code"))
    elif name == "not_found":
        given = _arg(call, 1, "code")
        status, code = 404, _literal(given) if given is not None else "task_not_found"
    elif name in ("unauthenticated", "AuthFailure"):
        status, code = 401, "invalid_api_key"
    else:
        return None
    return (status, code) if isinstance(status, int) and isinstance(code, str) else None


def _methods_by_name(module: types.ModuleType) -> dict[str, list[Callable[..., Any]]]:
    """Methods of the gateway classes a module names, by name: `view.tenant(...)` on an
    object of unknown type is taken to be any of them (an over-approximation)."""
    found: dict[str, list[Callable[..., Any]]] = {}
    for value in vars(module).values():
        if inspect.isclass(value) and value.__module__.startswith("gateway."):
            for name, member in vars(value).items():
                if inspect.isfunction(member):
                    found.setdefault(name, []).append(member)
    return found


def _swallowed(tree: ast.AST) -> set[ast.AST]:
    """Nodes inside `try` bodies whose GatewayError handler does not re-raise: what they
    raise is turned into another answer there (which the handler's own code shows)."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        for handler in node.handlers:
            names = {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)} if handler.type else set()
            reraises = any(isinstance(n, ast.Raise) and n.exc is None for n in ast.walk(handler))
            if "GatewayError" in names and not reraises:
                inside |= {n for stmt in node.body for n in ast.walk(stmt)}
    return inside


def _callees(
    node: ast.AST, fn: Callable[..., Any], module: types.ModuleType, called: set[ast.AST]
) -> list[Callable[..., Any]]:
    """The gateway functions a name or attribute may stand for: names in the function's
    module, `module.f` and `Class.f` exactly, `self.f` in the function's class, and any
    other call `x.f(...)` as every method `f` of the gateway classes the module names."""
    scope = vars(module)
    if isinstance(node, ast.Attribute) and node not in called:
        if not (isinstance(node.value, ast.Name) and isinstance(scope.get(node.value.id), types.ModuleType)):
            return []  # `t.keys`: a field, not a call
    if isinstance(node, ast.Name):
        candidates = [scope.get(node.id)]
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        base = scope.get(node.value.id)
        if node.value.id == "self":
            base = scope.get(fn.__qualname__.split(".")[0])
        if isinstance(base, types.ModuleType) or inspect.isclass(base):
            candidates = [getattr(base, node.attr, None)]
        else:
            candidates = list(_methods_by_name(module).get(node.attr, []))
    elif isinstance(node, ast.Attribute):
        candidates = list(_methods_by_name(module).get(node.attr, []))
    else:
        return []
    return [c for c in candidates if inspect.isfunction(c) and c.__module__.startswith("gateway.")]


def codes_raised_by(endpoint: Callable[..., Any]) -> set[tuple[int, str]]:
    """Every literal (status, code) an endpoint and the gateway functions it reaches build
    (an over-approximation where it cannot tell which method a call reaches)."""
    found: set[tuple[int, str]] = set()
    seen: set[Callable[..., Any]] = set()
    todo = [endpoint]
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        module = inspect.getmodule(fn)
        assert module is not None
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        swallowed = _swallowed(tree)
        called = {n.func for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if node in swallowed:
                continue
            if isinstance(node, ast.Call) and (raised := _raised(node)):
                found.add(raised)
            todo.extend(_callees(node, fn, module, called))
    return found


# Where the analysis over-reaches (a call it cannot tell apart), named and explained.
NOT_RAISED = {
    ("post", "/admin/v1/tenants", 404, "tenant_not_found"): "`s.config.tenant(id)` is Config.tenant, not AdminView's",
}


def _documented_codes(op: dict[str, Any]) -> set[tuple[int, str]]:
    codes = set()
    for status, answer in op["responses"].items():
        for code in answer.get("content", {}).get("application/json", {}).get("examples", {}):
            codes.add((int(status), code))
    return codes


def test_every_error_code_a_route_raises_is_documented_on_it(tmp_path: Path) -> None:
    checked = 0
    for (method, path), endpoint in served_routes(tmp_path).items():
        if (method, path) in UNDOCUMENTED:
            continue
        found = codes_raised_by(endpoint)
        stale = {k for k in NOT_RAISED if k[:2] == (method, path) and k[2:] not in found}
        assert not stale, f"NOT_RAISED names what the analysis no longer finds: {stale}"
        raised = {(status, code) for status, code in found if (method, path, status, code) not in NOT_RAISED}
        missing = raised - _documented_codes(DOC["paths"][path][method])
        assert missing == set(), f"{method.upper()} {path} raises undocumented {sorted(missing)}"
        checked += len(raised)
    assert checked > 60  # the analysis does find the codes


def test_the_analysis_finds_codes_through_helpers() -> None:
    from gateway.routes import admin as admin_routes
    from gateway.routes import native

    create = codes_raised_by(native.create_task)
    assert {(400, "unsupported_task_type"), (409, "idempotency_key_reused")} <= create  # gen2.py, idempotency.py
    assert (404, "tenant_not_found") in codes_raised_by(admin_routes.show_tenant)  # AdminView.tenant
    assert (403, "permission_denied") in codes_raised_by(admin_routes.show_key)  # admin.authenticate_admin


def test_every_code_in_the_table_is_one_the_gateway_raises() -> None:
    package = Path(gen2.__file__).parent
    source = "\n".join(p.read_text() for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "openapi")
    unused = {code_of(k) for k in ERRORS if f'"{code_of(k)}"' not in source}
    # §10's codes come with the usage-ledger and webhook-operations branches
    assert unused <= {"webhook_event_not_found", "webhook_event_not_dead"}, unused
