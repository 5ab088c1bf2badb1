"""Who may use the relay, and where it may relay to (SPEC §3).

Two questions are answered here, both by plain table lookups so the sans-I/O core can ask them on
every CreatePermission, ChannelBind and Send without measurable cost:

* **Client policy** (restricted mode): only source addresses inside ``turn.media_nodes`` may do
  anything but Binding.
* **Peer policy**: may an allocation relay to this peer address?  A TURN relay that forwards to
  loopback, link-local (cloud metadata at 169.254.169.254) or its own management addresses turns
  into an SSRF gateway into the DMZ.  coturn learnt this twice: CVE-2020-26262 (0.0.0.0 and ``::``
  reached loopback) and CVE-2026-27624 (IPv4-mapped and NAT64 IPv6 forms of 127.0.0.1 bypassed the
  loopback filter).  So every address is first *normalised*: IPv4-mapped (``::ffff:a.b.c.d``),
  IPv4-compatible (``::a.b.c.d``) and NAT64 (RFC 6052 ``64:ff9b::/96``; RFC 8215 local-use
  ``64:ff9b:1::/48``) forms are turned into the IPv4 address they embed, and the rules are applied
  to that.

Rule order, first match wins:

1. unspecified (0.0.0.0/8, ``::``): refused always, even when listed in allowed_peers;
2. ``denied_peers``: refused (denied wins over allowed);
3. ``allowed_peers``: allowed (this is how tests and the demo admit 127.0.0.1);
4. built-in refusals: loopback, link-local, multicast, broadcast/reserved, the server's own
   addresses; in permissive mode also private ranges (RFC 1918, RFC 6598 CGN, ULA, ...);
5. otherwise allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["ClientPolicy", "PeerPolicy", "PeerVerdict", "embedded_ipv4", "normalise"]

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPAT = ipaddress.ip_network("::/96")
_NAT64_WKP = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 §2.1 well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use prefix

_ALWAYS: tuple[tuple[str, IPNetwork], ...] = (
    ("unspecified", ipaddress.ip_network("0.0.0.0/8")),
    ("unspecified", ipaddress.ip_network("::/128")),
)

_BUILTIN: tuple[tuple[str, IPNetwork], ...] = (
    ("loopback", ipaddress.ip_network("127.0.0.0/8")),
    ("loopback", ipaddress.ip_network("::1/128")),
    ("link-local", ipaddress.ip_network("169.254.0.0/16")),
    ("link-local", ipaddress.ip_network("fe80::/10")),
    ("multicast", ipaddress.ip_network("224.0.0.0/4")),
    ("multicast", ipaddress.ip_network("ff00::/8")),
    ("broadcast", ipaddress.ip_network("255.255.255.255/32")),
    ("reserved", ipaddress.ip_network("240.0.0.0/4")),
    # NAT64 prefixes whose embedded address could not be decoded unambiguously stay refused.
    ("nat64", _NAT64_LOCAL),
    # RFC 4291 §2.5.5.1: the deprecated IPv4-compatible block (its members normalise to IPv4
    # before we get here; what is left is never a real peer).
    ("ipv4-compatible", _COMPAT),
)

# Permissive mode: browsers pick their own peers, so the private networks behind the DMZ are off
# limits unless the operator lists them (SPEC §3).
_PRIVATE: tuple[tuple[str, IPNetwork], ...] = (
    ("private", ipaddress.ip_network("10.0.0.0/8")),
    ("private", ipaddress.ip_network("172.16.0.0/12")),
    ("private", ipaddress.ip_network("192.168.0.0/16")),
    ("private", ipaddress.ip_network("100.64.0.0/10")),  # RFC 6598 carrier-grade NAT
    ("private", ipaddress.ip_network("192.0.0.0/24")),  # RFC 6890 IETF protocol assignments
    ("private", ipaddress.ip_network("198.18.0.0/15")),  # RFC 2544 benchmarking
    ("private", ipaddress.ip_network("fc00::/7")),  # RFC 4193 unique local
    ("private", ipaddress.ip_network("fec0::/10")),  # deprecated site-local
)


def normalise(addr: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for, or the address itself.

    ``::`` and ``::1`` are kept as IPv6 (they are the unspecified and loopback addresses, not the
    IPv4-compatible forms of 0.0.0.0 and 0.0.0.1).  For the local-use NAT64 prefix the embedded
    position depends on the site's prefix length, so it is handled by :func:`embedded_ipv4`.
    """
    if isinstance(addr, ipaddress.IPv4Address):
        return addr
    if addr in _MAPPED or addr in _NAT64_WKP:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _COMPAT and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address a local-use NAT64 address (RFC 8215) may embed.

    RFC 6052 §2.2 places the IPv4 bits after a /48, /56, /64 or /96 prefix (skipping the "u"
    octet, bits 64-71).  We do not know which prefix length the site uses, so the caller checks all
    candidates and allows the address only if every one of them would be allowed.
    """
    b = addr.packed
    cands = [
        b[6:8] + b[9:11],  # /48
        b[7:8] + b[9:12],  # /56
        b[9:13],  # /64
        b[12:16],  # /96
    ]
    return [ipaddress.IPv4Address(c) for c in cands]


def _norm_net(net: IPNetwork) -> IPNetwork:
    """Operators may write allowed/denied ranges in mapped form; judge them like addresses."""
    if (
        isinstance(net, ipaddress.IPv6Network)
        and net.prefixlen >= 96
        and net.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96"))
    ):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.ip_network(f"{v4}/{net.prefixlen - 96}")
    return net


@dataclass(frozen=True, slots=True)
class PeerVerdict:
    """Outcome of a peer check; ``rule`` names what decided it, for the 403 log line.

    ``relay_ports_only``: the address is one of the server's own relay addresses; it may be a
    peer only on a relay port (another allocation: two clients that both need a relay), never
    on the TURN listener, HTTPS, management or any other local service (see
    :meth:`PeerPolicy.port_allowed`).
    """

    allowed: bool
    rule: str
    address: str  # the normalised address the rule was applied to
    relay_ports_only: bool = False


class PeerPolicy:
    """Peer filter of SPEC §3.  ``check(ip)`` is memoised per address string (bounded)."""

    _CACHE_MAX = 65536

    def __init__(
        self,
        *,
        permissive: bool,
        allowed: Iterable[str] = (),
        denied: Iterable[str] = (),
        server_addresses: Iterable[str] = (),
        relay_addresses: Iterable[str] = (),
        relay_ports: tuple[int, int] = (0, -1),
    ) -> None:
        self.permissive = permissive
        self.relay_ports = relay_ports
        self._allowed = [_norm_net(ipaddress.ip_network(n, strict=False)) for n in allowed]
        self._denied = [_norm_net(ipaddress.ip_network(n, strict=False)) for n in denied]
        builtin = list(_BUILTIN)
        relays = {normalise(ipaddress.ip_address(a)) for a in relay_addresses}
        for ip in sorted(relays, key=lambda a: (a.version, int(a))):
            # Listed first: on a single-NIC host the relay address is also the listener's, and
            # relay-to-relay must stay possible (on relay ports only).
            if not ip.is_unspecified:
                builtin.append(("relay-address", ipaddress.ip_network(ip)))
        for a in server_addresses:
            ip = normalise(ipaddress.ip_address(a))
            # An unspecified listener address ("0.0.0.0") already is refused by rule 1.
            if not ip.is_unspecified and ip not in relays:
                builtin.append(("server-address", ipaddress.ip_network(ip)))
        if permissive:
            builtin.extend(_PRIVATE)
        self._builtin = builtin
        self._cache: dict[str, PeerVerdict] = {}

    def check(self, ip: str) -> PeerVerdict:
        """Judge a peer IP (string as decoded from XOR-PEER-ADDRESS)."""
        v = self._cache.get(ip)
        if v is not None:
            return v
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return PeerVerdict(False, "malformed", ip)
        v = self._judge(addr)
        if len(self._cache) >= self._CACHE_MAX:
            self._cache.clear()
        self._cache[ip] = v
        return v

    def _judge(self, raw: IPAddress) -> PeerVerdict:
        if isinstance(raw, ipaddress.IPv6Address) and raw in _NAT64_LOCAL:
            # All candidates must pass; the first refusal names the rule.
            for cand in embedded_ipv4(raw):
                v = self._judge_one(cand)
                if not v.allowed:
                    return PeerVerdict(False, f"nat64-local/{v.rule}", v.address)
            # Each embedded form is fine, but the literal prefix is still refused unless listed.
            return self._judge_one(raw)
        return self._judge_one(normalise(raw))

    def _judge_one(self, addr: IPAddress) -> PeerVerdict:
        s = str(addr)
        for rule, net in _ALWAYS:
            if addr.version == net.version and addr in net:
                return PeerVerdict(False, rule, s)
        for net in self._denied:
            if addr.version == net.version and addr in net:
                return PeerVerdict(False, f"denied_peers {net}", s)
        for net in self._allowed:
            if addr.version == net.version and addr in net:
                return PeerVerdict(True, f"allowed_peers {net}", s)
        for rule, net in self._builtin:
            if addr.version == net.version and addr in net:
                if rule == "relay-address":
                    return PeerVerdict(True, rule, s, relay_ports_only=True)
                return PeerVerdict(False, rule, s)
        return PeerVerdict(True, "default", s)

    def port_allowed(self, verdict: PeerVerdict, port: int) -> bool:
        """For an allowed verdict: may this peer port be used? (Relay addresses: relay ports.)"""
        if not verdict.relay_ports_only:
            return True
        lo, hi = self.relay_ports
        return lo <= port <= hi


class ClientPolicy:
    """Restricted-mode client safelist (SPEC §3): ``turn.media_nodes``.

    Binding is open to everyone (the box is also a STUN server); every other request from an
    address outside the list gets 403 before any authentication work.  Permissive mode admits all.
    """

    def __init__(self, *, restricted: bool, media_nodes: Iterable[str]) -> None:
        self.restricted = restricted
        self._nets = [_norm_net(ipaddress.ip_network(n, strict=False)) for n in media_nodes]
        self._cache: dict[str, bool] = {}

    def may_allocate(self, ip: str) -> bool:
        if not self.restricted:
            return True
        ok = self._cache.get(ip)
        if ok is None:
            try:
                addr = normalise(ipaddress.ip_address(ip.split("%", 1)[0]))
            except ValueError:
                return False
            ok = any(addr.version == n.version and addr in n for n in self._nets)
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[ip] = ok
        return ok
