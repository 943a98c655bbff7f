"""Where the gateway may connect to a URL someone else chose: the SSRF rules.

The gateway POSTs to URLs its tenants choose (`notify_hook`) and streams URLs the upstream
chooses (a task's `artifacts`, for `GET /v1/videos/{id}/content`), from inside the
operator's network, so neither may reach the gateway's own loopback services, the cloud
metadata endpoint or the internal network. The rules run on submit (`check_hook_url`: no
DNS, cheap, a 400 at once) and again before every connection (`resolve_hook`) for every
address the name resolves to; the caller then connects to the checked address, so DNS
rebinding between check and connect cannot sneak through. The allow-list is a tenant's
`hook_hosts` for hooks and `[upstream] artifact_hosts` for artifacts (`HookPolicy.setting`
names which, in messages); its entries work the same in both.

| rule           | a hook is allowed when                                                      |
|----------------|-----------------------------------------------------------------------------|
| URL            | scheme http/https; a host; no `user:pass@`; <= 2048 chars; port 1-65535;    |
|                | no whitespace, control characters or `\\` (URL parsers disagree on them)    |
| hook_hosts set | the host matches an entry: exact name, `*.suffix` (subdomains only), or     |
|                | for an IP literal an address or CIDR entry                                  |
| public address | always                                                                      |
| private        | the host matched an entry (a `*.suffix` wildcard is enough):                |
|                | 10/8, 172.16/12, 192.168/16, 100.64/10 (CGNAT), fc00::/7                    |
| special        | an entry names that exact host or address, or is a CIDR lying inside the    |
|                | special range holding the address (a wildcard or a wider CIDR is not        |
|                | enough): loopback, link-local, unspecified (0.0.0.0, ::), 0/8, multicast,   |
|                | reserved, documentation/benchmark ranges, site-local; `localhost`,          |
|                | `*.localhost`                                                               |
| metadata       | never, whatever the entries say: 169.254.169.254, fd00:ec2::254             |

Every spelling that a resolver or URL library turns into an address is normalised first:
legacy IPv4 (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`, via `inet_aton`), IDNA-mapped
full-width digits, a trailing dot; IPv6 forms embedding IPv4 (`::ffff:127.0.0.1`, NAT64,
6to4, IPv4-compatible) are judged by the embedded address.

A catch-all prefix (IPv4 shorter than /8, IPv6 shorter than /7, such as `0.0.0.0/0` or
`::/0`) is refused as an entry (`entry_problem`, for the config file and the admin API
alike): it would name half the internet, not a network the operator means.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> address strings

MAX_URL_LENGTH = 2048
SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = MappingProxyType({"http": 80, "https": 443})
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
PRIVATE_NETS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
# Explicit, so the answer does not depend on the Python version's idea of "is_global".
SPECIAL_NETS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "100::/64", "2001::/23",
    "2001:db8::/32", "fe80::/10", "fec0::/10", "ff00::/8",
))  # fmt: skip
NAT64 = ipaddress.ip_network("64:ff9b::/96")
V4_COMPAT = ipaddress.ip_network("::/96")
HOST_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
NUMERIC_LABEL_RE = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
MIN_PREFIX = {4: 8, 6: 7}  # a CIDR entry shorter than this is a catch-all, refused


class HookRefused(Exception):
    """A hook URL (or what its host resolves to) is not allowed; `reason` never holds the URL."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class ResolveFailed(HookRefused):
    """The host did not resolve: nothing is known to be wrong with the URL, the name service
    (or the name) is, so a caller may answer "unavailable" rather than "not allowed"."""


class Match(enum.IntEnum):
    NONE = 0
    WILDCARD = 1  # by a `*.suffix` entry: enough for private addresses only
    EXACT = 2  # the exact name, address or CIDR: enough for loopback and link-local too


class AddressClass(enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    SPECIAL = "special"
    METADATA = "metadata"


def normalise_host(raw: str) -> tuple[str, IPAddress | None]:
    """(canonical ASCII host, its address if it is an IP literal in any spelling).
    Raises ValueError for a host that no resolver should be asked about."""
    host = raw.strip().lower()
    if not host or "%" in host:
        raise ValueError("host is empty or contains '%' (percent-encoding or an IPv6 zone id)")
    if ":" in host:  # only bracketed IPv6 literals get here from urlsplit
        try:
            ip6 = ipaddress.IPv6Address(host)
            return str(ip6), ip6
        except ValueError:
            raise ValueError("host is not a valid IPv6 address") from None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")  # nameprep maps full-width digits and dots
        except UnicodeError:
            raise ValueError("host is not a valid internationalised name") from None
    host = host[:-1] if host.endswith(".") else host
    if not HOST_RE.match(host):
        raise ValueError("host contains characters a host name cannot have")
    if NUMERIC_LABEL_RE.match(host.rsplit(".", 1)[-1]):  # "ends in a number": an IPv4 literal
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise ValueError("host is not a valid IPv4 address") from None
        return str(ip), ip
    return host, None


def embedded_v4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, compatible), else `ip`."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or (ip in V4_COMPAT and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def classify(ip: IPAddress) -> AddressClass:
    """The class of the address traffic would actually reach (embedded IPv4 unwrapped)."""
    eff = embedded_v4(ip)
    if ip in METADATA or eff in METADATA:
        return AddressClass.METADATA
    if any(eff in net for net in PRIVATE_NETS if net.version == eff.version):
        return AddressClass.PRIVATE
    if any(eff in net for net in SPECIAL_NETS if net.version == eff.version) or not eff.is_global:
        return AddressClass.SPECIAL
    return AddressClass.PUBLIC


@dataclass(frozen=True)
class HookPolicy:
    """An allow-list (a tenant's `hook_hosts`, or `artifact_hosts`), pre-sorted into sets so
    a check is a few lookups. Build once: `HookPolicy.from_hosts(tenant.policy.hook_hosts)`."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".svc.internal" for "*.svc.internal"
    addresses: frozenset[IPAddress] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    setting: str = "hook_hosts"  # the config key the entries came from, for messages

    @classmethod
    def from_hosts(cls, entries: Iterable[str], setting: str = "hook_hosts") -> HookPolicy:
        names, suffixes, addresses, networks = set(), [], set(), []
        for entry in entries:
            entry = entry.strip().lower()
            if entry.startswith("*."):
                suffixes.append("." + normalise_host(entry[2:])[0])
            elif "/" in entry:
                networks.append(ipaddress.ip_network(entry, strict=False))
            else:
                host, ip = normalise_host(entry.strip("[]"))
                if ip is None:
                    names.add(host)
                else:
                    addresses.update({ip, embedded_v4(ip)})
        return cls(frozenset(names), tuple(suffixes), frozenset(addresses), tuple(networks), setting)

    @property
    def restricted(self) -> bool:
        return bool(self.names or self.suffixes or self.addresses or self.networks)

    def lists_address(self, ip: IPAddress) -> bool:
        cands = {ip, embedded_v4(ip)}
        return bool(cands & self.addresses) or any(
            c in net for c in cands for net in self.networks if net.version == c.version
        )

    def lists_special(self, ip: IPAddress) -> bool:
        """True if an entry names `ip` itself, or is a network lying inside the special range
        (loopback, link-local, ...) that holds it: a wider network, however it contains the
        address, is no permission for the gateway's own loopback or its link-local net."""
        cands = {ip, embedded_v4(ip)}
        if cands & self.addresses:
            return True
        for c in cands:
            ranges = [r for r in SPECIAL_NETS if r.version == c.version and c in r]
            for net in self.networks:
                if net.version == c.version and c in net and any(net.subnet_of(r) for r in ranges):  # type: ignore[arg-type]
                    return True
        return False

    def match_host(self, host: str, ip: IPAddress | None) -> Match:
        if ip is not None:
            return Match.EXACT if self.lists_address(ip) else Match.NONE
        if host in self.names:
            return Match.EXACT
        return Match.WILDCARD if any(host.endswith(s) for s in self.suffixes) else Match.NONE


def address_problem(ip: IPAddress, match: Match, policy: HookPolicy) -> str | None:
    """Why the hook may not connect to `ip`, given how its host's name matched the policy
    (Match.NONE for an IP literal: its address is judged by the entries alone)."""
    cls = classify(ip)
    shown = f"{ip} ({embedded_v4(ip)})" if embedded_v4(ip) != ip else str(ip)
    if cls is AddressClass.METADATA:
        return f"{shown} is the cloud metadata address (never allowed)"
    if cls is AddressClass.PUBLIC:
        return None
    if cls is AddressClass.PRIVATE and match < Match.WILDCARD and not policy.lists_address(ip):
        return f"{shown} is a private address and the host is not in {policy.setting}"
    if cls is AddressClass.SPECIAL and match < Match.EXACT and not policy.lists_special(ip):
        return (
            f"{shown} is a loopback, link-local or reserved address; only a {policy.setting} entry naming it "
            "(or a CIDR inside its range) allows it"
        )
    return None


def entry_problem(entry: str) -> str | None:
    """Why `entry` cannot be a hook_hosts or artifact_hosts entry, or None: it must parse as
    the rules read it, and a CIDR must not be a catch-all (shorter than /8 for IPv4, /7
    for IPv6)."""
    try:
        policy = HookPolicy.from_hosts([entry])
    except ValueError as e:
        return f"must be a host name, *.suffix, IP address or CIDR ({e})"
    for net in policy.networks:
        if net.prefixlen < MIN_PREFIX[net.version]:
            return (
                f"{net} is a catch-all (IPv4 prefixes shorter than /8 and IPv6 shorter than /7 are refused): "
                "list the networks meant"
            )
    return None


@dataclass(frozen=True)
class HookTarget:
    """A hook URL that passed the static rules, split into what delivery needs."""

    scheme: str
    host: str  # canonical ASCII name, or the canonical IP for an IP literal
    ip: IPAddress | None  # set for IP literals
    port: int
    target: str  # path and query
    match: Match


def inspect_hook_url(url: str, policy: HookPolicy) -> HookTarget | str:
    """The static rules: a HookTarget, or the problem (a message that never echoes the URL)."""
    if not isinstance(url, str) or not url:
        return "must be a non-empty string"
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    if BAD_URL_CHARS.search(url):
        return "must not contain whitespace, control characters or backslashes"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL (host or port)"
    if parts.scheme not in SCHEMES:
        return "must be an http or https URL"
    if "@" in parts.netloc:
        return "must not contain user:password@"
    if not parts.hostname:
        return "must name a host"
    if port == 0:
        return "must not use port 0"
    try:
        host, ip = normalise_host(parts.hostname)
    except ValueError as e:
        return str(e)
    match = policy.match_host(host, ip)
    if policy.restricted and match is Match.NONE:
        return f"host {host} is not within {policy.setting}"
    if ip is not None:
        problem = address_problem(ip, Match.NONE, policy)
    elif host == "localhost" or host.endswith(".localhost"):
        problem = (
            None if match is Match.EXACT else f"localhost is loopback; only an exact {policy.setting} entry allows it"
        )
    else:
        problem = None
    if problem:
        return problem
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return HookTarget(parts.scheme, host, ip, port or DEFAULT_PORTS[parts.scheme], target, match)


def check_hook_url(url: str, policy: HookPolicy) -> str | None:
    """On submit (no DNS): the problem with a tenant's notify_hook, or None."""
    result = inspect_hook_url(url, policy)
    return result if isinstance(result, str) else None


@dataclass(frozen=True)
class ResolvedHook:
    """A hook checked after DNS: connect to `url` (the checked address), send `host_header`,
    and verify TLS against `sni_hostname`."""

    scheme: str
    host: str
    port: int
    target: str
    address: IPAddress
    literal: bool  # the tenant wrote an IP address, not a name

    @property
    def url(self) -> str:
        ip = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{ip}:{self.port}{self.target}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def sni_hostname(self) -> str | None:
        """The name TLS checks the certificate against; None for an IP literal (checked as IP)."""
        return self.host if self.scheme == "https" and not self.literal else None


async def system_resolver(host: str, port: int) -> list[str]:
    """The OS resolver, off the event loop (asyncio runs getaddrinfo in a thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolve_hook(url: str, policy: HookPolicy, resolver: Resolver | None = None) -> ResolvedHook:
    """At delivery: the static rules again (policy may have changed), then every resolved
    address must pass; the first one is what to connect to. Raises HookRefused."""
    t = inspect_hook_url(url, policy)
    if isinstance(t, str):
        raise HookRefused(t)
    if t.ip is not None:
        addresses: list[IPAddress] = [t.ip]
    else:
        try:
            raw = await (resolver or system_resolver)(t.host, t.port)
            addresses = list(dict.fromkeys(ipaddress.ip_address(a.split("%", 1)[0]) for a in raw))
        except (OSError, UnicodeError, ValueError) as e:
            raise ResolveFailed(f"cannot resolve {t.host}: {e.__class__.__name__}") from None
        if not addresses:
            raise ResolveFailed(f"{t.host} resolves to no address")
        for ip in addresses:
            problem = address_problem(ip, t.match, policy)
            if problem:
                raise HookRefused(f"{t.host} resolves to {problem}")
    return ResolvedHook(t.scheme, t.host, t.port, t.target, addresses[0], literal=t.ip is not None)
