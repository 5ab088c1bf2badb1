"""The generated firewall: what each configuration opens, and that nft/iptables accept it.

The kernel checks run in a throwaway network namespace (`unshare --net`), never in the root
namespace; they skip (saying why) where that or nf_tables is unavailable.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from confedge.config import Config, parse_config
from confedge.host.firewall import normalise
from confedge.host.ruleset import iptables_ruleset, nft_ruleset, nft_table, plan


def _cfg(**sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "server": {"internal_address": "10.0.0.5", "external_address": "203.0.113.5"},
        "proxy": {"nodes": ["10.0.0.11"]},
        "turn": {"username": "u", "password": "p", "media_nodes": ["10.0.0.0/24"]},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data)


def _scratch(cmd: str, stdin: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("unshare") is None or shutil.which(cmd.split()[0]) is None:
        pytest.skip(f"needs unshare and {cmd.split()[0]}")
    proc = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", cmd],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if "Operation not permitted" in proc.stderr and "unshare" in proc.stderr:
        pytest.skip("unshare --net needs root")
    if "Protocol not supported" in proc.stderr or "Operation not supported" in proc.stderr:
        pytest.skip(f"the kernel refuses nf_tables: {proc.stderr.strip()}")
    return proc


CONFIGS = {
    "restricted-dual-nic": _cfg(),
    "permissive": _cfg(turn={"mode": "permissive", "secrets": ["s"], "media_nodes": []}),
    "single-nic-v6": _cfg(
        server={"internal_address": "2001:db8::5", "external_address": None},
        turn={"media_nodes": ["2001:db8::/64", "10.0.0.0/24"]},
        management={"networks": ["2001:db8:1::/48"]},
    ),
    "wildcard": _cfg(server={"internal_address": "0.0.0.0", "external_address": "203.0.113.5"}),
    "no-turn-no-rate": _cfg(turn={"enabled": False}, firewall={"rate_limit": 0, "ssh_port": 0}),
    "outbound": _cfg(
        proxy={"nodes": ["10.0.0.11", "node.example.com:8443", "[2001:db8::7]"]},
        guard={"enabled": True, "store": "redis://10.0.0.20:6380/0"},
        firewall={"outbound": "restricted"},
    ),
    "ephemeral": _cfg(
        proxy={"https_port": 0, "http_port": 0},
        turn={"port": 0, "tls_port": 0},
        management={"port": 0},
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nft_accepts_the_ruleset(name: str) -> None:
    proc = _scratch("nft -c -f -", nft_ruleset(CONFIGS[name]))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fam", [4, 6])
def test_iptables_restore_accepts_the_ruleset(name: str, fam: int) -> None:
    tool = "iptables-restore" if fam == 4 else "ip6tables-restore"
    proc = _scratch(f"{tool} --test", iptables_ruleset(CONFIGS[name])[fam])
    assert proc.returncode == 0, proc.stderr


def _rules(cfg: Config) -> list[str]:
    text = nft_table(cfg)
    return [line.strip() for line in text.splitlines()]


def test_restricted_udp_turn_admits_binding_requests_only_from_outside() -> None:
    rules = _rules(_cfg())
    turn = [r for r in rules if "udp dport 3478" in r]
    assert turn == [
        'ip daddr 10.0.0.5 udp dport 3478 ip saddr @media_nodes_v4 counter accept comment "turn"',
        "ip daddr 10.0.0.5 udp dport 3478 @th,64,16 0x0001 @th,96,32 0x2112a442 "
        "update @stun_rate_v4 { ip saddr limit rate over 50/second burst 100 packets } "
        'counter drop comment "stun: over 50 Binding requests/s from one source"',
        "ip daddr 10.0.0.5 udp dport 3478 @th,64,16 0x0001 @th,96,32 0x2112a442 "
        'counter accept comment "stun: Binding request"',
        'ip daddr 10.0.0.5 udp dport 3478 counter drop comment "turn: not from a media node"',
    ]
    # TCP and TLS TURN cannot be matched per message: nodes only.
    assert [r for r in rules if "tcp dport 3478" in r or "tcp dport 5349" in r] == [
        'ip daddr 10.0.0.5 tcp dport 3478 ip saddr @media_nodes_v4 counter accept comment "turn"',
        'ip daddr 10.0.0.5 tcp dport 5349 ip saddr @media_nodes_v4 counter accept comment "turns"',
    ]


def test_permissive_turn_is_open_to_anyone() -> None:
    rules = _rules(CONFIGS["permissive"])
    assert 'ip daddr 10.0.0.5 udp dport 3478 counter accept comment "turn"' in rules
    assert 'ip daddr 10.0.0.5 tcp dport 3478 counter accept comment "turn"' in rules
    # Only the reflector budget reads the payload; nothing is dropped for its message type.
    assert [r for r in rules if "@th,64,16" in r] == [
        "ip daddr 10.0.0.5 udp dport 3478 @th,64,16 0x0001 @th,96,32 0x2112a442 "
        "update @stun_rate_v4 { ip saddr limit rate over 50/second burst 100 packets } "
        'counter drop comment "stun: over 50 Binding requests/s from one source"'
    ]
    assert not any("not from a media node" in r for r in rules)


def test_relays_on_the_external_address_management_on_the_internal_one() -> None:
    rules = _rules(_cfg())
    assert 'ip daddr 203.0.113.5 udp dport 49152-65535 counter accept comment "relay"' in rules
    mgmt = [r for r in rules if "9090" in r]
    assert mgmt == [
        "ip daddr 10.0.0.5 tcp dport 9090 ip saddr @management_v4 counter accept comment "
        '"management"'
    ]
    https = [r for r in rules if r.endswith('"https"')]
    assert https == [
        'ip daddr { 10.0.0.5, 203.0.113.5 } tcp dport { 443, 80 } counter accept comment "https"'
    ]


def test_ban_sets_are_dropped_first_and_policy_is_drop() -> None:
    rules = _rules(_cfg())
    start = rules.index("type filter hook input priority filter; policy drop;")
    assert rules[start + 1] == 'iif "lo" accept'
    assert rules[start + 2].startswith("ip saddr @confedge_banned_v4 counter drop")
    assert rules[start + 3].startswith("ip6 saddr @confedge_banned_v6 counter drop")
    assert rules[start + 4] == "ct state established,related accept"


def test_ipv6_and_spare_ports() -> None:
    rules = _rules(CONFIGS["single-nic-v6"])
    assert any(
        r.startswith("ip6 daddr 2001:db8::5 udp dport 3478 ip6 saddr @media_nodes_v6")
        for r in rules
    )
    # An IPv4 node cannot reach an IPv6-only TURN listener: no IPv4 TURN rule at all.
    assert not any("ip saddr @media_nodes_v4" in r for r in rules)
    p = plan(CONFIGS["ephemeral"])
    assert {s.name for s in p.services} == {"ssh", "relay"}
    assert len(p.notes) == 3
    assert "# note: turn.port is 0 (ephemeral): not opened" in nft_ruleset(CONFIGS["ephemeral"])


def test_ssh_stays_reachable_unless_closed() -> None:
    assert any(r.endswith('comment "ssh"') for r in _rules(_cfg()))
    closed = _rules(CONFIGS["no-turn-no-rate"])
    assert not any("ssh" in r for r in closed)
    assert not any("limit rate over" in r for r in closed)
    narrowed = _rules(_cfg(firewall={"ssh_networks": ["192.0.2.0/24"]}))
    assert (
        'meta nfproto ipv4 tcp dport 22 ip saddr @ssh_v4 counter accept comment "ssh"' in narrowed
    )
    assert not any("meta nfproto ipv6 tcp dport 22" in r and "accept" in r for r in narrowed)


def test_normalise_ignores_counters_and_ban_elements() -> None:
    listing = (
        "table inet confedge {\n\tset confedge_banned_v4 {\n\t\ttype ipv4_addr\n"
        "\t\telements = { 192.0.2.1 timeout 5m expires 4m,\n\t\t\t     192.0.2.2 }\n\t}\n"
        "\tset media_nodes_v4 {\n\t\telements = { 10.0.0.0/24 }\n\t}\n"
        "\tchain input {\n\t\tip saddr @x counter packets 12 bytes 900 drop\n\t}\n}\n"
    )
    out = normalise(listing)
    assert not any("192.0.2" in line for line in out)
    assert "\t\telements = { 10.0.0.0/24 }" in out
    assert "\t\tip saddr @x counter drop" in out


def test_config_rejects_bad_firewall_keys(tmp_path: Path) -> None:
    from confedge.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(firewall={"ssh_networks": ["nowhere"], "rate_limit": -1})
    text = str(err.value)
    assert "firewall.ssh_networks[0]" in text and "firewall.rate_limit" in text
    with pytest.raises(ConfigError, match=r"guard\.firewall"):
        _cfg(guard={"firewall": "yes"})


def test_outbound_restricted_admits_media_nodes_dns_ntp_only() -> None:
    assert "chain output" not in nft_table(_cfg())  # default: the host's own traffic is free
    text = nft_table(CONFIGS["outbound"])
    out = [line.strip() for line in text[text.index("chain output") :].splitlines()]
    assert out[1:] == [
        "type filter hook output priority filter; policy drop;",
        'oif "lo" accept',
        "ct state established,related accept",
        "meta l4proto { icmp, ipv6-icmp } accept",
        'udp dport 53 accept comment "dns"',
        'tcp dport 53 accept comment "dns"',
        'udp dport 123 accept comment "ntp"',
        'ip daddr 10.0.0.11 tcp dport 443 accept comment "node"',
        'tcp dport 8443 accept comment "node"',
        'ip6 daddr 2001:db8::7 tcp dport 443 accept comment "node"',
        'ip daddr 10.0.0.20 tcp dport 6380 accept comment "guard store"',
        'ip saddr 203.0.113.5 udp sport 49152-65535 accept comment "relayed media"',
        'counter drop comment "outbound: not media, nodes, DNS or NTP"',
        "}",
        "}",
    ]
    assert "node node.example.com is a name" in nft_ruleset(CONFIGS["outbound"])
    v4 = iptables_ruleset(CONFIGS["outbound"])[4]
    assert ":OUTPUT DROP [0:0]" in v4
    assert "-A OUTPUT -s 203.0.113.5 -p udp -m udp --sport 49152:65535" in v4


def test_outbound_restricted_admits_pool_nodes_and_the_cluster_store() -> None:
    """[[proxy.pools]] nodes are reached like proxy.nodes, and a [cluster] store on its own
    host (or with the guard off) is reached like the guard's."""
    cfg = _cfg(
        proxy={"pools": [{"prefix": "/scheduling/", "nodes": ["10.0.1.7:8443"]}]},
        cluster={"store": "redis://10.0.0.30:6379/1"},
        firewall={"outbound": "restricted"},
    )
    text = nft_table(cfg)
    assert 'ip daddr 10.0.0.11 tcp dport 443 accept comment "node"' in text
    assert 'ip daddr 10.0.1.7 tcp dport 8443 accept comment "node"' in text
    assert 'ip daddr 10.0.0.30 tcp dport 6379 accept comment "cluster store"' in text
