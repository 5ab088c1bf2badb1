"""The host firewall for a configuration: nftables first, iptables-restore for older hosts.

Theory of operation
-------------------
`plan()` reads the configuration once into a `Plan`: which TCP/UDP ports are served on which
of confedge's addresses, from which sources. The two renderers only spell that plan; neither
looks at the configuration, so the nft and iptables forms cannot disagree about what is open.

The rules, in order (first match wins; the input policy is drop):

1. loopback; then the guard's ban sets (`confedge_banned_v4`/`_v6`, nft only), dropped before
   anything else so a banned address never costs a TCP or TLS handshake;
2. established/related traffic, invalid conntrack state dropped;
3. ICMP and ICMPv6 essentials: errors (PMTU discovery needs "fragmentation needed" and
   "packet too big", RFC 1191/8201), neighbour discovery (RFC 4861 §7.1: hop limit 255), echo
   rate-limited;
4. per-source rate limits on new TCP connections to the public ports (HTTPS, HTTP, SSH) and on
   STUN Binding requests (a reflector budget), as nft dynamic sets / iptables hashlimit;
5. the services: HTTP(S) on every listening address from anywhere; management from
   `management.networks` on the internal address; SSH; TURN (below); the relay port range on
   the relay addresses from anywhere (peers are browsers on the Internet in both modes).

TURN in restricted mode (SPEC §3, the reference's u32 rules): over UDP the kernel reads the
first bytes of the payload. A STUN message starts with a 16-bit type whose two top bits are 0
and carries the magic cookie 0x2112A442 at bytes 4-7 (RFC 8489 §5); a Binding request is type
0x0001. Those are accepted from anyone (the box is a STUN server); every other message type and
ChannelData (top bits 01, RFC 8656 §12.4) only from `media_nodes`. Over TCP and TLS no such
match is possible: a stream's messages span segments and a connection that opened with a
Binding may go on to Allocate, so TCP (and TLS) TURN is open to `media_nodes` only. Nothing
is lost: ICE sends STUN Binding over UDP, and in restricted mode only nodes use TURN.
Permissive mode opens the TURN ports to anyone (browsers allocate); TurnCore still checks the
credentials.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from confedge.config import Config, NodeAddress

__all__ = [
    "BAN_SETS",
    "TABLE",
    "Plan",
    "iptables_ruleset",
    "nft_ruleset",
    "nft_table",
    "plan",
]

TABLE = "confedge"  # table inet confedge
BAN_SETS = {4: "confedge_banned_v4", 6: "confedge_banned_v6"}
STUN_BINDING_REQUEST = 0x0001  # RFC 8489 §18.2 method 0x001, class request
STUN_MAGIC_COOKIE = 0x2112A442  # RFC 8489 §5
FAMILIES = (4, 6)


@dataclass(frozen=True)
class Service:
    """Ports of one protocol on some of confedge's addresses, from some sources.

    `daddrs[fam]` is the list of destination addresses (empty list: any address of that family,
    for a wildcard listener); a family missing from `daddrs` is not served. `sources[fam]` is
    the list of source networks (None: anyone)."""

    name: str
    proto: str  # "tcp", "udp"
    ports: tuple[str, ...]  # "443", "49152-65535"
    daddrs: dict[int, list[str]]
    sources: dict[int, list[str] | None]
    set_name: str = ""  # nft set holding `sources`
    rate_limited: bool = False  # per-source new-connection budget (TCP)


@dataclass
class Plan:
    """What the firewall admits, derived from one configuration (see the module docstring)."""

    services: list[Service] = field(default_factory=list)
    rate: int = 50
    notes: list[str] = field(default_factory=list)
    outbound: list[Outbound] | None = None  # None: outbound not filtered (firewall.outbound)


@dataclass(frozen=True)
class Outbound:
    """New outbound flows admitted when firewall.outbound = "restricted".

    `daddrs`/`saddrs` per family as in `Service.daddrs`; None means any address, any family."""

    name: str
    proto: str
    dport: str = ""
    sport: str = ""
    daddrs: dict[int, list[str]] | None = None
    saddrs: dict[int, list[str]] | None = None


def _family(addr: str) -> int:
    return ipaddress.ip_network(addr, strict=False).version


def _daddrs(addresses: list[str]) -> dict[int, list[str]]:
    """Destination match per family; a wildcard address serves its whole family (and "::",
    which Linux binds dual-stack by default, both)."""
    out: dict[int, list[str]] = {}
    for a in dict.fromkeys(addresses):
        ip = ipaddress.ip_address(a)
        if ip.is_unspecified:
            out[ip.version] = []
            if ip.version == 6:
                out[4] = []
        elif out.get(ip.version) != []:
            out.setdefault(ip.version, []).append(a)
    return out


def _sources(networks: list[str]) -> dict[int, list[str] | None]:
    out: dict[int, list[str] | None] = {4: [], 6: []}
    for n in networks:
        net = ipaddress.ip_network(n, strict=False)
        if net.prefixlen == 0:
            out[net.version] = None  # anyone
        elif out[net.version] is not None:
            out[net.version].append(str(net))  # type: ignore[union-attr]
    return out


ANYONE: dict[int, list[str] | None] = {4: None, 6: None}


def plan(cfg: Config) -> Plan:
    """The firewall for `cfg`: every open port with its addresses and sources."""
    p = Plan(rate=cfg.firewall.rate_limit)
    srv = cfg.server
    internal = srv.internal_address
    if cfg.proxy.enabled:
        ports = [cfg.proxy.https_port, cfg.proxy.http_port]
        hosts = [internal] + ([srv.external_address] if srv.external_address else [])
        web = tuple(str(x) for x in ports if x)
        if web:
            p.services.append(Service("https", "tcp", web, _daddrs(hosts), ANYONE, "", True))
        if not cfg.proxy.https_port:
            p.notes.append("proxy.https_port is 0 (ephemeral): not opened")
    if cfg.management.enabled:
        if cfg.management.port:
            p.services.append(
                Service(
                    "management",
                    "tcp",
                    (str(cfg.management.port),),
                    _daddrs([internal]),
                    _sources(cfg.management.networks),
                    "management",
                )
            )
        else:
            p.notes.append("management.port is 0 (ephemeral): not opened")
    if cfg.firewall.ssh_port:
        p.services.append(
            Service(
                "ssh",
                "tcp",
                (str(cfg.firewall.ssh_port),),
                _daddrs(["::"]),
                _sources(cfg.firewall.ssh_networks),
                "ssh",
                True,
            )
        )
    if cfg.turn.enabled:
        _plan_turn(cfg, p)
    if cfg.firewall.outbound == "restricted":
        p.outbound = _plan_outbound(cfg, p)
    return p


def _plan_outbound(cfg: Config, p: Plan) -> list[Outbound]:
    """SPEC §6 "outbound from relay ports only": what the host itself may start."""
    out = [
        Outbound("dns", "udp", dport="53"),
        Outbound("dns", "tcp", dport="53"),
        Outbound("ntp", "udp", dport="123"),
    ]
    targets: list[tuple[str, str, int]] = []
    if cfg.proxy.enabled:
        targets += [("node", n.host, n.port) for n in cfg.proxy.node_addresses]
        for pool in cfg.proxy.pools:  # [[proxy.pools]]: their nodes are reached the same way
            targets += [("node", n.host, n.port) for n in map(NodeAddress.parse, pool.nodes)]
    stores = [("guard store", cfg.guard.store if cfg.guard.enabled else "")]
    stores.append(("cluster store", cfg.cluster.store))
    for name, store in stores:
        if store.startswith(("redis://", "rediss://")):
            url = urlsplit(store)
            targets.append((name, url.hostname or "127.0.0.1", url.port or 6379))
    for name, host, port in dict.fromkeys(targets):
        try:
            daddrs: dict[int, list[str]] | None = _daddrs([host])
        except ValueError:
            daddrs = None  # a DNS name: admitted by port alone
            p.notes.append(f"{name} {host} is a name: outbound TCP {port} allowed to any address")
        out.append(Outbound(name, "tcp", dport=str(port), daddrs=daddrs))
    if cfg.turn.enabled:
        lo, hi = cfg.turn.relay_port_range
        relays = [cfg.server.relay_address]
        relays += [cfg.turn.relay_address_v6] if cfg.turn.relay_address_v6 else []
        out.append(Outbound("relayed media", "udp", sport=f"{lo}-{hi}", saddrs=_daddrs(relays)))
    return out


def _plan_turn(cfg: Config, p: Plan) -> None:
    turn = cfg.turn
    listen = _daddrs([cfg.server.internal_address])
    restricted = turn.mode == "restricted"
    nodes = _sources(turn.media_nodes) if restricted else ANYONE
    set_name = "media_nodes" if restricted else ""
    if turn.port:
        port = (str(turn.port),)
        p.services.append(Service("turn", "udp", port, listen, nodes, set_name))
        p.services.append(Service("turn", "tcp", port, listen, nodes, set_name))
    else:
        p.notes.append("turn.port is 0 (ephemeral): not opened")
    if turn.tls_port:
        tls = (str(turn.tls_port),)
        p.services.append(Service("turns", "tcp", tls, listen, nodes, set_name))
    lo, hi = turn.relay_port_range
    relays = [cfg.server.relay_address] + ([turn.relay_address_v6] if turn.relay_address_v6 else [])
    p.services.append(Service("relay", "udp", (f"{lo}-{hi}",), _daddrs(relays), ANYONE))


# -- nftables -------------------------------------------------------------------------------

AddSet = Callable[[str, int, str, str, str], None]
_NFT_IP = {4: "ip", 6: "ip6"}
_NFT_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_STUN_MATCH = f"@th,64,16 {STUN_BINDING_REQUEST:#06x} @th,96,32 {STUN_MAGIC_COOKIE:#010x}"


def _nft_set(values: list[str]) -> str:
    return values[0] if len(values) == 1 else "{ " + ", ".join(values) + " }"


def _nft_ports(ports: tuple[str, ...]) -> str:
    return _nft_set(list(ports))


def _nft_dst(fam: int, daddrs: list[str]) -> str:
    return f"{_NFT_IP[fam]} daddr {_nft_set(daddrs)}" if daddrs else f"meta nfproto ipv{fam}"


def _nft_rate(fam: int, name: str, rate: int) -> str:
    return (
        f"update @{name}_rate_v{fam} {{ {_NFT_IP[fam]} saddr limit rate over {rate}/second "
        f"burst {2 * rate} packets }}"
    )


def nft_ruleset(
    cfg: Config, *, source: str = "", banned: dict[int, list[str]] | None = None
) -> str:
    """The `table inet confedge` for `cfg`, as `nft -f` input that replaces the table atomically.

    The file first creates the table (a no-op if it exists) and deletes it, then declares it:
    one transaction, so there is never a moment without rules, and other tables (Docker's,
    the distribution's) are never touched."""
    return _nft_header(source, plan(cfg).notes) + "\n" + nft_table(cfg, banned)


def _nft_header(source: str, notes: list[str]) -> str:
    where = f" for {source}" if source else ""
    return (
        f"#!/usr/sbin/nft -f\n"
        f"# confedge firewall{where}, generated by `confedge firewall`; regenerate, do not edit.\n"
        + "".join(f"# note: {n}\n" for n in notes)
        + f"# Replaces table inet {TABLE} in one transaction; other tables are left alone.\n"
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
    )


def nft_table(cfg: Config, banned: dict[int, list[str]] | None = None) -> str:
    """The table declaration alone; `banned` elements (e.g. "192.0.2.7 timeout 250s") are kept
    in the ban sets, which is how `--apply` carries the guard's bans across a reload."""
    p = plan(cfg)
    sets: dict[str, str] = {}
    rules: list[str] = []

    def add_set(name: str, fam: int, flags: str, extra: str = "", elements: str = "") -> None:
        if name in sets:
            return
        body = [f"type {_NFT_ADDR[fam]}", f"flags {flags}"]
        if extra:
            body.append(extra)
        if elements:
            body.append(f"elements = {{ {elements} }}")
        sets[name] = f"\tset {name} {{\n" + "".join(f"\t\t{b}\n" for b in body) + "\t}\n"

    for fam in FAMILIES:
        add_set(BAN_SETS[fam], fam, "interval,timeout", "", ", ".join((banned or {}).get(fam, [])))
    rules.append('iif "lo" accept')
    for fam in FAMILIES:
        rules.append(
            f'{_NFT_IP[fam]} saddr @{BAN_SETS[fam]} counter drop comment "banned by the guard"'
        )
    rules += [
        "ct state established,related accept",
        'ct state invalid counter drop comment "invalid conntrack state"',
        # RFC 1191 (PMTU: destination-unreachable/fragmentation-needed), RFC 4890 §4.3.1.
        "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
        "icmp type echo-request limit rate 10/second burst 20 packets accept",
        "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, "
        "parameter-problem } accept",
        # RFC 4861 §7.1.1: neighbour discovery is only valid with hop limit 255 (on-link).
        "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, "
        "nd-neighbor-advert } ip6 hoplimit 255 accept",
        "icmpv6 type mld-listener-query ip6 saddr fe80::/10 accept",
        "icmpv6 type echo-request limit rate 10/second burst 20 packets accept",
    ]
    if p.rate:
        for fam in FAMILIES:
            for name in ("conn", "stun"):
                add_set(f"{name}_rate_v{fam}", fam, "dynamic,timeout", "timeout 1m\n\t\tsize 65535")
    for svc in p.services:
        rules += _nft_service(svc, p.rate, add_set)
    rules.append('counter drop comment "default: drop"')
    chains = [_nft_chain("input", rules)]
    if p.outbound is not None:
        chains.append(_nft_chain("output", _nft_outbound(p.outbound)))
    return f"table inet {TABLE} {{\n" + "\n".join([*sets.values(), *chains]) + "}\n"


def _nft_chain(hook: str, rules: list[str]) -> str:
    return (
        f"\tchain {hook} {{\n\t\ttype filter hook {hook} priority filter; policy drop;\n"
        + "".join(f"\t\t{r}\n" for r in rules)
        + "\t}\n"
    )


def _nft_outbound(allowed: list[Outbound]) -> list[str]:
    rules = [
        'oif "lo" accept',
        "ct state established,related accept",
        "meta l4proto { icmp, ipv6-icmp } accept",  # errors, neighbour discovery, PMTU
    ]
    for o in allowed:
        ports = (f" {o.proto} dport {o.dport}" if o.dport else "") + (
            f" {o.proto} sport {o.sport}" if o.sport else ""
        )
        if o.daddrs is None and o.saddrs is None:
            rules.append(f'{ports.strip()} accept comment "{o.name}"')
            continue
        for fam in FAMILIES:
            where = ""
            if o.daddrs is not None:
                if fam not in o.daddrs:
                    continue
                where = _nft_dst(fam, o.daddrs[fam])
            if o.saddrs is not None:
                if fam not in o.saddrs:
                    continue
                src = o.saddrs[fam]
                where += (
                    f" {_NFT_IP[fam]} saddr {_nft_set(src)}" if src else f" meta nfproto ipv{fam}"
                )
            rules.append(f'{where.strip()}{ports} accept comment "{o.name}"')
    rules.append('counter drop comment "outbound: not media, nodes, DNS or NTP"')
    return rules


def _nft_service(svc: Service, rate: int, add_set: AddSet) -> list[str]:
    rules: list[str] = []
    for fam in FAMILIES:
        if fam not in svc.daddrs:
            continue
        dst = _nft_dst(fam, svc.daddrs[fam])
        match = f"{dst} {svc.proto} dport {_nft_ports(svc.ports)}"
        sources = svc.sources.get(fam)
        if rate and svc.rate_limited:
            rules.append(
                f"{match} ct state new {_nft_rate(fam, 'conn', rate)} counter drop "
                f'comment "{svc.name}: over {rate} new connections/s from one source"'
            )
        stun = svc.name == "turn" and svc.proto == "udp"
        binding = f"{match} {_STUN_MATCH}"
        # A reflector budget for Binding requests from anyone (media nodes are exempt).
        stun_rate = (
            f"{binding} {_nft_rate(fam, 'stun', rate)} counter drop "
            f'comment "stun: over {rate} Binding requests/s from one source"'
        )
        if sources is None:
            rules += [stun_rate] if stun and rate else []
            rules.append(f'{match} counter accept comment "{svc.name}"')
        elif sources:
            name = f"{svc.set_name}_v{fam}"
            add_set(name, fam, "interval", "", ", ".join(sources))
            rules.append(
                f'{match} {_NFT_IP[fam]} saddr @{name} counter accept comment "{svc.name}"'
            )
        if stun and sources is not None:
            # Restricted mode: STUN Binding requests from anyone, the rest dropped and counted.
            rules += [stun_rate] if rate else []
            rules.append(f'{binding} counter accept comment "stun: Binding request"')
            rules.append(f'{match} counter drop comment "turn: not from a media node"')
    return rules


# -- iptables-restore -----------------------------------------------------------------------

_IPT_ICMP = {
    4: [
        "-p icmp --icmp-type destination-unreachable -j ACCEPT",
        "-p icmp --icmp-type time-exceeded -j ACCEPT",
        "-p icmp --icmp-type parameter-problem -j ACCEPT",
        "-p icmp --icmp-type echo-request -m limit --limit 10/second --limit-burst 20 -j ACCEPT",
    ],
    6: [
        "-p ipv6-icmp --icmpv6-type destination-unreachable -j ACCEPT",
        "-p ipv6-icmp --icmpv6-type packet-too-big -j ACCEPT",
        "-p ipv6-icmp --icmpv6-type time-exceeded -j ACCEPT",
        "-p ipv6-icmp --icmpv6-type parameter-problem -j ACCEPT",
        *(
            f"-p ipv6-icmp --icmpv6-type {t} -m hl --hl-eq 255 -j ACCEPT"
            for t in (
                "router-solicitation",
                "router-advertisement",
                "neighbour-solicitation",
                "neighbour-advertisement",
            )
        ),
        "-s fe80::/10 -p ipv6-icmp --icmpv6-type 130 -j ACCEPT",
        "-p ipv6-icmp --icmpv6-type echo-request -m limit --limit 10/second --limit-burst 20 "
        "-j ACCEPT",
    ],
}
# u32: the STUN type at the first payload byte and the cookie 4 bytes later. IPv4 reads the
# header length from the IHL nibble (0>>22&0x3C); IPv6 assumes no extension headers (40 bytes).
_IPT_STUN = {
    4: f'-m u32 --u32 "0>>22&0x3C@8>>16={STUN_BINDING_REQUEST:#06x} && '
    f'0>>22&0x3C@12={STUN_MAGIC_COOKIE:#010x}"',
    6: f'-m u32 --u32 "48>>16={STUN_BINDING_REQUEST:#06x} && 52={STUN_MAGIC_COOKIE:#010x}"',
}


def iptables_ruleset(cfg: Config, *, source: str = "") -> dict[int, str]:
    """`iptables-restore` (key 4) and `ip6tables-restore` (key 6) input for hosts without nft.

    Each replaces the filter table of its family (as the reference appliance's rules do). The
    guard's kernel ban set is nft-only: with guard.firewall use the nft form."""
    p = plan(cfg)
    where = f" for {source}" if source else ""
    out: dict[int, str] = {}
    for fam in FAMILIES:
        lines = [
            f"# confedge firewall{where} (IPv{fam}), generated by `confedge firewall --format "
            f"{'ip6' if fam == 6 else 'ip'}tables`; load with {'ip6' if fam == 6 else 'ip'}"
            "tables-restore.",
            *(f"# note: {n}" for n in p.notes),
            "*filter",
            ":INPUT DROP [0:0]",
            ":FORWARD ACCEPT [0:0]",
            f":OUTPUT {'ACCEPT' if p.outbound is None else 'DROP'} [0:0]",
            "-A INPUT -i lo -j ACCEPT",
            "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-A INPUT -m conntrack --ctstate INVALID -j DROP",
            *(f"-A INPUT {r}" for r in _IPT_ICMP[fam]),
        ]
        for svc in p.services:
            lines += _ipt_service(svc, fam, p.rate)
        if p.outbound is not None:
            lines += _ipt_outbound(p.outbound, fam)
        lines += ["COMMIT", ""]
        out[fam] = "\n".join(lines)
    return out


def _ipt_service(svc: Service, fam: int, rate: int) -> list[str]:
    if fam not in svc.daddrs:
        return []
    ports = ",".join(x.replace("-", ":") for x in svc.ports)
    port = f"-m multiport --dports {ports}" if len(svc.ports) > 1 else f"--dport {ports}"
    dsts = svc.daddrs[fam] or [""]
    sources = svc.sources.get(fam)
    out: list[str] = []
    for dst in dsts:
        d = f"-d {dst} " if dst else ""
        match = f"-A INPUT {d}-p {svc.proto} -m {svc.proto} {port}"
        comment = f'-m comment --comment "{svc.name}"'
        if rate and svc.rate_limited:
            out.append(
                f"{match} -m conntrack --ctstate NEW -m hashlimit --hashlimit-above "
                f"{rate}/second --hashlimit-burst {2 * rate} --hashlimit-mode srcip "
                f"--hashlimit-name confedge-conn{fam} -j DROP"
            )
        stun = svc.name == "turn" and svc.proto == "udp"
        binding = f"{match} {_IPT_STUN[fam]}"
        stun_rate = (
            f"{binding} -m hashlimit --hashlimit-above {rate}/second --hashlimit-burst "
            f"{2 * rate} --hashlimit-mode srcip --hashlimit-name confedge-stun{fam} -j DROP"
        )
        if sources is None:
            out += [stun_rate] if stun and rate else []
            out.append(f"{match} {comment} -j ACCEPT")
        else:
            out += [f"{match} -s {s} {comment} -j ACCEPT" for s in sources]
        if stun and sources is not None:
            out += [stun_rate] if rate else []
            out.append(f'{binding} -m comment --comment "stun: Binding request" -j ACCEPT')
            out.append(f'{match} -m comment --comment "turn: not from a media node" -j DROP')
    return out


def _ipt_outbound(allowed: list[Outbound], fam: int) -> list[str]:
    icmp = "icmp" if fam == 4 else "ipv6-icmp"
    lines = [
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A OUTPUT -p {icmp} -j ACCEPT",
    ]
    for o in allowed:
        if o.daddrs is not None and fam not in o.daddrs:
            continue
        if o.saddrs is not None and fam not in o.saddrs:
            continue
        ports = f"-m {o.proto}" + (f" --dport {o.dport}" if o.dport else "")
        ports += f" --sport {o.sport.replace('-', ':')}" if o.sport else ""
        dsts = (o.daddrs or {}).get(fam) or [""]
        srcs = (o.saddrs or {}).get(fam) or [""]
        for d in dsts:
            for src in srcs:
                where = (f"-d {d} " if d else "") + (f"-s {src} " if src else "")
                lines.append(
                    f'-A OUTPUT {where}-p {o.proto} {ports} -m comment --comment "{o.name}" '
                    "-j ACCEPT"
                )
    return lines
