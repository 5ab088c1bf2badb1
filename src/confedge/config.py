"""Typed configuration: the TOML file of SPEC §8, validated into one model.

Why one model: every component receives its own section from here and nothing reads files or
environment variables behind its back (DESIGN "Configuration is data"). Every validation error
names the dotted key, the bad value and what was expected, because an operator editing a file on
a DMZ host at 2 a.m. needs the fix, not a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
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
    "load_config",
    "parse_config",
    "to_toml",
]


class ConfigError(Exception):
    """A configuration problem, with one human-readable line per fault."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    # Unknown keys are errors: a typo ("relay_port") must not pass silently (SPEC §8).
    # strict: TOML has types, so `enabled = "no"` (which lax parsing reads as False, and "yes"
    # as True) or `port = "443"` is a mistake to point at, not to guess at. No inf/nan: a
    # timeout of `inf` would reach the event loop's timers.
    model_config = ConfigDict(
        extra="forbid", validate_default=True, frozen=True, strict=True, allow_inf_nan=False
    )


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{_fmt_value(value)} is not a port number (an integer within 0-65535, no quotes)"
        )
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port number within 0-65535")
    return value


Port = Annotated[int, BeforeValidator(_port)]


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


IPAddr = Annotated[str, BeforeValidator(_ip)]


def _bandwidth(value: Any) -> int | None:
    """turn.bandwidth_*: bytes/s (0 = unlimited), from an integer or "10M" / "2.5Mbit"."""
    if value is None:
        return None
    from confedge.turn.bandwidth import parse_rate

    return parse_rate(value)


Bandwidth = Annotated[int | None, BeforeValidator(_bandwidth)]


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


HostPort = Annotated[str | None, BeforeValidator(_host_port)]

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


CIDR = Annotated[str, BeforeValidator(_cidr)]


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


PathPrefix = Annotated[str, BeforeValidator(_path_prefix)]


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


_DNS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*")


class NodeAddress(BaseModel):
    """One conferencing node: scheme, host and port (https and 443 unless given)."""

    model_config = ConfigDict(frozen=True)
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
        return cls(scheme=scheme, host=host, port=port)  # type: ignore[arg-type]


def _node(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_fmt_value(value)} is not a node address (write it in quotes)")
    NodeAddress.parse(value)
    return value


NodeStr = Annotated[str, BeforeValidator(_node)]


class ServerConfig(_Strict):
    hostname: str = "edge"
    domain: str = "localdomain"
    internal_address: IPAddr = "127.0.0.1"
    external_address: IPAddr | None = None
    state_dir: str = "/var/lib/confedge"

    @field_validator("hostname", "domain")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(
            r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*", v
        ):
            raise ValueError(f'"{v}" is not a DNS name (letters, digits, "-" and ".")')
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


class StaticMount(_Strict):
    prefix: str
    path: str
    cache_control: str = "public, max-age=300"

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or not v.endswith("/") or ".." in v or "//" in v:
            raise ValueError(f'"{v}" is not a path prefix (it must start and end with "/")')
        return _path_prefix(v)


class ProxyPool(_Strict):
    """One `[[proxy.pools]]` entry: requests whose canonical path starts with `prefix` go to
    these nodes instead of proxy.nodes (SPEC §2, e.g. the Outlook scheduling add-in). Unset
    balancing and health settings are those of [proxy]."""

    prefix: str
    nodes: list[NodeStr]
    balance: Literal["round-robin", "ip-hash", "least-conn"] | None = None
    health_interval: float | None = Field(default=None, gt=0)
    health_timeout: float | None = Field(default=None, gt=0)
    health_rise: int | None = Field(default=None, ge=1)
    health_fall: int | None = Field(default=None, ge=1)

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
        return v


class ProxyConfig(_Strict):
    enabled: bool = True
    https_port: Port = 443
    http_port: Port = 80
    nodes: list[NodeStr] = Field(default_factory=list)  # each checked: one line per bad node
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
    workers: int = Field(default=0, ge=0, le=64)
    verify_upstream: bool = False
    path_allowlist: list[PathPrefix] = Field(default_factory=list)
    max_body_bytes: int = Field(default=15 * 1024 * 1024, ge=0)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_headers: int = Field(default=100, ge=8)
    header_timeout: float = Field(default=10.0, gt=0)
    idle_timeout: float = Field(default=75.0, gt=0)
    max_connections: int = Field(default=10000, ge=1)
    connect_timeout: float = Field(default=3.0, gt=0)
    api_connect_timeout: float = Field(default=20.0, gt=0)
    sse_max_lifetime: float = Field(default=86400.0, gt=0)
    read_timeout: float = Field(default=120.0, gt=0)  # node silent while a response is due
    body_timeout: float = Field(default=30.0, gt=0)  # client silent while sending a body
    # Bodies up to this size are received whole before a node is chosen, within body_timeout
    # in total (slow-body attacks never reach a node, and failover can resend them, POST
    # included); larger ones stream once this much arrived. The default is the body limit, as
    # the issue asks; lower it on memory-tight hosts with many concurrent uploads.
    request_buffer_bytes: int = Field(default=15 * 1024 * 1024, ge=0)
    allowed_hosts: list[str] = Field(default_factory=list)  # extra Host names besides the FQDN
    upstream_keepalive: int = Field(default=32, ge=0)  # idle connections kept per node/worker
    upstream_idle_timeout: float = Field(default=60.0, gt=0)
    websocket_idle_timeout: float = Field(default=3600.0, gt=0)
    health_interval: float = Field(default=5.0, gt=0)
    health_timeout: float = Field(default=3.0, gt=0)
    health_rise: int = Field(default=2, ge=1)
    health_fall: int = Field(default=2, ge=1)
    trusted_proxies: list[CIDR] = Field(default_factory=list)
    access_log: str = ""  # "" = standard error log stream; else a file path
    static: list[StaticMount] = Field(default_factory=list)
    pools: list[ProxyPool] = Field(default_factory=list)  # node pools per path prefix

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
    drain_grace: float = Field(default=30.0, ge=0, le=3600)
    drain_timeout: float = Field(default=3600.0, gt=0, le=7 * 86400)
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

    http2: bool = True  # ALPN "h2" to clients (docs/PROXY.md "HTTP/2"); nodes stay HTTP/1.1
    http2_max_streams: int = Field(default=100, ge=1, le=1000)  # SETTINGS_MAX_CONCURRENT_STREAMS

    @property
    def node_addresses(self) -> list[NodeAddress]:
        return [NodeAddress.parse(n) for n in self.nodes]


class TurnConfig(_Strict):
    enabled: bool = True
    mode: Literal["restricted", "permissive"] = "restricted"
    port: Port = 3478
    tls_port: Port = 5349  # TURN over TLS (turns:); 0 = off
    relay_ports: str = "49152-65535"
    username: str = ""
    password: str = Field(default="", repr=False)
    secrets: list[str] = Field(default_factory=list, repr=False)
    media_nodes: list[CIDR] = Field(default_factory=list)
    allowed_peers: list[CIDR] = Field(default_factory=list)
    denied_peers: list[CIDR] = Field(default_factory=list)
    nonce_lifetime: int = Field(default=600, ge=10, le=86400)
    max_allocations: int = Field(default=10000, ge=1)
    user_quota: int = Field(
        default=0, ge=0
    )  # 0 = mode default (total in restricted, 10 permissive)
    max_permissions: int = Field(default=64, ge=1)
    max_channels: int = Field(default=64, ge=1)
    unauth_budget: int = Field(default=50, ge=1)  # 401 answers per source per 10 s
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
    dataplane_threads: int = Field(default=0, ge=0, le=256)
    # Native relay threads: after a wake-up that moved only a few media packets while media
    # arrives faster than one packet per this many microseconds, pause this long so the next
    # ones are moved in one batch (interrupt coalescing; docs/TURN.md); 0 = never pause.
    dataplane_coalesce_us: int = Field(default=100, ge=0, le=1000)
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


class GuardConfig(_Strict):
    enabled: bool = False
    maxretry: int = Field(default=10, ge=1)
    findtime: float = Field(default=300, gt=0)
    bantime: float = Field(default=300, gt=0)
    ignore: list[CIDR] = Field(default_factory=lambda: ["127.0.0.1/32"])
    store: str = "sqlite"
    ban_status: Literal[429, 403] = 429
    escalation: float = Field(default=2.0, ge=1.0)
    max_bantime: float = Field(default=86400.0, gt=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    conference_maxretry: int = Field(default=50, ge=1)
    prefix_maxretry: int = Field(default=30, ge=1)
    turn_maxretry: int = Field(default=20, ge=1)
    # Added by the guard (docs/GUARD.md): how often each worker refreshes its ban table from the
    # shared store (bans reach every worker within about two intervals), how long a past ban
    # still counts for escalation, and whether a repeated identical wrong PIN counts once.
    refresh_interval: float = Field(default=0.25, ge=0.05, le=1.0)
    ban_memory: float = Field(default=86400.0, ge=0)
    distinct_pins: bool = False
    # Added by the host integration (docs/DEPLOY.md): bans also go into the kernel's
    # confedge_banned_v4/_v6 nft sets (loaded by `confedge firewall --apply`), so a banned
    # address is dropped before it costs a TCP or TLS handshake.
    firewall: bool = False
    # Added for PIN guesses in flight (docs/GUARD.md "Guesses in flight"): request_token calls
    # forwarded and not yet answered, per client address and per conference, across workers.
    inflight_per_address: int = Field(default=4, ge=1)
    inflight_per_conference: int = Field(default=32, ge=1)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v not in ("sqlite", "memory") and not v.startswith(("redis://", "rediss://")):
            raise ValueError(
                f'"{v}" is not a guard store (expected "sqlite", "memory" or "redis://host:port/db")'
            )
        return v


class TLSCertificate(_Strict):
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


class TLSConfig(_Strict):
    cert: str = ""
    key: str = ""
    certificates: list[TLSCertificate] = Field(default_factory=list)


class ManagementConfig(_Strict):
    # Added by the management listener (docs/MANAGEMENT.md): `enabled` switches it off (port 0
    # binds an ephemeral port, as turn.port and proxy.https_port do, for tests); host names
    # other than the server's own that browsers may use to reach it (DNS-rebinding defence).
    enabled: bool = True
    port: Port = 9090
    networks: list[CIDR] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    allowed_hosts: list[str] = Field(default_factory=list)


class FirewallConfig(_Strict):
    # Added by the host integration (docs/DEPLOY.md): what `confedge firewall` opens besides
    # confedge's own ports. SSH stays open by default because a generated ruleset that locks
    # the operator out of the host is worse than none; narrow it with ssh_networks.
    ssh_port: Port = 22  # 0 = not opened
    ssh_networks: list[CIDR] = Field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    rate_limit: int = Field(default=50, ge=0, le=100_000)  # per source and second; 0 = off
    # "restricted": new outbound flows only for relayed media (from relay_ports), to the nodes,
    # the guard's Redis, DNS and NTP (the reference's "outbound from relay ports"); opt-in
    # because it also stops package updates and anything else the host itself initiates.
    outbound: Literal["any", "restricted"] = "any"


class ClusterConfig(_Strict):
    # Added for several instances (docs/SCALING.md): the Redis that edges behind one name share
    # besides the guard's bans -- the TURN nonce key, a registry of each instance's live
    # allocations and state, and a fingerprint of its REST secret. "" = this edge is alone.
    store: str = ""
    # This instance's name in the registry; "" = the host name (two instances on one host
    # need distinct names).
    instance: str = ""
    # How often this instance publishes its record, and how long a record outlives its last
    # publication (a dead instance's allocations vanish from the others' pages after this).
    interval: float = Field(default=1.0, ge=0.2, le=60)
    ttl: float = Field(default=5.0, ge=1, le=600)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://")):
            raise ValueError(
                f'"{v}" is not a Redis URL; set store = "redis://host:6379/0" (the same URL as '
                'guard.store is fine) or "" for a single instance'
            )
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


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    turn: TurnConfig = Field(default_factory=TurnConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    management: ManagementConfig = Field(default_factory=ManagementConfig)
    firewall: FirewallConfig = Field(default_factory=FirewallConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _requirements(self) -> Config:
        # SPEC §8: everything optional except what an enabled part needs.
        problems: list[str] = []
        if self.proxy.enabled and not self.proxy.nodes:
            problems.append(
                "proxy.nodes: [] is empty, but the proxy is enabled; list the conferencing nodes "
                '(e.g. nodes = ["10.0.0.11"]) or set proxy.enabled = false'
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
        data = self.model_dump(mode="json")
        mask = "****"
        if data["turn"]["password"]:
            data["turn"]["password"] = mask
        data["turn"]["secrets"] = [mask for _ in data["turn"]["secrets"]]
        return data


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


def _format_errors(exc: ValidationError) -> list[str]:
    problems: list[str] = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = _loc(loc)
        msg = str(err.get("msg", ""))
        typ = err.get("type", "")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if typ == "extra_forbidden":
            problems.append(f"{key}: unknown key (check its spelling; see docs/CONFIGURATION.md)")
            continue
        if typ == "value_error" and not key:
            problems.extend(msg.split("\n"))
            continue
        value = err.get("input")
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
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML configuration file."""
    p = Path(path)
    try:
        # utf-8-sig: Windows editors (Notepad) start files with a byte-order mark, which
        # tomllib would report as "Invalid statement (at line 1, column 1)".
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read the configuration file: {exc.strerror}"]) from None
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
