"""Client addresses: canonical forms, IPv6 /64 prefixes, ban-table keys, and X-Forwarded-For.

Why a module of its own: the guard must agree with itself about what "one source" is. The same
IPv6 host can be written many ways ("2001:DB8::1", "2001:db8:0:0::1", "::ffff:192.0.2.1" for an
IPv4 client on a dual-stack socket), and an attacker who rotates through the 2^64 addresses of
one /64 is still one source. Every counter, ban and lookup therefore goes through the functions
here, and the per-request lookup keys are bytes from `inet_pton`, which costs a fraction of a
microsecond where `ipaddress.ip_address` costs several.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

__all__ = [
    "Network",
    "Networks",
    "client_address",
    "in_networks",
    "normalise_ip",
    "normalise_source",
    "parse_networks",
    "prefix64",
    "source_keys",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = tuple[Network, ...]

_MAPPED = b"\x00" * 10 + b"\xff\xff"


def normalise_ip(text: str) -> str:
    """Canonical text of an IP address; IPv4-mapped IPv6 becomes plain IPv4.

    Raises ValueError with a specific message for anything that is not an address.
    """
    raw = text.strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    # A zone ("fe80::1%eth0", what sockets report for link-local peers) names the interface,
    # not the host: dropped, so that ban-table keys (inet_pton, which refuses zones) work.
    raw = raw.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(raw)
    except ValueError:
        raise ValueError(f'"{text}" is not an IP address') from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def prefix64(ip: str) -> str | None:
    """The /64 network of a canonical IPv6 address as "2001:db8:1:2::/64"; None for IPv4."""
    if ":" not in ip:
        return None
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def normalise_source(text: str) -> str:
    """Canonical ban source: an IPv4 or IPv6 address, or an IPv6 /64 network.

    Only these three shapes exist in the ban table, so that check() stays a dictionary lookup;
    wider blocks belong in the firewall (docs/GUARD.md says so).
    """
    raw = text.strip()
    if "/" not in raw:
        return normalise_ip(raw)
    try:
        net = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise ValueError(f'"{text}" is not an IP address or IPv6 /64 network') from None
    if net.prefixlen == net.max_prefixlen:
        return normalise_ip(str(net.network_address))
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen == 64:
        return str(net)
    raise ValueError(
        f'"{text}": a ban names one address or one IPv6 /64; block wider networks in the '
        "firewall (confedge firewall) instead"
    )


def source_keys(source: str) -> str | bytes:
    """The ban-table key of a canonical source: str for IPv4, 16 bytes for an IPv6 address,
    8 bytes for an IPv6 /64 (what `inet_pton(...)[:8]` of any address inside it gives)."""
    if ":" not in source:
        return source
    if source.endswith("/64"):
        return socket.inet_pton(socket.AF_INET6, source[:-3])[:8]
    return socket.inet_pton(socket.AF_INET6, source)


def parse_networks(cidrs: Iterable[str | Network]) -> Networks:
    """Parse CIDR strings once, at start-up, into network objects."""
    out: list[Network] = []
    for item in cidrs:
        if isinstance(item, str):
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        else:
            out.append(item)
    return tuple(out)


def in_networks(ip: str, networks: Networks) -> bool:
    """True if the (canonical or not) address lies in one of the networks."""
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(normalise_ip(ip))
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in networks)


def _xff_hop(item: str) -> str | None:
    """One X-Forwarded-For element as a canonical address, or None if it is not one.

    Accepts the bare forms and the "ip:port" / "[ipv6]:port" forms some proxies emit.
    """
    s = item.strip()
    if not s:
        return None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            return None
        s = s[1:end]
    elif s.count(":") == 1:
        s = s.split(":", 1)[0]
    try:
        return normalise_ip(s)
    except ValueError:
        return None


def client_address(
    peer_ip: str, headers_xff: str | None, trusted: Iterable[str | Network] | Networks
) -> str:
    """The address the guard should count and ban for one request.

    The TCP peer is the client unless the peer is one of the configured trusted proxies
    (proxy.trusted_proxies). Only then is X-Forwarded-For consulted, right to left: each hop was
    appended by the machine to its right, so we walk left while the appender is trusted and stop
    at the first address a trusted proxy vouched for that is not itself a trusted proxy. A
    malformed element stops the walk at the last trustworthy hop, because anything left of it
    was written by the client and may be forged (RFC 7239 §7.4 discusses the same trust model for
    the Forwarded header). `trusted` may be CIDR strings or, cheaper per request, the tuple that
    `parse_networks` returns.
    """
    nets = trusted if isinstance(trusted, tuple) else parse_networks(trusted)
    try:
        peer = normalise_ip(peer_ip)
    except ValueError:
        return peer_ip
    if not nets or not headers_xff or not in_networks(peer, nets):
        return peer
    current = peer
    for item in reversed(headers_xff.split(",")):
        hop = _xff_hop(item)
        if hop is None:
            return current
        current = hop
        if not in_networks(hop, nets):
            return hop
    return current
