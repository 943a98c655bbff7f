"""The SSRF rules of contract §5, as a table: on submit (no DNS) and at delivery (after DNS)."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.ssrf import HookPolicy, HookRefused, check_hook_url, classify, normalise_host, resolve_hook, system_resolver

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
    ("http://１２７．０．０．１/", []),  # full-width digits, IDNA-mapped
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
    hook = await resolve_hook("https://a.svc.internal:8443/p?q=1#frag", policy, fake_resolver({"a.svc.internal": ["10.0.0.8"]}))
    assert hook.url == "https://10.0.0.8:8443/p?q=1"
    assert hook.host_header == "a.svc.internal:8443"
    assert hook.sni_hostname == "a.svc.internal"
    literal = await resolve_hook("https://[2606:2800:220:1:248:1893:25c8:1946]/", OPEN)
    assert literal.url == "https://[2606:2800:220:1:248:1893:25c8:1946]:443/"
    assert literal.host_header == "[2606:2800:220:1:248:1893:25c8:1946]"
    assert literal.sni_hostname is None


@pytest.mark.parametrize(
    "raw,canonical",
    [("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
     ("0x7f000001", "127.0.0.1"), ("0", "0.0.0.0"), ("::FFFF:127.0.0.1", "::ffff:7f00:1"), ("Example.COM.", "example.com")],
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
