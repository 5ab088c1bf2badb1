"""Who may use the relay, and where it may relay to (SPEC §3).

Two questions are answered here, both by plain table lookups so the sans-I/O core can ask them on
every CreatePermission, ChannelBind and Send without measurable cost:

* **Client policy** (restricted mode): only source addresses inside ``turn.media_nodes`` may do
  anything but Binding.
* **Peer policy**: may an allocation relay to this peer address?  A TURN relay that forwards to
  loopback, link-local (cloud metadata at 169.254.169.254) or its own addresses turns into an
  SSRF gateway into the DMZ.  coturn learnt this twice: CVE-2020-26262 (0.0.0.0 and ``::``
  reached loopback) and CVE-2026-27624 (IPv4-mapped and NAT64 IPv6 forms of 127.0.0.1 bypassed
  the loopback filter).

Every IPv6 form that embeds an IPv4 address is judged by that IPv4 address (:func:`transition_form`
decodes them):

* representations of the IPv4 address itself -- IPv4-mapped ``::ffff:a.b.c.d`` (RFC 4291
  §2.5.5.2) and the NAT64 well-known prefix ``64:ff9b::/96`` (RFC 6052 §2.1) -- are judged as
  that IPv4 address and nothing else;
* *transition prefixes* -- IPv4-compatible ``::a.b.c.d`` (RFC 4291 §2.5.5.1, deprecated), 6to4
  ``2002::/16`` (RFC 3056 §2), Teredo ``2001::/32`` (RFC 4380 §4: server and client IPv4),
  IPv4-translated (SIIT) ``::ffff:0:a.b.c.d`` (RFC 2765 §2.1; RFC 6145/7915 kept the
  translation) and the local-use NAT64 prefix ``64:ff9b:1::/48`` (RFC 8215) -- have every
  embedded IPv4 address judged by the IPv4 rules, and are then refused outright unless the
  peer itself lies inside an ``allowed_peers`` entry: a packet to such an address is tunnelled
  or translated by whatever relay or gateway the route leads to (possibly this host's own
  ``sit``/Teredo interface), and nobody relays media to a 6to4 relay on purpose;
* ISATAP interface identifiers (``…:0:5efe:a.b.c.d``, RFC 5214 §6.1) can follow any /64, so
  only their embedded IPv4 address is judged.

Rule order, first match wins:

1. unspecified (0.0.0.0/8, ``::``): refused always, even when listed in allowed_peers;
2. ``denied_peers``: refused (denied wins over allowed);
3. ``allowed_peers``: allowed (this is how tests and the demo admit 127.0.0.1);
4. built-in refusals: loopback, link-local, multicast, broadcast/reserved, the server's own
   addresses -- the configured ones and every address of the host's interfaces
   (:meth:`PeerPolicy.set_host_addresses`, refreshed by the service); in permissive mode also
   private ranges (RFC 1918, RFC 6598 CGN, ULA, ...);
5. otherwise allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = [
    "ClientPolicy",
    "PeerPolicy",
    "PeerVerdict",
    "TransitionForm",
    "embedded_ipv4",
    "normalise",
    "transition_form",
]

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPAT = ipaddress.ip_network("::/96")
_NAT64_WKP = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 §2.1 well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use prefix
_6TO4 = ipaddress.ip_network("2002::/16")  # RFC 3056 §2: 2002:V4ADDR::/48
_TEREDO = ipaddress.ip_network("2001::/32")  # RFC 4380 §2.6 (prefix), §4 (address layout)
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 §2.1 IPv4-translated addresses
# RFC 5214 §6.1: ISATAP interface identifier 00-00-5E-FE (or 02-00-5E-FE, "u" bit set for a
# globally unique IPv4 address) followed by the IPv4 address, after any /64 prefix.
_ISATAP_IDS = (b"\x00\x00\x5e\xfe", b"\x02\x00\x5e\xfe")
# Forms that are the IPv4 address itself (a dual-stack socket or a NAT64 sends to exactly it).
_SAME_ADDRESS = frozenset({"ipv4-mapped", "nat64"})

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
    # RFC 7526 deprecated the 6to4 relay anycast prefix: no media peer lives there.
    ("6to4-relay", ipaddress.ip_network("192.88.99.0/24")),
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


@dataclass(frozen=True, slots=True)
class TransitionForm:
    """An IPv6 address that carries IPv4 address(es), as :func:`transition_form` decodes it.

    ``embedded``: every IPv4 address the form may lead to (each is judged by the IPv4 rules);
    ``prefix_refused``: the form is a transition prefix, refused unless the peer lies inside an
    ``allowed_peers`` entry (False for representations of the IPv4 address itself and for
    ISATAP, whose /64 prefix belongs to an ordinary network).
    """

    name: str
    embedded: tuple[ipaddress.IPv4Address, ...]
    prefix_refused: bool


def _v4(b: bytes) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(b)


def transition_form(addr: ipaddress.IPv6Address) -> TransitionForm | None:
    """Decode every IPv6 form that embeds an IPv4 address; None for a plain IPv6 address.

    ``::`` and ``::1`` are not IPv4-compatible addresses (RFC 4291 §2.5.5.1 excludes them).
    """
    b = addr.packed
    if addr in _MAPPED:  # RFC 4291 §2.5.5.2: the IPv4 address itself on a dual-stack socket
        return TransitionForm("ipv4-mapped", (_v4(b[12:]),), False)
    if addr in _NAT64_WKP:  # RFC 6052 §2.1: the well-known prefix embeds at bits 96-127
        return TransitionForm("nat64", (_v4(b[12:]),), False)
    if addr in _COMPAT:  # RFC 4291 §2.5.5.1 (deprecated; Linux sit0 tunnels ::/96)
        return TransitionForm("ipv4-compatible", (_v4(b[12:]),), True) if int(addr) > 1 else None
    if addr in _SIIT:  # RFC 2765 §2.1: ::ffff:0:a.b.c.d
        return TransitionForm("siit", (_v4(b[12:]),), True)
    if addr in _6TO4:  # RFC 3056 §2: 2002:V4ADDR::/48, the IPv4 address in bits 16-47
        # A 6to4 site may run ISATAP inside (RFC 5214 §6.1): judge that address too.
        isatap = (_v4(b[12:]),) if b[8:12] in _ISATAP_IDS else ()
        return TransitionForm("6to4", (_v4(b[2:6]), *isatap), True)
    if addr in _TEREDO:
        # RFC 4380 §4: bits 32-63 the Teredo server's IPv4 address, bits 96-127 the client's
        # ("mapped") IPv4 address with every bit inverted.
        client = bytes(x ^ 0xFF for x in b[12:])
        return TransitionForm("teredo", (_v4(b[4:8]), _v4(client)), True)
    if addr in _NAT64_LOCAL:
        return TransitionForm("nat64-local", tuple(embedded_ipv4(addr)), True)
    if b[8:12] in _ISATAP_IDS:
        return TransitionForm("isatap", (_v4(b[12:]),), False)
    return None


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
        self._builtin = builtin
        # Every address of the host's interfaces (set_host_addresses): refused after the
        # relay-address rule (a relay address is a host address too) and before the private
        # ranges (so the log names the better reason).
        self._host: frozenset[IPAddress] = frozenset()
        self._private = _PRIVATE if permissive else ()
        self._cache: dict[str, PeerVerdict] = {}

    def set_host_addresses(self, addresses: Iterable[str]) -> bool:
        """Replace the host's own interface addresses (README: "confedge's own addresses are
        always refused"); True when the set changed (the verdict cache is then dropped).

        Scoped IPv6 addresses (``fe80::1%eth0``) lose their scope; unparsable entries are
        skipped.  An address listed in ``allowed_peers`` stays allowed (rule 3 comes first).
        """
        host: set[IPAddress] = set()
        for a in addresses:
            try:
                ip = normalise(ipaddress.ip_address(a.split("%", 1)[0]))
            except ValueError:
                continue
            if not ip.is_unspecified:
                host.add(ip)
        frozen = frozenset(host)
        if frozen == self._host:
            return False
        self._host = frozen
        self._cache.clear()
        return True

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
        if isinstance(raw, ipaddress.IPv4Address):
            return self._judge_one(raw)
        form = transition_form(raw)
        if form is None:
            return self._judge_one(raw)
        if form.name in _SAME_ADDRESS:
            return self._judge_one(form.embedded[0])
        s = str(raw)
        for net in self._denied:
            if net.version == 6 and raw in net:
                return PeerVerdict(False, f"denied_peers {net}", s)
        # Every embedded address must pass the IPv4 rules; the first refusal names the rule.
        ports_only = False
        for v4 in form.embedded:
            v = self._judge_one(v4)
            if not v.allowed:
                return PeerVerdict(False, f"{form.name}/{v.rule}", v.address)
            ports_only = ports_only or v.relay_ports_only
        if not form.prefix_refused:
            return self._judge_one(raw)  # ISATAP: then the IPv6 address by the IPv6 rules
        for net in self._allowed:
            if net.version == 6 and raw in net:
                # A tunnel to one of our relay addresses still reaches relay ports only.
                return PeerVerdict(True, f"allowed_peers {net}", s, ports_only)
        return PeerVerdict(False, form.name, s)

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
        if addr in self._host:
            return PeerVerdict(False, "host-address", s)
        for rule, net in self._private:
            if addr.version == net.version and addr in net:
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
        return not self.restricted or self.is_media_node(ip)

    def is_media_node(self, ip: str) -> bool:
        """Is ``ip`` inside ``turn.media_nodes`` (whatever the mode)?  The 401 budget keeps these
        sources apart from everyone else's (see :class:`~.auth.UnauthBudget`)."""
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
