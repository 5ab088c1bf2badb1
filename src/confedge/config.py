"""Typed configuration: the TOML file of SPEC §8, validated into one model.

Why one model: every component receives its own section from here and nothing reads files or
environment variables behind its back (DESIGN "Configuration is data"). Every validation error
names the dotted key, the bad value and what was expected, because an operator editing a file on
a DMZ host at 2 a.m. needs the fix, not a traceback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import operator
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field
from msgspec import to_builtins as _to_builtins
from msgspec.structs import fields as struct_fields

__all__ = [
    "DEFAULT_CONFIG",
    "Config",
    "ConfigError",
    "FirewallConfig",
    "GuardConfig",
    "ManagementConfig",
    "NodeAddress",
    "ProxyConfig",
    "ServerConfig",
    "StaticMount",
    "TLSConfig",
    "TurnConfig",
    "config_warnings",
    "default_config_path",
    "field_types",
    "load_config",
    "parse_config",
    "parse_section",
    "to_builtins",
    "to_toml",
]


# The file every command reads when --config is not given: the one `confedge setup` writes and
# `confedge install-service` runs the unit with, so that after setup `confedge check`,
# `reload`, `drain`, `bans list` need no option (as `nginx -t` reads /etc/nginx/nginx.conf).
DEFAULT_CONFIG = "/etc/confedge/confedge.toml"


def default_config_path() -> str:
    """CONFEDGE_CONFIG when set (a second instance's file, a test's), else DEFAULT_CONFIG."""
    return os.environ.get("CONFEDGE_CONFIG") or DEFAULT_CONFIG


class ConfigError(Exception):
    """A configuration problem, with one human-readable line per fault."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Frozen msgspec structs (not pydantic models): every process imports the configuration, and
    # pydantic's import and schema building cost about 12 MiB of each one's resident set.
    # Validation is parse_config's (_check below), with the rules pydantic's strict mode had:
    # unknown keys are errors: a typo ("relay_port") must not pass silently (SPEC §8).
    # strict: TOML has types, so `enabled = "no"` (which lax parsing reads as False, and "yes"
    # as True) or `port = "443"` is a mistake to point at, not to guess at. No inf/nan: a
    # timeout of `inf` would reach the event loop's timers. Constructing a struct directly
    # (`TurnConfig(port=0)`, tests, defaults) validates nothing: data from outside goes through
    # parse_config or parse_section.
    pass


class _Before:
    """`Annotated[T, _Before(f)]`: f checks (and may normalise) the raw value before its type is
    checked; a ValueError it raises is the key's error."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn


class _FieldValidator:
    """What `@field_validator` makes: a check on some fields of its class, run on the typed
    value ("after") or on the raw one ("before"). Shaped like pydantic's decorator, which this
    module used before, so the checks read the same."""

    def __init__(self, names: tuple[str, ...], mode: str, fn: Any) -> None:
        self.names, self.mode, self.fn = names, mode, fn


class _ModelValidator:
    """What `@model_validator(mode="after")` makes: a check on the whole section, run once
    every key of it is valid; a ValueError's text is the problem."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn


def field_validator(*names: str, mode: str = "after") -> Callable[[Any], Any]:
    assert mode in ("before", "after")

    def deco(fn: Any) -> Any:
        return _FieldValidator(names, mode, fn)

    return deco


def model_validator(*, mode: str) -> Callable[[Any], Any]:
    assert mode == "after"

    def deco(fn: Callable[[Any], Any]) -> Any:
        return _ModelValidator(fn)

    return deco


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{_fmt_value(value)} is not a port number (an integer within 0-65535, no quotes)"
        )
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port number within 0-65535")
    return value


Port = Annotated[int, _Before(_port)]


def _ip(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f'{_fmt_value(value)} is not an IP address (write it in quotes: "10.0.0.5")'
        )
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            f'"{value}" is not an IP address (e.g. "10.0.0.5" or "2001:db8::5")'
        ) from None


IPAddr = Annotated[str, _Before(_ip)]


def _bandwidth(value: Any) -> int | None:
    """turn.bandwidth_*: bytes/s (0 = unlimited), from an integer or "10M" / "2.5Mbit"."""
    if value is None:
        return None
    from confedge.turn.bandwidth import parse_rate

    return parse_rate(value)


Bandwidth = Annotated[int | None, _Before(_bandwidth)]


def _host_port(value: Any) -> str | None:
    """turn.alternate_server: "ip:port" or "[v6]:port" (ALTERNATE-SERVER carries an address,
    not a name: RFC 8489 §14.15); the port defaults to 3478."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f'{_fmt_value(value)} is not an address ("203.0.113.6:3478")')
    from confedge.turn.drain import parse_alternate

    host, port = parse_alternate(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


HostPort = Annotated[str | None, _Before(_host_port)]

# The bounds most keys share (msgspec constraints, checked by parse_config like any Meta):
# a duration in seconds that must be positive, a count of at least one, and an amount (bytes,
# connections, a quota) where 0 has a meaning of its own.
Seconds = Annotated[float, Meta(gt=0)]
Count = Annotated[int, Meta(ge=1)]
Amount = Annotated[int, Meta(ge=0)]

# turn.relay_multiplex: shared relay sockets per relay address, at most (docs/TURN.md).
RELAY_MULTIPLEX_MAX = 64

# turn.bandwidth_* defaults in permissive mode (bytes/s): browsers, each its own username; 5 and
# 10 Mbit/s carry a good video call. Restricted mode: the nodes carry many calls over one
# credential, so no cap unless configured.
_PERMISSIVE_BANDWIDTH = {"allocation": 625_000, "user": 1_250_000, "total": 0}


def _cidr(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_fmt_value(value)} is not an address or CIDR network")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(
            f'"{value}" is not an address or CIDR network (e.g. "10.0.0.11" or "10.0.0.0/24")'
        ) from None


CIDR = Annotated[str, _Before(_cidr)]


def _path_prefix(value: Any) -> str:
    """A path prefix in the canonical form requests are matched in (proxy/paths.py), so that a
    prefix never silently fails to match (or matches more) because of its spelling."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f'{_fmt_value(value)} is not a path prefix (it must start with "/")')
    # Imported here: the TURN server alone (python -m confedge.turn) then never loads the
    # proxy's (compiled) modules.
    from confedge.proxy.paths import BadPath, canonical_path

    try:
        canonical = canonical_path(value)
    except BadPath as exc:
        raise ValueError(f'"{value}" is not a usable path prefix: {exc.reason}') from None
    if canonical != value:
        raise ValueError(f'"{value}" is not in canonical form; write it as "{canonical}"')
    return value


PathPrefix = Annotated[str, _Before(_path_prefix)]


def parse_port_range(text: str) -> tuple[int, int]:
    """Parse "49152-65535" into (49152, 65535); raise ValueError with the config wording."""
    bad = ValueError(f'"{text}" is not a port range within 1-65535 (e.g. "49152-65535")')
    parts = text.split("-")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise bad
    lo, hi = int(parts[0]), int(parts[1])
    if not (1 <= lo <= hi <= 65535):
        raise bad
    return lo, hi


_DNS_NAME = re.compile(r"[A-Za-z0-9.-]+")
# A host name label (RFC 1123 §2.1, RFC 952): letters, digits and hyphens, neither first nor
# last, 1-63 characters. No underscore: server.hostname and server.domain name this host in
# its certificate, the Host headers it accepts and the TURN realm.
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _dns_name_problem(v: str) -> str | None:
    """Why `v` is not a host name (dot-separated labels, at most 253 characters), or None."""
    if not _DNS_NAME.fullmatch(v):
        return f'"{v}" is not a DNS name (letters, digits, "-" and ".")'
    if len(v) > 253:
        return f'"{v[:20]}..." is not a DNS name: {len(v)} characters, at most 253'
    for label in v.split("."):
        if not label:
            return f'"{v}" is not a DNS name: an empty label (a leading, trailing or double ".")'
        if len(label) > 63:
            return f'"{v}" is not a DNS name: a label of {len(label)} characters, at most 63'
        if not _HOST_LABEL.fullmatch(label):
            end = "starts" if label.startswith("-") else "ends"
            return (
                f'"{v}" is not a DNS name: the label "{label}" {end} with "-" (a label is 1-63 '
                'letters, digits and "-", not first or last, e.g. "edge-1")'
            )
    return None


class NodeAddress(Struct, frozen=True, kw_only=True):
    """One conferencing node: scheme, host and port (https and 443 unless given)."""

    scheme: Literal["http", "https"]
    host: str
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @classmethod
    def parse(cls, text: str) -> NodeAddress:
        bad = ValueError(
            f'"{text}" is not a node address (expected host, host:port or '
            'http(s)://host:port, e.g. "10.0.0.11" or "http://10.0.0.13:8080")'
        )
        scheme = "https"
        rest = text.strip()
        if "://" in rest:
            scheme, rest = rest.split("://", 1)
            if scheme not in ("http", "https"):
                raise bad
        rest = rest.rstrip("/")
        if not rest or "/" in rest or "@" in rest:
            raise bad
        port = 443 if scheme == "https" else 80
        if rest.startswith("["):
            host, sep, tail = rest[1:].partition("]")
            if not sep:
                raise bad
            if tail:
                if not tail.startswith(":") or not tail[1:].isdigit():
                    raise bad
                port = int(tail[1:])
        elif rest.count(":") == 1:
            host, p = rest.split(":")
            if not p.isdigit():
                raise bad
            port = int(p)
        else:
            host = rest
        if not host or not 1 <= port <= 65535:
            raise bad
        if not _host_ok(host):
            raise ValueError(
                f'"{text}" is not a node address: "{host}" is neither an IP address nor a host '
                'name (letters, digits, hyphens and dots, e.g. "node1.example.com")'
            )
        return cls(scheme=scheme, host=host, port=port)  # type: ignore[arg-type]


# A DNS label (RFC 1123 §2.1: letters, digits, hyphens, not at either end; underscores too, as
# internal zones often have them). A node's host goes into the Host header and the upstream
# connection as it is, so a space or a "!" would only fail later, per request.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_ok(host: str) -> bool:
    """An IP address or a host name (a trailing dot allowed); digits and dots alone that are
    not an IPv4 address (10.0.0.300) are a typo, not a name."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or re.fullmatch(r"[0-9.]+", name):
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _node(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_fmt_value(value)} is not a node address (write it in quotes)")
    NodeAddress.parse(value)
    return value


NodeStr = Annotated[str, _Before(_node)]


def _distinct_nodes(nodes: list[str]) -> list[str]:
    """Each node once: "10.0.0.11", "10.0.0.11:443" and "https://10.0.0.11" are one node, and
    listing it twice would double its share of new clients, check its health twice and let
    failover "retry on another node" on the same one."""
    seen: dict[tuple[str, str, int], int] = {}
    for i, text in enumerate(nodes):
        node = NodeAddress.parse(text)
        host = node.host.lower().rstrip(".")
        with contextlib.suppress(ValueError):
            host = str(ipaddress.ip_address(host))
        key = (node.scheme, host, node.port)
        if key in seen:
            j = seen[key]
            raise ValueError(
                f'"{text}" (item {i}) is the same node as "{nodes[j]}" (item {j}); list each '
                "node once"
            )
        seen[key] = i
    return nodes


class ServerConfig(_Strict, frozen=True):
    hostname: str = "edge"
    domain: str = "localdomain"
    internal_address: IPAddr = "127.0.0.1"
    external_address: IPAddr | None = None
    state_dir: str = "/var/lib/confedge"

    @field_validator("hostname", "domain")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        problem = _dns_name_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('"" is empty; set a directory (e.g. "/var/lib/confedge")')
        return v

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.domain}"

    @property
    def relay_address(self) -> str:
        """External address, or the internal one on a single-NIC host."""
        return self.external_address or self.internal_address


class StaticMount(_Strict, frozen=True):
    prefix: str
    path: str
    cache_control: str = "public, max-age=300"

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or not v.endswith("/") or ".." in v or "//" in v:
            raise ValueError(f'"{v}" is not a path prefix (it must start and end with "/")')
        return _path_prefix(v)


class ProxyPool(_Strict, frozen=True):
    """One `[[proxy.pools]]` entry: requests whose canonical path starts with `prefix` go to
    these nodes instead of proxy.nodes (SPEC §2, e.g. the Outlook scheduling add-in). Unset
    balancing and health settings are those of [proxy]."""

    prefix: str
    nodes: list[NodeStr]
    balance: Literal["round-robin", "ip-hash", "least-conn"] | None = None
    health_interval: Seconds | None = None
    health_timeout: Seconds | None = None
    health_rise: Count | None = None
    health_fall: Count | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or not v.endswith("/"):
            raise ValueError(
                f'"{v}" is not a pool prefix (it must start and end with "/", e.g. "/scheduling/")'
            )
        if v == "/":
            raise ValueError(
                '"/" would take every request; list those nodes in proxy.nodes instead, and give '
                'a pool a narrower prefix (e.g. "/scheduling/")'
            )
        return _path_prefix(v)

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(
                '[] is empty; list the nodes of this pool (e.g. nodes = ["10.0.0.21"]) or remove '
                "the pool"
            )
        return _distinct_nodes(v)


class ProxyConfig(_Strict, frozen=True):
    enabled: bool = True
    https_port: Port = 443
    http_port: Port = 80
    nodes: list[NodeStr] = field(default_factory=list)  # each checked: one line per bad node
    balance: Literal["round-robin", "ip-hash", "least-conn"] = "round-robin"
    csp: bool = True
    csp_policy: str = (
        "upgrade-insecure-requests; default-src 'self'; "
        "frame-ancestors 'self' https://*.office.com https://*.office365.com "
        "https://*.microsoft.com https://*.outlook.com; "
        "script-src 'self' 'unsafe-inline' 'unsafe-eval' https://appsforoffice.microsoft.com "
        "https://ajax.aspnetcdn.com; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self' wss: https:; "
        "object-src 'none'"
    )
    workers: Annotated[int, Meta(ge=0, le=64)] = 0
    verify_upstream: bool = False
    path_allowlist: list[PathPrefix] = field(default_factory=list)
    max_body_bytes: Amount = 15 * 1024 * 1024
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024
    max_headers: Annotated[int, Meta(ge=8)] = 100
    header_timeout: Seconds = 10.0
    idle_timeout: Seconds = 75.0
    max_connections: Count = 10000
    connect_timeout: Seconds = 3.0
    api_connect_timeout: Seconds = 20.0
    sse_max_lifetime: Seconds = 86400.0
    read_timeout: Seconds = 120.0  # node silent while a response is due
    body_timeout: Seconds = 30.0  # client silent while sending a body
    # Bodies up to this size are received whole before a node is chosen, within body_timeout
    # in total (slow-body attacks never reach a node, and failover can resend them, POST
    # included); larger ones stream once this much arrived. The default is the body limit, as
    # the issue asks; lower it on memory-tight hosts with many concurrent uploads.
    request_buffer_bytes: Amount = 15 * 1024 * 1024
    allowed_hosts: list[str] = field(default_factory=list)  # extra Host names besides the FQDN
    # Idle connections kept per node and worker. An HTTP/2 client has up to http2_max_streams
    # requests in flight, each on a node connection of its own: with a small pool the ones
    # beyond it are closed after each burst and opened again for the next (at 32, h2load's
    # 640 streams made 7% of requests connect anew and cost 20% more CPU per request,
    # docs/BENCHMARKS.md). The reference's nginx keeps up to 1024 per worker.
    upstream_keepalive: Amount = 256
    upstream_idle_timeout: Seconds = 60.0
    websocket_idle_timeout: Seconds = 3600.0
    health_interval: Seconds = 5.0
    health_timeout: Seconds = 3.0
    health_rise: Count = 2
    health_fall: Count = 2
    trusted_proxies: list[CIDR] = field(default_factory=list)
    access_log: str = ""  # "" = standard error log stream; else a file path
    static: list[StaticMount] = field(default_factory=list)
    pools: list[ProxyPool] = field(default_factory=list)  # node pools per path prefix

    @field_validator("nodes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return _distinct_nodes(v)

    @field_validator("pools")
    @classmethod
    def _unique_prefixes(cls, v: list[ProxyPool]) -> list[ProxyPool]:
        seen: dict[str, int] = {}
        for i, pool in enumerate(v):
            if pool.prefix in seen:
                raise ValueError(
                    f'prefix "{pool.prefix}" of pools[{i}] is also the prefix of '
                    f"pools[{seen[pool.prefix]}]; give each pool its own prefix (merge their "
                    "nodes into one pool)"
                )
            seen[pool.prefix] = i
        return v

    # Drain (`confedge drain`, SIGUSR1; docs/OPERATIONS.md): how long the health endpoint says
    # "draining" before the listeners close, and the deadline for what is left in flight.
    drain_grace: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    drain_timeout: Annotated[float, Meta(gt=0, le=7 * 86400)] = 3600.0
    health_path: str = "/health"  # GET answers 200 "serving" / 503 "draining"; "" = off

    @field_validator("health_path")
    @classmethod
    def _health_path(cls, v: str) -> str:
        if v and (not v.startswith("/") or any(c in v for c in "?# ")):
            raise ValueError(
                f'"{v}" is not an absolute path: use one such as "/health" (no query, no '
                'spaces), or "" for none'
            )
        return v

    # ACME HTTP-01 (RFC 8555 §8.3; docs/CERTIFICATES.md "Let's Encrypt"): the HTTP port
    # answers GET /.well-known/acme-challenge/<token> from this directory's
    # .well-known/acme-challenge/, where `certbot --webroot -w <dir>` writes it; "" = off (every
    # request on the HTTP port is redirected). Off by default: it serves files on port 80.
    acme_webroot: str = ""

    @field_validator("acme_webroot")
    @classmethod
    def _acme_webroot(cls, v: str) -> str:
        if v and (not v.startswith("/") or "\0" in v or any(c in v for c in "\n\r")):
            raise ValueError(
                f'"{v}" is not an absolute directory path: use the directory given to certbot '
                'as --webroot-path (e.g. "/var/lib/confedge/acme"), or "" for none'
            )
        return os.path.normpath(v) if v else v

    http2: bool = True  # ALPN "h2" to clients (docs/PROXY.md "HTTP/2"); nodes stay HTTP/1.1
    http2_max_streams: Annotated[int, Meta(ge=1, le=1000)] = 100  # SETTINGS_MAX_CONCURRENT_STREAMS
    # HTTP/2 framing (proxy/h2engine.py): "native" is libnghttp2 (built when libnghttp2-dev is
    # there at install), "python" is hyper-h2, "auto" the first that is there.
    http2_engine: Literal["auto", "native", "python"] = "auto"
    # HTTP/1.1 heads (proxy/h1engine.py): "native" reads ordinary ones in C first (built with
    # the package when a C compiler is there) and hands the rest to httptools; "python" gives
    # every head to httptools; "auto" the first that is there.
    http1_engine: Literal["auto", "native", "python"] = "auto"

    @property
    def node_addresses(self) -> list[NodeAddress]:
        return [NodeAddress.parse(n) for n in self.nodes]


class TurnConfig(_Strict, frozen=True):
    enabled: bool = True
    mode: Literal["restricted", "permissive"] = "restricted"
    port: Port = 3478
    tls_port: Port = 5349  # TURN over TLS (turns:); 0 = off
    relay_ports: str = "49152-65535"
    username: str = ""
    password: str = ""  # never in repr() (TurnConfig.__repr__), nor are the secrets
    secrets: list[str] = field(default_factory=list)
    media_nodes: list[CIDR] = field(default_factory=list)
    allowed_peers: list[CIDR] = field(default_factory=list)
    denied_peers: list[CIDR] = field(default_factory=list)
    nonce_lifetime: Annotated[int, Meta(ge=10, le=86400)] = 600
    max_allocations: Count = 10000
    user_quota: Amount = 0  # 0 = mode default (total in restricted, 10 permissive)
    max_permissions: Count = 64
    max_channels: Count = 64
    unauth_budget: Count = 50  # 401 answers per source per 10 s
    software: str = ""  # SOFTWARE attribute; "" = none (smaller reflection)
    reason_phrases: bool = False
    # RFC 6156 IPv6 relay address; None = server.external_address when that is IPv6, else no
    # IPv6 relaying.
    relay_address_v6: IPAddr | None = None
    # TURN over TLS on the HTTPS port (RFC 7443 ALPN stun.turn); served by the proxy's HTTPS
    # listener
    tls_on_https: bool = False
    # The relay's data plane (docs/TURN.md): "native" = the C relay threads
    # (confedge.turn._native), "python" = uvloop callbacks, "auto" = native when built.
    dataplane: Literal["auto", "native", "python"] = "auto"
    # Relay threads of the native data plane; 0 = one per core.
    dataplane_threads: Annotated[int, Meta(ge=0, le=256)] = 0
    # Native relay threads: after a wake-up that moved only a few media packets while media
    # arrives faster than one packet per this many microseconds, pause this long so the next
    # ones are moved in one batch (interrupt coalescing; docs/TURN.md); 0 = never pause.
    dataplane_coalesce_us: Annotated[int, Meta(ge=0, le=1000)] = 100
    # Native relay threads: while all of them together move fewer media packets a second than
    # this, one thread serves every thread's sockets and the others sleep; above twice this
    # they split again (docs/TURN.md "Folding"); 0 = never fold.
    dataplane_fold_pps: Annotated[int, Meta(ge=0, le=100_000_000)] = 150_000
    # Relay through this many shared UDP sockets per relay address instead of one port per
    # allocation (coturn's --multiplex-peer; docs/TURN.md "Shared relay sockets"); 0 = off.
    relay_multiplex: int = 0
    # Kernel offload of bound UDP ChannelData (eBPF at TC ingress, docs/TURN.md): "off" (the
    # default: attaching to the host's interface is explicit), "ebpf" (fail start when it
    # cannot load), "auto" (use it when the kernel and privileges allow, log why not otherwise).
    offload: Literal["auto", "ebpf", "off"] = "off"
    # Bandwidth caps (docs/TURN.md "Bandwidth caps"): bytes/s, or "10M" / "2.5Mbit"; 0 or
    # "unlimited" = no cap; left out = the mode's default (effective_bandwidth_*).
    bandwidth_per_allocation: Bandwidth = None
    bandwidth_per_user: Bandwidth = None
    bandwidth_total: Bandwidth = None
    # When bandwidth_total is reached: "refuse" new allocations (508), or "degrade" every
    # allocation evenly (each gets an equal share of the total).
    bandwidth_policy: Literal["refuse", "degrade"] = "refuse"
    # Drain (docs/TURN.md "Draining"): new Allocates get 300 Try Alternate naming this server
    # ("ip:port"); unset = they get 508.
    alternate_server: HostPort = None

    @field_validator("relay_ports")
    @classmethod
    def _relay_ports(cls, v: str) -> str:
        parse_port_range(v)
        return v

    @field_validator("relay_multiplex", mode="before")
    @classmethod
    def _relay_multiplex(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(
                f"{v!r} is not a number of shared relay sockets; use 0 (off, one port per "
                "allocation) or 1-64 (e.g. relay_multiplex = 4)"
            )
        if not 0 <= v <= RELAY_MULTIPLEX_MAX:
            raise ValueError(
                f"{v} is out of range; use 0 (off) or 1-{RELAY_MULTIPLEX_MAX} shared sockets "
                "per relay address (more sockets make peer-address conflicts rarer, a few "
                "suffice: docs/TURN.md)"
            )
        return v

    @field_validator("password")
    @classmethod
    def _password(cls, v: str) -> str:
        # RFC 8489 §9.2.2: the key is MD5 over SASLprep(password); a password SASLprep refuses
        # (control characters, ...) can never authenticate, so say so here, not at start.
        from confedge.stun.saslprep import saslprep

        try:
            saslprep(v)
        except ValueError as exc:
            raise ValueError(f"not usable for TURN ({exc}); use printable text") from None
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s:
                raise ValueError(
                    '"" is an empty shared secret (anyone could mint credentials); remove it'
                )
        return v

    @field_validator("relay_address_v6")
    @classmethod
    def _relay_v6(cls, v: str | None) -> str | None:
        if v is not None and ":" not in v:
            raise ValueError(f'"{v}" is not an IPv6 address (e.g. "2001:db8::5")')
        return v

    @property
    def relay_port_range(self) -> tuple[int, int]:
        return parse_port_range(self.relay_ports)

    @property
    def effective_user_quota(self) -> int:
        """SPEC §3: restricted mode shares one credential, so its quota defaults to the total."""
        if self.user_quota:
            return self.user_quota
        return self.max_allocations if self.mode == "restricted" else 10

    def _bandwidth(self, which: str, value: int | None) -> int:
        if value is not None:
            return value
        return 0 if self.mode == "restricted" else _PERMISSIVE_BANDWIDTH[which]

    @property
    def effective_bandwidth_per_allocation(self) -> int:
        """bytes/s, 0 = unlimited; default: unlimited (restricted), 5 Mbit/s (permissive)."""
        return self._bandwidth("allocation", self.bandwidth_per_allocation)

    @property
    def effective_bandwidth_per_user(self) -> int:
        """bytes/s, 0 = unlimited; default: unlimited (restricted), 10 Mbit/s (permissive)."""
        return self._bandwidth("user", self.bandwidth_per_user)

    @property
    def effective_bandwidth_total(self) -> int:
        """bytes/s, 0 = unlimited (the default in both modes)."""
        return self._bandwidth("total", self.bandwidth_total)

    def __repr__(self) -> str:
        # The password and the shared secrets never reach a log line through repr().
        shown = (f"{k}={getattr(self, k)!r}" for k in self.__struct_fields__ if k not in _SECRET)
        return f"TurnConfig({', '.join(shown)})"


_SECRET = ("password", "secrets")


def _redis_host(url: str) -> None:
    """A redis:// URL must name its host: the client reads "redis://" or "redis:///0" as
    localhost:6379, right only by accident (and the firewall's outbound rule and the status page
    would then name a server nobody wrote). A password in the URL is never echoed."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, at, hostport = netloc.rpartition("@")
    if hostport.startswith("["):
        host = hostport[1:].partition("]")[0]
    else:
        host = hostport.partition(":")[0]
    if host:
        return
    if at:
        user = userinfo.partition(":")[0]
        rest = f"{user}:****@{rest[len(netloc) :]}" if ":" in userinfo else rest
    raise ValueError(
        f'"{scheme}://{rest}" names no Redis host (it would mean localhost:6379 by default); '
        f'write the host, e.g. "{scheme}://127.0.0.1:6379/0" or '
        f'"{scheme}://:password@10.0.0.5:6379/0"'
    )


class GuardConfig(_Strict, frozen=True):
    enabled: bool = False
    maxretry: Count = 10
    findtime: Seconds = 300.0
    bantime: Seconds = 300.0
    ignore: list[CIDR] = field(default_factory=lambda: ["127.0.0.1/32"])
    store: str = "sqlite"
    ban_status: Literal[429, 403] = 429
    escalation: Annotated[float, Meta(ge=1.0)] = 2.0
    max_bantime: Seconds = 86400.0
    jitter: Annotated[float, Meta(ge=0, le=1)] = 0.1
    conference_maxretry: Count = 50
    prefix_maxretry: Count = 30
    turn_maxretry: Count = 20
    # Added by the guard (docs/GUARD.md): how often each worker refreshes its ban table from the
    # shared store (bans reach every worker within about two intervals), how long a past ban
    # still counts for escalation, and whether a repeated identical wrong PIN counts once.
    refresh_interval: Annotated[float, Meta(ge=0.05, le=1.0)] = 0.25
    ban_memory: Annotated[float, Meta(ge=0)] = 86400.0
    distinct_pins: bool = False
    # Added by the host integration (docs/DEPLOY.md): bans also go into the kernel's
    # confedge_banned_v4/_v6 nft sets (loaded by `confedge firewall --apply`), so a banned
    # address is dropped before it costs a TCP or TLS handshake.
    firewall: bool = False
    # Added for PIN guesses in flight (docs/GUARD.md "Guesses in flight"): request_token calls
    # forwarded and not yet answered, per client address and per conference, across workers.
    inflight_per_address: Count = 4
    inflight_per_conference: Count = 32

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v not in ("sqlite", "memory") and not v.startswith(("redis://", "rediss://")):
            raise ValueError(
                f'"{v}" is not a guard store (expected "sqlite", "memory" or "redis://host:port/db")'
            )
        if v.startswith(("redis://", "rediss://")):
            _redis_host(v)
        return v


class TLSCertificate(_Strict, frozen=True):
    # One more certificate, served to clients whose SNI names one of its DNS names (SPEC §5
    # "several certificates chosen by SNI"); [tls] cert/key stays the default for the rest.
    cert: str
    key: str = ""

    @field_validator("cert")
    @classmethod
    def _cert(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('"" is empty; set cert to the PEM file of this certificate')
        return v


class TLSConfig(_Strict, frozen=True):
    cert: str = ""
    key: str = ""
    certificates: list[TLSCertificate] = field(default_factory=list)


class ManagementConfig(_Strict, frozen=True):
    # Added by the management listener (docs/MANAGEMENT.md): `enabled` switches it off (port 0
    # binds an ephemeral port, as turn.port and proxy.https_port do, for tests); host names
    # other than the server's own that browsers may use to reach it (DNS-rebinding defence).
    enabled: bool = True
    port: Port = 9090
    networks: list[CIDR] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    allowed_hosts: list[str] = field(default_factory=list)


class FirewallConfig(_Strict, frozen=True):
    # Added by the host integration (docs/DEPLOY.md): what `confedge firewall` opens besides
    # confedge's own ports. SSH stays open by default because a generated ruleset that locks
    # the operator out of the host is worse than none; narrow it with ssh_networks.
    ssh_port: Port = 22  # 0 = not opened
    ssh_networks: list[CIDR] = field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    rate_limit: Annotated[int, Meta(ge=0, le=100_000)] = 50  # per source and second; 0 = off
    # "restricted": new outbound flows only for relayed media (from relay_ports), to the nodes,
    # the guard's Redis, DNS and NTP (the reference's "outbound from relay ports"); opt-in
    # because it also stops package updates and anything else the host itself initiates.
    outbound: Literal["any", "restricted"] = "any"


class ClusterConfig(_Strict, frozen=True):
    # Added for several instances (docs/SCALING.md): the Redis that edges behind one name share
    # besides the guard's bans -- the TURN nonce key, a registry of each instance's live
    # allocations and state, and a fingerprint of its REST secret. "" = this edge is alone.
    store: str = ""
    # This instance's name in the registry; "" = the host name (two instances on one host
    # need distinct names).
    instance: str = ""
    # How often this instance publishes its record, and how long a record outlives its last
    # publication (a dead instance's allocations vanish from the others' pages after this).
    interval: Annotated[float, Meta(ge=0.2, le=60)] = 1.0
    ttl: Annotated[float, Meta(ge=1, le=600)] = 5.0

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://")):
            raise ValueError(
                f'"{v}" is not a Redis URL; set store = "redis://host:6379/0" (the same URL as '
                'guard.store is fine) or "" for a single instance'
            )
        if v:
            _redis_host(v)
        return v

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", v):
            raise ValueError(
                f'"{v}" is not an instance name; use 1-63 letters, digits, ".", "_" or "-" '
                '(e.g. "edge-a")'
            )
        return v

    @model_validator(mode="after")
    def _ttl(self) -> ClusterConfig:
        if self.ttl < 2 * self.interval:
            raise ValueError(
                f"ttl: {self.ttl} is less than twice interval ({self.interval}), so a live "
                f"instance's record would expire between two publications; set ttl >= "
                f"{2 * self.interval:g}"
            )
        return self


class Config(_Strict, frozen=True):
    server: ServerConfig = field(default_factory=ServerConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    management: ManagementConfig = field(default_factory=ManagementConfig)
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _requirements(self) -> Config:
        # SPEC §8: everything optional except what an enabled part needs.
        problems: list[str] = []
        if len(self.server.fqdn) > 253:
            problems.append(
                f"server.domain: server.hostname and server.domain make a name of "
                f"{len(self.server.fqdn)} characters, at most 253 (RFC 1035 §2.3.4); shorten one"
            )
        if self.proxy.enabled and not self.proxy.nodes:
            problems.append(
                "proxy.nodes: [] is empty, but the proxy is enabled; list the conferencing nodes "
                '(e.g. nodes = ["10.0.0.11"]) or set proxy.enabled = false'
            )
        if self.proxy.acme_webroot and self.proxy.http_port == 0:
            problems.append(
                f'proxy.acme_webroot: "{self.proxy.acme_webroot}" is set, but proxy.http_port = '
                "0 turns the HTTP port off, and ACME HTTP-01 validation comes to it (port 80); "
                'set http_port = 80, or acme_webroot = ""'
            )
        if self.proxy.pools and not self.proxy.enabled:
            problems.append(
                f"proxy.pools: {len(self.proxy.pools)} pool(s) configured, but "
                "proxy.enabled = false, so no request would reach them; set proxy.enabled = true "
                "or remove the [[proxy.pools]] entries"
            )
        if self.turn.enabled and self.turn.mode == "restricted":
            if not self.turn.username:
                problems.append('turn.username: "" is empty; restricted TURN needs a username')
            if not self.turn.password:
                problems.append('turn.password: "" is empty; restricted TURN needs a password')
        lo, hi = self.turn.relay_port_range
        if self.turn.relay_multiplex > hi - lo + 1:
            problems.append(
                f"turn.relay_multiplex: {self.turn.relay_multiplex} shared sockets do not fit in "
                f'turn.relay_ports "{self.turn.relay_ports}" ({hi - lo + 1} ports); widen '
                "relay_ports or lower relay_multiplex"
            )
        if self.turn.enabled and self.turn.mode == "permissive" and not self.turn.secrets:
            problems.append(
                "turn.secrets: [] is empty; permissive TURN needs at least one shared secret"
            )
        if self.turn.enabled and ipaddress.ip_address(self.server.relay_address).is_unspecified:
            key = "external_address" if self.server.external_address else "internal_address"
            problems.append(
                f'server.{key}: "{self.server.relay_address}" cannot be a TURN relay address '
                "(clients are told to send media to it); set server.external_address to the "
                "address clients reach"
            )
        if self.turn.tls_on_https and not (self.proxy.enabled and self.turn.enabled):
            off = [
                f"{k}.enabled"
                for k, on in (("proxy", self.proxy.enabled), ("turn", self.turn.enabled))
                if not on
            ]
            problems.append(
                "turn.tls_on_https: true needs both the proxy (its HTTPS listener takes the "
                "connections) and TURN (it serves them), but "
                + (
                    f"{off[0]} is false; set it to true"
                    if len(off) == 1
                    else f"{' and '.join(off)} are false; set them to true"
                )
                + " or set turn.tls_on_https = false"
            )
        if self.tls.key and not self.tls.cert:
            problems.append(
                f'tls.key: "{self.tls.key}" is set but tls.cert is empty, so a generated '
                "certificate would be used and the key ignored; set tls.cert too"
            )
        problems.extend(self._port_clashes())
        if (
            self.guard.enabled
            and self.guard.store == "memory"
            and self.proxy.enabled
            and self.proxy.workers != 1
        ):
            # Each worker process would keep its own counts: an attacker whose connections the
            # kernel spreads over N workers gets N * maxretry guesses (docs/GUARD.md).
            problems.append(
                f'guard.store: "memory" keeps counts inside one process, but proxy.workers = '
                f"{self.proxy.workers} runs separate worker processes (0 = one per core), which "
                'would each count and ban alone; use store = "sqlite" (the default) or set '
                "proxy.workers = 1"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _port_clashes(self) -> list[str]:
        """TCP ports that two enabled parts would both listen on (on internal_address).

        Each part would start and the second fail with "address in use"; the file is what is
        wrong, so the check points at the two keys. Port 0 (ephemeral) never clashes."""
        used: list[tuple[str, int]] = []
        if self.proxy.enabled:
            used += [("proxy.https_port", self.proxy.https_port)]
            used += [("proxy.http_port", self.proxy.http_port)]
        if self.turn.enabled:
            used += [("turn.port", self.turn.port), ("turn.tls_port", self.turn.tls_port)]
        if self.management.enabled:
            used += [("management.port", self.management.port)]
        seen: dict[int, str] = {}
        problems: list[str] = []
        for key, port in used:
            if not port:
                continue
            if port in seen:
                problems.append(
                    f"{key}: {port} is also {seen[port]}; two listeners cannot share a port"
                )
            else:
                seen[port] = key
        shared = f"turn.tls_port: {self.proxy.https_port} is also proxy.https_port;"
        for i, line in enumerate(problems):
            if line.startswith(shared):  # they can share a port, through the proxy's listener
                problems[i] += (
                    "; to serve TURN over TLS on the HTTPS port set turn.tls_on_https = true "
                    "(and turn.tls_port = 0)"
                )
        return problems

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, with every secret replaced by "****"."""
        data = to_builtins(self)
        mask = "****"
        if data["turn"]["password"]:
            data["turn"]["password"] = mask
        data["turn"]["secrets"] = [mask for _ in data["turn"]["secrets"]]
        return data


def config_warnings(cfg: Config) -> list[str]:
    """Valid settings that are most likely not what the operator meant, one sentence each:
    `confedge check` prints them and `confedge run` logs them as WARNING lines. Not errors,
    because a setup working that way on purpose must keep starting."""
    warnings: list[str] = []
    if cfg.turn.enabled and cfg.turn.mode == "restricted" and not cfg.turn.media_nodes:
        warnings.append(
            "turn.media_nodes is empty in restricted mode: only STUN Binding will be answered; "
            "list the conferencing nodes' addresses to let them allocate"
        )
    return warnings


# Validation: the rules of pydantic's strict mode, which this module used (and whose error kinds
# and texts _format_errors words for operators), applied by walking the structs' annotations.
# Every problem is collected, not only the first, so that `confedge check` lists them all.

_S = typing.TypeVar("_S", bound=Struct)
# (where, kind, text, the value given): kind as pydantic named it ("int_type", "value_error", ...)
_Error = tuple[tuple[int | str, ...], str, str, Any]


class _Invalid:
    """The result of a value that failed (its errors are already recorded)."""


_INVALID = _Invalid()

_TYPE_MESSAGES = {
    bool: ("bool_type", "Input should be a valid boolean"),
    int: ("int_type", "Input should be a valid integer"),
    float: ("float_type", "Input should be a valid number"),
    str: ("string_type", "Input should be a valid string"),
}


class _Plan:
    """One struct's fields, as validation needs them (built once per class, on first use)."""

    def __init__(self, cls: type[Struct]) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        self.fields = [(f.name, hints[f.name], f.required) for f in struct_fields(cls)]
        self.names = {f[0] for f in self.fields}
        self.before: dict[str, list[Callable[[Any], Any]]] = {}
        self.after: dict[str, list[Callable[[Any], Any]]] = {}
        self.model: list[Callable[[Any], Any]] = []
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                if isinstance(attr, _FieldValidator):
                    fn = attr.fn.__get__(None, cls)
                    for name in attr.names:
                        (self.before if attr.mode == "before" else self.after).setdefault(
                            name, []
                        ).append(fn)
                elif isinstance(attr, _ModelValidator):
                    self.model.append(attr.fn)


_PLANS: dict[type[Struct], _Plan] = {}


def _plan(cls: type[Struct]) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _Plan(cls)
    return plan


def _call(
    fns: Iterable[Callable[[Any], Any]],
    value: Any,
    loc: tuple[int | str, ...],
    errors: list[_Error],
    given: Any = _INVALID,
) -> Any:
    """Run checks in turn, each on the previous one's result; a ValueError is the key's error,
    reported with the value as the file gave it (`given`, else the value passed in)."""
    if given is _INVALID:
        given = value
    for fn in fns:
        try:
            value = fn(value)
        except ValueError as exc:
            errors.append((loc, "value_error", str(exc), given))
            return _INVALID
    return value


def _limit(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _constraints(
    meta: Meta, value: Any, loc: tuple[int | str, ...], errors: list[_Error], given: Any
) -> Any:
    for bound, within, kind, words in (
        (meta.gt, operator.gt, "greater_than", "greater than"),
        (meta.ge, operator.ge, "greater_than_equal", "greater than or equal to"),
        (meta.lt, operator.lt, "less_than", "less than"),
        (meta.le, operator.le, "less_than_equal", "less than or equal to"),
    ):
        if bound is not None and not within(value, bound):
            errors.append((loc, kind, f"Input should be {words} {_limit(bound)}", given))
            return _INVALID
    return value


def _literal_words(choices: tuple[Any, ...]) -> str:
    shown = [repr(c) for c in choices]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _check(tp: Any, value: Any, loc: tuple[int | str, ...], errors: list[_Error]) -> Any:
    """The validated (and normalised) value of type tp, or _INVALID with errors recorded."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *extras = typing.get_args(tp)
        given = value
        value = _call(
            [m.fn for m in reversed(extras) if isinstance(m, _Before)], value, loc, errors
        )
        if value is not _INVALID:
            value = _check(inner, value, loc, errors)
        for meta in extras:
            if value is not _INVALID and isinstance(meta, Meta):
                value = _constraints(meta, value, loc, errors, given)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))  # only `T | None` is used
        return _check(inner, value, loc, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:  # a bool is not the literal 1, nor 429.0 the literal 429
            if isinstance(value, type(choice)) and not isinstance(value, bool) and value == choice:
                return choice
        errors.append((loc, "literal_error", f"Input should be {_literal_words(choices)}", value))
        return _INVALID
    if origin is list:
        if not isinstance(value, list):
            errors.append((loc, "list_type", "Input should be a valid list", value))
            return _INVALID
        (item,) = typing.get_args(tp)
        out = [_check(item, v, (*loc, i), errors) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in out) else out
    if isinstance(tp, type) and issubclass(tp, Struct):
        return _check_struct(tp, value, loc, errors)
    if tp is float:
        # Subclasses (tomlkit's Integer, Float, String) become the plain type, as pydantic did.
        if isinstance(value, int) and not isinstance(value, bool):
            return float(int.__int__(value))  # strict, but an integer is a number (`ttl = 5`)
        if isinstance(value, float):
            if not math.isfinite(value):
                errors.append((loc, "finite_number", "Input should be a finite number", value))
                return _INVALID
            return float.__float__(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int.__int__(value)
    elif tp is str:
        if isinstance(value, str):
            return str.__str__(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    else:
        raise TypeError(f"config.py: no validation for the type {tp!r}")
    kind, text = _TYPE_MESSAGES[tp]
    errors.append((loc, kind, text, value))
    return _INVALID


def _check_struct(
    cls: type[Struct], value: Any, loc: tuple[int | str, ...], errors: list[_Error]
) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        text = f"Input should be a valid dictionary or instance of {cls.__name__}"
        errors.append((loc, "model_type", text, value))
        return _INVALID
    plan = _plan(cls)
    before = len(errors)
    given: dict[str, Any] = {}
    for name, tp, required in plan.fields:
        if name not in value:
            if required:
                errors.append(((*loc, name), "missing", "Field required", value))
            continue
        where = (*loc, name)
        v = _call(plan.before.get(name, ()), value[name], where, errors)
        if v is not _INVALID:
            v = _check(tp, v, where, errors)
        if v is not _INVALID:
            v = _call(plan.after.get(name, ()), v, where, errors, value[name])
        given[name] = v
    for key in value:
        if key not in plan.names:
            errors.append(
                ((*loc, key), "extra_forbidden", "Extra inputs are not permitted", value[key])
            )
    if len(errors) > before:
        return _INVALID
    obj = cls(**given)
    try:
        for fn in plan.model:
            fn(obj)
    except ValueError as exc:
        errors.append((loc, "value_error", str(exc), value))
        return _INVALID
    return obj


def to_builtins(cfg: Struct) -> dict[str, Any]:
    """A configuration (or one section) as plain data: dicts, lists, str, int, float, bool and
    None, in the keys' order (what to_toml renders and the status page shows)."""
    data = _to_builtins(cfg)
    assert isinstance(data, dict)
    return data


def field_types(cls: type[Struct]) -> dict[str, Any]:
    """Each key of a section (or of Config: each section) and its type, without the validation
    markers (`list[str]`, `int | None`, `Literal[...]`, a section's class): what the setup
    wizard reads to know how to ask for a key."""
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in cls.__struct_fields__}


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _fmt_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


_TYPE_WORDS = {
    "bool_type": "true or false (without quotes)",
    "int_type": "a whole number (without quotes)",
    "float_type": "a number (without quotes)",
    "finite_number": "a finite number",
    "string_type": 'text in quotes (e.g. "value")',
    "list_type": 'a list in brackets (e.g. ["a", "b"])',
}


def _format_errors(errors: list[_Error]) -> list[str]:
    problems: list[str] = []
    for loc, typ, msg, value in errors:
        key = _loc(loc)
        if typ == "extra_forbidden":
            problems.append(f"{key}: unknown key (check its spelling; see docs/CONFIGURATION.md)")
            continue
        if typ == "value_error" and not key:
            problems.extend(msg.split("\n"))
            continue
        if key == "turn.password" or key.startswith("turn.secrets["):
            problems.append(f"{key}: {msg}")  # never echo a secret, not even a bad one
            continue
        if typ == "list_type" and key == "proxy.static":
            problems.append(
                f"{key}: write each mount as its own [[proxy.static]] table (prefix, path)"
            )
            continue
        if typ == "missing":
            problems.append(f"{key}: missing; this key is required here")
            continue
        if typ in ("model_type", "dict_type", "model_attributes_type"):
            section = key.rsplit("[", 1)[0]
            problems.append(
                f"{key}: {_fmt_value(value)} is not a table; write it as [{section}] with "
                "key = value lines below it"
            )
            continue
        if typ in _TYPE_WORDS:
            problems.append(f"{key}: {_fmt_value(value)} is not {_TYPE_WORDS[typ]}")
            continue
        quoted = typ == "value_error" and msg.startswith(('"', "'"))
        if quoted or msg.startswith(_fmt_value(value)):
            problems.append(f"{key}: {msg}")
        else:
            problems.append(f"{key}: {_fmt_value(value)} is not valid: {msg.lower()}")
    return problems


def parse_config(data: dict[str, Any]) -> Config:
    """Validate already-parsed TOML data; raise ConfigError with one line per problem."""
    return parse_section(Config, data)


def parse_section(cls: type[_S], data: Any) -> _S:
    """Validate data into one section (`GuardConfig`, ...) or the whole Config; raise
    ConfigError with one line per problem, keys named from that section down."""
    errors: list[_Error] = []
    value = _check(cls, data, (), errors)
    if errors:
        raise ConfigError(_format_errors(errors))
    assert isinstance(value, cls)
    return value


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML configuration file."""
    p = Path(path)
    try:
        # utf-8-sig: Windows editors (Notepad) start files with a byte-order mark, which
        # tomllib would report as "Invalid statement (at line 1, column 1)".
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        why = f"{p}: cannot read the configuration file: {exc.strerror}"
        if isinstance(exc, FileNotFoundError) and str(path) == default_config_path():
            # (no --config given, most likely: say where the file comes from)
            why += " (the default file: `confedge setup` writes it; or give --config FILE)"
        raise ConfigError([why]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: the configuration file is not UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None
    return parse_config(data)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def to_toml(data: dict[str, Any]) -> str:
    """Render the effective configuration as TOML (the shape of SPEC §8)."""
    out: list[str] = []
    for section, values in data.items():
        out.append(f"[{section}]")
        tables: list[tuple[str, list[dict[str, Any]]]] = []
        for key, v in values.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                tables.append((key, v))
            elif v is None:
                out.append(f"# {key} is unset (its default applies)")
            else:
                out.append(f"{key} = {_toml_value(v)}")
        out.append("")
        for key, items in tables:
            for item in items:
                out.append(f"[[{section}.{key}]]")
                out.extend(
                    f"{k} = {_toml_value(x)}"
                    if x is not None
                    else f"# {k} is unset ([{section}]'s {k} applies)"
                    for k, x in item.items()
                )
                out.append("")
    return "\n".join(out)
