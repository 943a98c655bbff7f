"""The SSRF rules, as a table: on submit (no DNS) and at delivery (after DNS); then the same
rules applied to the artifact URLs `GET /v1/videos/{id}/content` streams, through real servers."""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayProcess, Simulator, TenantSpec, gen2_body, self_signed
from prometheus_client import CollectorRegistry

from gateway.config import UpstreamConfig
from gateway.metrics import Metrics
from gateway.ssrf import (
    HookPolicy,
    HookRefused,
    check_hook_url,
    classify,
    entry_problem,
    normalise_host,
    resolve_hook,
    system_resolver,
)
from gateway.upstream import Upstream, UpstreamFailure

OPEN = HookPolicy.from_hosts([])


def fake_resolver(table: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


# (url, hook_hosts) refused on submit already: scheme, shape, and every spelling of a bad address.
REFUSED_ON_SUBMIT = [
    ("http://127.0.0.1/hook", []),
    ("http://[::1]/hook", []),
    ("http://10.0.0.8/hook", []),
    ("http://169.254.169.254/latest/meta-data", []),
    ("http://2130706433/", []),
    ("http://0x7f.1/", []),
    ("http://0177.0.0.1/", []),
    ("http://127.1/", []),
    ("http://127.0.0.1./", []),
    ("http://１２７．０．０．１/", []),  # noqa: RUF001 - full-width digits, IDNA-mapped
    ("http://[::ffff:127.0.0.1]/", []),
    ("http://[::ffff:a9fe:a9fe]/", ["::ffff:169.254.169.254"]),
    ("http://[64:ff9b::7f00:1]/", []),  # NAT64 of 127.0.0.1
    ("http://[2002:a9fe:a9fe::]/", []),  # 6to4 of 169.254.169.254
    ("http://[fe80::1%25eth0]/", []),
    ("http://0.0.0.0/", []),
    ("http://0/", []),
    ("http://[::]/", []),
    ("http://224.0.0.1/", []),
    ("http://100.64.0.1/", []),
    ("http://192.168.1.1/", []),
    ("http://172.16.0.1/", []),
    ("http://[fd12::1]/", []),
    ("http://localhost:8080/", []),
    ("http://api.localhost/", []),
    ("file:///etc/passwd", []),
    ("gopher://x/", []),
    ("ftp://example.com/", []),
    ("data:text/plain,hi", []),
    ("javascript:alert(1)", []),
    ("http:///nohost", []),
    ("http://user:pass@example.com/", []),
    ("http://user@example.com/", []),
    ("http://example.com\\@127.0.0.1/", []),
    ("http://exa mple.com/", []),
    ("http://example.com:0/", []),
    ("http://example.com:99999/", []),
    ("http://[::1/", []),
    ("http://999.1.1.1/", []),
    ("http://1.2.3.4.5/", []),
    ("http://%31%32%37.0.0.1/", []),
    ("http://example.com/" + "a" * 2048, []),
    # hook_hosts set: the host must match; wildcards are not enough for loopback/link-local
    ("https://example.com/", ["*.svc.internal"]),
    ("http://svc.internal/", ["*.svc.internal"]),  # wildcard means subdomains only
    ("http://127.0.0.1/", ["*.svc.internal"]),
    ("http://127.0.0.1/", ["127.0.0.2"]),
    ("http://10.0.0.8/", ["192.168.0.0/16"]),
    ("http://api.localhost/", ["*.localhost"]),  # a wildcard does not allow loopback
    # the metadata address never, whatever the entries say
    ("http://169.254.169.254/", ["169.254.169.254"]),
    ("http://169.254.169.254/", ["169.254.0.0/16"]),
    ("http://[fd00:ec2::254]/", ["fd00:ec2::254"]),
    ("http://[::ffff:169.254.169.254]/", ["0.0.0.0/0", "::/0"]),
    # a network wider than the special range is no permission for loopback or link-local
    # (catch-alls are refused as entries, but a stored policy may still hold one)
    ("http://127.0.0.1/", ["0.0.0.0/0"]),
    ("http://127.0.0.1/", ["64.0.0.0/2"]),
    ("http://[::1]/", ["::/0"]),
    ("http://[::1]/", ["::/8"]),
    ("http://[::ffff:127.0.0.1]/", ["0.0.0.0/0", "::/0"]),
    ("http://[::ffff:127.0.0.1]/", ["::ffff:0:0/96"]),
    ("http://[fe80::1]/", ["::/0"]),
    ("http://[fe80::1]/", ["fe80::/9"]),
    ("http://169.254.0.5/", ["0.0.0.0/0"]),
    ("http://169.254.0.5/", ["169.0.0.0/8"]),
    ("http://169.254.169.254/", ["0.0.0.0/0"]),
    ("http://0.0.0.0/", ["0.0.0.0/0"]),
]


@pytest.mark.parametrize("url,hosts", REFUSED_ON_SUBMIT)
async def test_refused_on_submit_and_on_delivery(url: str, hosts: list[str]) -> None:
    policy = HookPolicy.from_hosts(hosts)
    assert check_hook_url(url, policy) is not None
    with pytest.raises(HookRefused):
        await resolve_hook(url, policy, fake_resolver({"example.com": ["93.184.216.34"]}))


# (url, hook_hosts, DNS answers for the injected resolver, the address delivery connects to)
ACCEPTED = [
    ("http://93.184.216.34/hook", [], {}, "93.184.216.34"),
    ("https://[2606:2800:220:1:248:1893:25c8:1946]/", [], {}, "2606:2800:220:1:248:1893:25c8:1946"),
    ("https://hooks.example.com/x?y=1", [], {"hooks.example.com": ["93.184.216.34"]}, "93.184.216.34"),
    ("HTTPS://Hooks.Example.COM./x", [], {"hooks.example.com": ["93.184.216.34"]}, "93.184.216.34"),
    ("http://127.0.0.1:8080/hook", ["127.0.0.1"], {}, "127.0.0.1"),
    ("http://0x7f.1:8080/hook", ["127.0.0.1"], {}, "127.0.0.1"),  # same address, other spelling
    ("http://[::1]/hook", ["::1"], {}, "::1"),
    ("http://127.0.0.5/hook", ["127.0.0.0/8"], {}, "127.0.0.5"),
    ("http://127.0.0.5/hook", ["127.0.0.0/24"], {}, "127.0.0.5"),  # a CIDR inside the loopback range
    ("http://[::ffff:127.0.0.1]/", ["127.0.0.0/8"], {}, "::ffff:127.0.0.1"),
    ("http://169.254.0.5/", ["169.254.0.0/16"], {}, "169.254.0.5"),  # inside link-local
    ("http://[fe80::1]/", ["fe80::/64"], {}, "fe80::1"),
    ("http://10.0.0.8/hook", ["10.0.0.0/8"], {}, "10.0.0.8"),
    ("http://10.0.0.8/hook", ["10.0.0.8"], {}, "10.0.0.8"),
    ("http://a.svc.internal/hook", ["*.svc.internal"], {"a.svc.internal": ["10.1.2.3"]}, "10.1.2.3"),
    ("http://a.svc.internal/hook", ["*.svc.internal"], {"a.svc.internal": ["fd00::5", "100.64.1.1"]}, "fd00::5"),
    ("http://hooks.corp/hook", ["hooks.corp"], {"hooks.corp": ["127.0.0.1"]}, "127.0.0.1"),  # exact name
    ("http://a.svc.internal/", ["*.svc.internal", "127.0.0.0/8"], {"a.svc.internal": ["127.0.0.9"]}, "127.0.0.9"),
    ("http://localhost:9000/", ["localhost"], {"localhost": ["127.0.0.1", "::1"]}, "127.0.0.1"),
    ("https://a.example.com/", ["*.example.com"], {"a.example.com": ["93.184.216.34"]}, "93.184.216.34"),
    ("http://host1/", [], {"host1": ["93.184.216.34"]}, "93.184.216.34"),  # ends in a digit, not an IP
]


@pytest.mark.parametrize("url,hosts,dns,address", ACCEPTED)
async def test_accepted(url: str, hosts: list[str], dns: dict[str, list[str]], address: str) -> None:
    policy = HookPolicy.from_hosts(hosts)
    assert check_hook_url(url, policy) is None
    hook = await resolve_hook(url, policy, fake_resolver(dns))
    assert hook.address == ipaddress.ip_address(address)


# Names that pass on submit (no DNS then) but resolve to somewhere a hook may not go.
REFUSED_AFTER_DNS = [
    ("http://evil.example.com/", [], ["127.0.0.1"]),
    ("http://evil.example.com/", [], ["10.0.0.8"]),
    ("http://evil.example.com/", [], ["93.184.216.34", "10.0.0.8"]),  # every address is checked
    ("http://evil.example.com/", [], ["169.254.169.254"]),
    ("http://evil.example.com/", [], ["::ffff:127.0.0.1"]),
    ("http://evil.example.com/", [], ["fe80::1%eth0"]),
    ("http://evil.example.com/", [], ["0.0.0.0"]),
    ("http://a.svc.internal/", ["*.svc.internal"], ["127.0.0.1"]),  # wildcard: loopback not enough
    ("http://a.svc.internal/", ["*.svc.internal"], ["169.254.0.5"]),  # nor link-local
    ("http://a.svc.internal/", ["*.svc.internal", "a.svc.internal"], ["169.254.169.254"]),
    ("http://a.svc.internal/", ["*.svc.internal", "0.0.0.0/0"], ["127.0.0.1"]),  # a catch-all: not enough
    ("http://a.svc.internal/", ["*.svc.internal", "::/0"], ["::1"]),
    ("http://a.svc.internal/", ["*.svc.internal", "::/0"], ["fe80::1"]),
    ("http://evil.example.com/", [], []),  # no answer
    ("http://missing.example.com/", [], None),  # resolver error
]


@pytest.mark.parametrize("url,hosts,answers", REFUSED_AFTER_DNS)
async def test_refused_after_dns(url: str, hosts: list[str], answers: list[str] | None) -> None:
    policy = HookPolicy.from_hosts(hosts)
    assert check_hook_url(url, policy) is None
    dns = {} if answers is None else {"evil.example.com": answers, "a.svc.internal": answers}
    with pytest.raises(HookRefused):
        await resolve_hook(url, policy, fake_resolver(dns))


async def test_real_resolver_localhost_is_loopback() -> None:
    """The system resolver's answer for `localhost` (127.0.0.1) is checked after DNS too."""
    answers = await system_resolver("localhost", 80)
    assert answers and all(ipaddress.ip_address(a).is_loopback for a in answers)

    async def via_system(host: str, port: int) -> list[str]:  # a harmless-looking name, real answer
        return await system_resolver("localhost", port)

    assert check_hook_url("http://innocent.example.com/", OPEN) is None
    with pytest.raises(HookRefused, match="resolves to"):
        await resolve_hook("http://innocent.example.com/", OPEN, via_system)
    with pytest.raises(HookRefused, match="resolves to"):
        await resolve_hook("http://innocent.example.com/", HookPolicy.from_hosts(["*.example.com"]), via_system)
    with pytest.raises(HookRefused):
        await resolve_hook("http://localhost:1/", OPEN)  # default resolver; refused on the name already
    hook = await resolve_hook("http://localhost:1/", HookPolicy.from_hosts(["localhost"]))  # real DNS
    assert hook.address.is_loopback and hook.host == "localhost"


async def test_resolved_hook_connects_to_address_and_keeps_name() -> None:
    policy = HookPolicy.from_hosts(["*.svc.internal"])
    hook = await resolve_hook(
        "https://a.svc.internal:8443/p?q=1#frag", policy, fake_resolver({"a.svc.internal": ["10.0.0.8"]})
    )
    assert hook.url == "https://10.0.0.8:8443/p?q=1"
    assert hook.host_header == "a.svc.internal:8443"
    assert hook.sni_hostname == "a.svc.internal"
    literal = await resolve_hook("https://[2606:2800:220:1:248:1893:25c8:1946]/", OPEN)
    assert literal.url == "https://[2606:2800:220:1:248:1893:25c8:1946]:443/"
    assert literal.host_header == "[2606:2800:220:1:248:1893:25c8:1946]"
    assert literal.sni_hostname is None


@pytest.mark.parametrize(
    "raw,canonical",
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("::FFFF:127.0.0.1", "::ffff:7f00:1"),
        ("Example.COM.", "example.com"),
    ],
)
def test_normalise_host(raw: str, canonical: str) -> None:
    assert normalise_host(raw.lower())[0] == canonical


def test_problem_messages_do_not_echo_the_url() -> None:
    url = "http://user:s3cret-token@example.com/?token=s3cret-token"
    problem = check_hook_url(url, OPEN)
    assert problem and "s3cret" not in problem


def test_classify() -> None:
    ip = ipaddress.ip_address
    assert classify(ip("8.8.8.8")).value == "public"
    assert classify(ip("100.127.255.255")).value == "private"
    assert classify(ip("198.51.100.7")).value == "special"
    assert classify(ip("255.255.255.255")).value == "special"
    assert classify(ip("ff02::1")).value == "special"
    assert classify(ip("64:ff9b::a9fe:a9fe")).value == "metadata"


# --- artifact URLs: GET /v1/videos/{id}/content fetches them under the same rules ----------
# Real processes: a simulator slow enough that a crafted callback (signed with the task's own
# token) lands first and names the artifact URL; a gateway whose artifact_hosts allow only
# a stand-in CDN on 127.0.0.2; an "internal" server on 127.0.0.1 that must never be reached.


@dataclass
class Recorder:
    """A little HTTP server recording (path, Host) of every request; `routes` maps a path to
    (status, headers, body)."""

    host: str
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


@contextlib.contextmanager
def recorder(host: str, tls: ssl.SSLContext | None = None) -> Iterator[Recorder]:
    rec = Recorder(host)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            rec.seen.append((self.path, self.headers.get("host", "")))
            status, headers, body = rec.routes.get(self.path, (404, {}, b"not here"))
            self.send_response(status)
            for name, value in {**headers, "content-length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    if tls is not None:  # a failed handshake ends in accept(), before any request is seen
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


SECRET_BODY = b"internal secret: never for a tenant"
VIDEO_BYTES = b"\x00\x00\x00\x18ftypmp42 a stand-in video"


@pytest.fixture(scope="module")
def internal() -> Iterator[Recorder]:
    with recorder("127.0.0.1") as rec:
        rec.routes["/internal"] = (200, {"content-type": "text/plain"}, SECRET_BODY)
        yield rec


@pytest.fixture(scope="module")
def cdn(internal: Recorder) -> Iterator[Recorder]:
    """The allowed artifact host: redirects to the internal server, to itself, and in a loop."""
    with recorder("127.0.0.2") as rec:
        rec.routes.update(
            {
                "/to-internal": (302, {"location": internal.url("/internal")}, b""),
                "/to-internal-by-name": (307, {"location": f"http://localhost:{internal.port}/internal"}, b""),
                "/to-video": (302, {"location": "/video.mp4"}, b""),
                "/video.mp4": (200, {"content-type": "video/mp4"}, VIDEO_BYTES),
                "/loop": (302, {"location": "/loop"}, b""),
            }
        )
        yield rec


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """Slow enough that our callback is the one that finishes each task."""
    sim = Simulator(tmp_path_factory.mktemp("slow-sim"), seconds_to_finish=60)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def artifact_gw(tmp_path_factory: pytest.TempPathFactory, slow_sim: Simulator) -> Iterator[GatewayProcess]:
    g = GatewayProcess(
        tmp_path_factory.mktemp("artifact-gw"), slow_sim.url, [TenantSpec("ssrf")], artifact_hosts=("127.0.0.2",)
    )
    g.start()
    yield g
    g.stop()


def video_with_artifact(g: GatewayProcess, sim: Simulator, url: str) -> str:
    """A completed video whose artifact is `url`, set the way the upstream would: a callback
    to the task's own signed callback URL."""
    with g.client("ssrf") as c:
        created = c.post("/runway/tasks", json=gen2_body("artifact ssrf"))
    assert created.status_code == 200, created.text
    task = created.json()["task"]
    hook = next(x for x in sim.requests()["creates"] if x["task_id"] == task["id"])["body"]["notify_hook"]
    done = {**task, "status": "SUCCEEDED", "progressRatio": "1", "artifacts": [{"url": url, "previewUrls": [url]}]}
    answer = httpx.post(hook, json={"task": done})
    assert answer.status_code == 200 and answer.json()["result"] == "applied", answer.text
    return task["id"]


def sdk(g: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url + "/v1", api_key=g.tenants["ssrf"].key, max_retries=0)


def assert_refused(g: GatewayProcess, video_id: str, variant: str = "video") -> None:
    """502 upstream_error through the official SDK, naming no host, address or port."""
    with pytest.raises(openai.InternalServerError) as info:
        sdk(g).videos.download_content(video_id, variant=variant)  # type: ignore[arg-type]
    err = info.value
    assert err.status_code == 502 and err.code == "upstream_error", err.body
    assert "not fetch" in err.message and "127.0" not in err.message and "localhost" not in err.message


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_artifact_on_internal_address_is_refused_and_never_fetched(
    artifact_gw: GatewayProcess, slow_sim: Simulator, internal: Recorder
) -> None:
    spellings = [
        internal.url("/internal"),
        f"http://localhost:{internal.port}/internal",
        f"http://2130706433:{internal.port}/internal",
        f"http://[::ffff:127.0.0.1]:{internal.port}/internal",
        "http://169.254.169.254/latest/meta-data/",
    ]
    for url in spellings:
        video_id = video_with_artifact(artifact_gw, slow_sim, url)
        assert_refused(artifact_gw, video_id)
        assert_refused(artifact_gw, video_id, "thumbnail")
    assert internal.seen == []
    warnings = [line for line in artifact_gw.access_log() if line.get("event") == "artifact_refused"]
    assert len(warnings) == 2 * len(spellings) and all(
        w["level"] == "warning" and ("artifact_hosts" in w["reason"] or "metadata" in w["reason"]) for w in warnings
    )
    assert all("/internal" not in w["reason"] for w in warnings)  # the reason, never the URL


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_redirects_are_followed_by_hand_each_hop_checked(
    artifact_gw: GatewayProcess, slow_sim: Simulator, internal: Recorder, cdn: Recorder
) -> None:
    """An allowed host may redirect within the rules; to an internal address (by IP or by
    name) or in a loop it is refused, and the internal server never sees a request."""
    video_id = video_with_artifact(artifact_gw, slow_sim, cdn.url("/to-video"))
    content = sdk(artifact_gw).videos.download_content(video_id)
    assert content.read() == VIDEO_BYTES and content.response.headers["content-type"] == "video/mp4"
    assert cdn.seen[-2:] == [("/to-video", f"127.0.0.2:{cdn.port}"), ("/video.mp4", f"127.0.0.2:{cdn.port}")]
    for path in ("/to-internal", "/to-internal-by-name", "/loop"):
        assert_refused(artifact_gw, video_with_artifact(artifact_gw, slow_sim, cdn.url(path)))
    assert internal.seen == []
    assert [p for p, _ in cdn.seen].count("/loop") == 6  # the first request and 5 redirects, then it gives up


async def test_artifact_connects_to_checked_address_with_the_name_as_host(cdn: Recorder) -> None:
    """`cdn.test` exists only in the injected resolver: the bytes can only come through the
    checked address, and the server still sees the name. A wildcard entry is not enough
    for loopback, and a name that resolves to loopback is refused after DNS."""

    async def dns(host: str, port: int) -> list[str]:
        return {"cdn.test": ["127.0.0.2"], "rebind.cdn.test": ["127.0.0.1"]}[host]

    exact = Upstream(
        UpstreamConfig(api_keys=("k",), artifact_hosts=("cdn.test",)),
        Metrics([], registry=CollectorRegistry()),
        resolver=dns,
    )
    wildcard = Upstream(
        UpstreamConfig(api_keys=("k",), artifact_hosts=("*.cdn.test",)),
        Metrics([], registry=CollectorRegistry()),
        resolver=dns,
    )
    await exact.start()
    await wildcard.start()
    try:
        resp, chunks = await exact.stream(f"http://cdn.test:{cdn.port}/to-video", "req_1")
        assert resp.status == 200 and b"".join([c async for c in chunks]) == VIDEO_BYTES
        assert cdn.seen[-2:] == [("/to-video", f"cdn.test:{cdn.port}"), ("/video.mp4", f"cdn.test:{cdn.port}")]
        for url in (f"http://rebind.cdn.test:{cdn.port}/video.mp4", f"http://cdn.test:{cdn.port}/video.mp4"):
            with pytest.raises(UpstreamFailure) as info:
                await wildcard.stream(url, "req_2")
            assert info.value.status == 502
        assert exact.circuit.state == wildcard.circuit.state == "closed"
        default = Upstream(UpstreamConfig(api_keys=("k",)), Metrics([], registry=CollectorRegistry()), resolver=dns)
        with pytest.raises(UpstreamFailure) as info:  # no artifact_hosts: public addresses only
            await default.stream(f"http://cdn.test:{cdn.port}/video.mp4", "req_3")
        assert info.value.status == 502
    finally:
        await exact.close()
        await wildcard.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_https_artifact_is_verified_against_its_host_name(
    tmp_path: Path, slow_sim: Simulator, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """Connected to the checked address (127.0.0.1), TLS still sends and verifies the URL's
    name: a certificate for `localhost` passes, one for another name fails before any
    request. The gateway trusts the test's self-signed certificates through SSL_CERT_FILE."""
    contexts, certs = [], []
    for name in ("localhost", "other.test"):
        (tmp_path / name).mkdir()
        cert, key = self_signed(tmp_path / name, [name])
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        contexts.append(ctx)
        certs.append(cert.read_bytes())
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(b"".join(certs))  # both trusted: only the name can fail
    g = start_gateway(
        slow_sim.url, [TenantSpec("ssrf")], artifact_hosts=("localhost",), env={"SSL_CERT_FILE": str(bundle)}
    )
    with recorder("127.0.0.1", contexts[0]) as good, recorder("127.0.0.1", contexts[1]) as bad:
        good.routes["/video.mp4"] = (200, {"content-type": "video/mp4"}, VIDEO_BYTES)
        video_id = video_with_artifact(g, slow_sim, f"https://localhost:{good.port}/video.mp4")
        assert sdk(g).videos.download_content(video_id).read() == VIDEO_BYTES
        assert good.seen == [("/video.mp4", f"localhost:{good.port}")]
        video_id = video_with_artifact(g, slow_sim, f"https://localhost:{bad.port}/video.mp4")
        with pytest.raises(openai.InternalServerError) as info:
            sdk(g).videos.download_content(video_id)
        assert info.value.status_code == 503 and bad.seen == []
        # the same server by its address: not the allowed name, refused before connecting
        assert_refused(g, video_with_artifact(g, slow_sim, f"https://127.0.0.1:{good.port}/video.mp4"))
        assert len(good.seen) == 1


@pytest.mark.parametrize(
    "entry,refused",
    [
        ("0.0.0.0/0", True),
        ("::/0", True),
        ("0.0.0.0/7", True),
        ("::/6", True),
        ("::ffff:0:0/0", True),
        ("10.0.0.0/8", False),
        ("fc00::/7", False),
        ("127.0.0.0/8", False),
        ("hooks.example.com", False),
    ],
)
def test_catch_all_entries_are_refused(entry: str, refused: bool) -> None:
    problem = entry_problem(entry)
    assert (problem is not None and "catch-all" in problem) if refused else problem is None
