"""Kernel offload (turn.offload = "ebpf", issue 17) in network namespaces made here.

The relay runs in its own process inside a namespace (offload_scenario.py), so the TC program
is attached to that namespace's interfaces only (never the host's); the namespaces, and with them
every qdisc and program, are removed afterwards, also on failure.  Two topologies: everything on
the namespace's loopback (the program passes the rewritten packet up the stack), and client and
peers in a second namespace behind a veth pair (the program sends it back out the veth).

What is proved, from the scenario's report: ChannelData is forwarded both ways, byte for byte;
the user-space data plane's counters stay at zero while the map's counters rise; an unbound
channel and a peer without permission are never forwarded; once the channel expires (3 s
lifetime here, the core's own timers) nothing more is forwarded and the maps are empty; on the
veth, a tcpdump capture on the relay side shows the rewritten packets with correct addresses,
ports, lengths and checksums.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confedge.turn.offload import BPF_OBJECT

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and eBPF need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) not installed"),
    pytest.mark.skipif(not BPF_OBJECT.is_file(), reason=f"{BPF_OBJECT} not built (no clang)"),
]

SCENARIO = Path(__file__).with_name("offload_scenario.py")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _ns(name: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *cmd], capture_output=True, text=True)


@pytest.fixture
def netns() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _new_ns(made: list[str], prefix: str = "h17ebpf") -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    made.append(name)
    _ip("-n", name, "link", "set", "lo", "up")
    return name


def _run(ns: str, *args: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, str(SCENARIO), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"scenario printed nothing: {proc.stderr[-3000:]}"
    out: dict[str, object] = json.loads(lines[-1])
    if "error" in out and "refused the BPF program" in str(out["error"]):
        pytest.skip(f"the kernel refused to load the program: {out['error']}")
    assert "error" not in out, f"{out['error']}\n{proc.stderr[-3000:]}"
    return out


def _check(out: dict[str, object], n: int) -> None:
    assert out["bind"] == 200
    assert out["unbound_delivered"] == 0  # an unbound channel is never forwarded
    assert out["to_peer_delivered"] == n and out["to_peer_ok"] is True
    assert out["to_client_delivered"] == n and out["to_client_ok"] is True
    traffic = out["after_traffic"]
    assert isinstance(traffic, dict)
    # User space saw no ChannelData at all; the map counted every packet.
    assert traffic["user_to_peer"] == 0 and traffic["user_to_client"] == 0
    assert traffic["kernel_to_peer"] == n and traffic["kernel_to_client"] == n
    assert traffic["kernel_bytes_to_peer"] == 8 * n
    assert traffic["offloaded_channels"] == 1
    # The service's stats (the metrics' source) include what the kernel forwarded.
    assert traffic["stats_to_peer"] == n and traffic["stats_to_client"] == n
    # A peer without a permission: not forwarded (user space counts and drops it).
    other = out["other_peer_counts"]
    assert isinstance(other, dict)
    assert other["kernel_to_client"] == n and other["user_to_client"] == 0
    # Expired: out of the map, and nothing more forwarded.
    expired = out["after_expiry"]
    assert isinstance(expired, dict) and expired["offloaded_channels"] == 0
    assert out["expired_delivered"] == 0
    # Bound again: back in the map.  Taken out of the kernel for good (as for a bandwidth-capped
    # allocation): user space relays, the kernel's counters stay.
    assert out["rebind"] == 200
    rebound, kept = out["after_rebind"], out["after_keep_in_user_space"]
    assert isinstance(rebound, dict) and isinstance(kept, dict)
    assert rebound["offloaded_channels"] == 1
    assert out["user_space_delivered"] == 5
    assert kept["offloaded_channels"] == 0
    assert kept["user_to_peer"] == 5 and kept["kernel_to_peer"] == n


def test_offload_on_loopback(netns: list[str]) -> None:
    ns = _new_ns(netns)
    _ip("-n", ns, "addr", "add", "127.0.0.2/8", "dev", "lo")
    n = 50
    out = _run(
        ns,
        *("--host", "127.0.0.1", "--client-host", "127.0.0.1"),
        *("--peer-host", "127.0.0.1", "--other-peer", "127.0.0.2", "--count", str(n)),
    )
    _check(out, n)
    # The namespace's loopback is left as it was: no clsact qdisc, no filter.
    assert "clsact" not in _ns(ns, "tc", "qdisc", "show", "dev", "lo").stdout


V4_HOSTS = ("10.117.0.1", "10.117.0.2", "10.117.0.3", "10.117.0.4")
V6_HOSTS = ("fd18::1", "fd18::2", "fd18::3", "fd18::4")


def _veth_pair(
    netns: list[str], hosts: tuple[str, ...] = V4_HOSTS, prefix: str = "h17ebpf"
) -> tuple[str, str]:
    """Relay namespace (hosts[0]) and far namespace (the others) joined by a veth pair."""
    relay_ns, far_ns = _new_ns(netns, prefix), _new_ns(netns, prefix)
    tag = relay_ns.rsplit("-", 1)[1]
    a, b = f"{prefix[:4]}{tag}a", f"{prefix[:4]}{tag}b"
    _ip("link", "add", a, "netns", relay_ns, "type", "veth", "peer", "name", b, "netns", far_ns)
    plen, extra = ("/64", ["nodad"]) if ":" in hosts[0] else ("/24", [])
    _ip("-n", relay_ns, "addr", "add", hosts[0] + plen, "dev", a, *extra)
    for addr in hosts[1:]:
        _ip("-n", far_ns, "addr", "add", addr + plen, "dev", b, *extra)
    _ip("-n", relay_ns, "link", "set", a, "up")
    _ip("-n", far_ns, "link", "set", b, "up")
    return relay_ns, far_ns


def _captured_run(
    netns: list[str], tmp_path: Path, hosts: tuple[str, ...], n: int, prefix: str
) -> tuple[dict[str, object], list[str], str, str, str, str]:
    """The scenario across a veth pair with tcpdump on the relay side: its report, the capture's
    lines (tcpdump -vv) and the relay, client, peer and listener as tcpdump writes them."""
    relay_ns, far_ns = _veth_pair(netns, hosts, prefix)
    a = f"{prefix[:4]}{relay_ns.rsplit('-', 1)[1]}"
    if shutil.which("ethtool"):
        # Full checksums from the senders (no CHECKSUM_PARTIAL), so the capture checks ours.
        _ns(far_ns, "ethtool", "-K", a + "b", "tx", "off")
    pcap = tmp_path / "relay.pcap"
    tcpdump = ["tcpdump", "-i", a + "a", "-n", "-U", "-w", str(pcap), "udp"]
    dump = subprocess.Popen(
        ["ip", "netns", "exec", relay_ns, *tcpdump],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        out = _run(
            relay_ns,
            *("--host", hosts[0], "--client-host", hosts[1]),
            *("--peer-host", hosts[2], "--other-peer", hosts[3], "--count", str(n)),
            *("--peer-netns", far_ns),
        )
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait(5)
    text = subprocess.run(
        ["tcpdump", "-r", str(pcap), "-n", "-vv"], capture_output=True, text=True
    ).stdout
    ends = [out[k] for k in ("relay", "client", "peer", "listener")]
    assert all(isinstance(x, list) for x in ends), out
    r, c, p, li = (f"{x[0]}.{x[1]}" for x in ends if isinstance(x, list))
    return out, text.splitlines(), r, c, p, li


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_offload_on_veth_with_capture(netns: list[str], tmp_path: Path) -> None:
    n = 50
    out, lines, r, c, p, li = _captured_run(netns, tmp_path, V4_HOSTS, n, "h17ebpf")
    _check(out, n)
    text = "\n".join(lines)
    # Rewritten client -> peer: relay address to the peer, the 8-byte payload (header
    # stripped).  The first n are the kernel's (the 5 after keep_in_user_space are user
    # space's, sent with CHECKSUM_PARTIAL, which tcpdump cannot verify, and by the native data
    # plane as one GSO message, which the capture sees as one 40-byte datagram).
    to_peer = [i for i, ln in enumerate(lines) if f"{r} > {p}:" in ln and "length 8" in ln]
    # Rewritten peer -> client: listener to the client, 4 + 9 bytes of ChannelData.
    to_client = [i for i, ln in enumerate(lines) if f"{li} > {c}:" in ln and "length 13" in ln]
    assert len(to_peer) >= n, text[-2000:]
    assert len(to_client) == n, text[-2000:]
    for i in to_peer[:n] + to_client:
        assert "[udp sum ok]" in lines[i], lines[i]
        assert "bad cksum" not in lines[i - 1], lines[i - 1]  # the IP header line


def test_offload_ipv6_on_loopback(netns: list[str]) -> None:
    """The IPv6 half of the program (maps cd_in6/cd_out6): the same checks as over IPv4, with
    listener, relay, client and peers on ULA addresses of the namespace's loopback."""
    ns = _new_ns(netns, "i17gen")
    for addr in ("fd17::1", "fd17::2", "fd17::3", "fd17::4"):
        _ip("-n", ns, "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
    n = 50
    out = _run(
        ns,
        *("--host", "fd17::1", "--client-host", "fd17::2"),
        *("--peer-host", "fd17::3", "--other-peer", "fd17::4", "--count", str(n)),
    )
    assert isinstance(out["relay"], list) and out["relay"][0] == "fd17::1"
    _check(out, n)
    assert "clsact" not in _ns(ns, "tc", "qdisc", "show", "dev", "lo").stdout


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_offload_ipv6_on_veth_with_capture(netns: list[str], tmp_path: Path) -> None:
    """IPv6 across a veth pair: forwarded both ways by the kernel, and the capture on the relay
    side shows the rewritten addresses, ports, lengths, hop limit and a correct UDP checksum
    (mandatory over IPv6, RFC 8200 §8.1) on every rewritten packet."""
    n = 50
    out, lines, r, c, p, li = _captured_run(netns, tmp_path, V6_HOSTS, n, "i17gen")
    _check(out, n)
    text = "\n".join(lines)
    # tcpdump -vv prints an IPv6 packet on one line (header fields, then UDP).
    to_peer = [ln for ln in lines if f"{r} > {p}:" in ln and "length 8" in ln]
    to_client = [ln for ln in lines if f"{li} > {c}:" in ln and "length 13" in ln]
    assert len(to_peer) >= n, text[-2000:]
    assert len(to_client) == n, text[-2000:]
    for ln in to_peer[:n] + to_client:
        assert "[udp sum ok]" in ln and "hlim 64" in ln, ln


_TOTALS = re.compile(r"tot_send_bytes ~ (\d+), tot_recv_bytes ~ (\d+)")


@pytest.mark.coturn
@pytest.mark.skipif(shutil.which("turnutils_uclient") is None, reason="coturn not installed")
@pytest.mark.parametrize("mux", [0, 4], ids=["own-ports", "relay_multiplex=4"])
@pytest.mark.parametrize("where", ["lo", "veth"])
def test_uclient_through_offload(netns: list[str], where: str, mux: int) -> None:
    """coturn's client relays every message with the offload on, and the kernel carried it
    (also through shared relay sockets, turn.relay_multiplex)."""
    if where == "lo":
        ns = _new_ns(netns)
        hosts = ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2")
        extra: tuple[str, ...] = ()
    else:
        ns, far = _veth_pair(netns)
        hosts = ("10.117.0.1", "10.117.0.2", "10.117.0.3", "10.117.0.4")
        extra = ("--peer-netns", far)
    out = _run(
        ns,
        *("--host", hosts[0], "--client-host", hosts[1], "--peer-host", hosts[2]),
        *("--other-peer", hosts[3], "--uclient", "5", "--multiplex", str(mux), *extra),
    )
    text = str(out["uclient"])
    totals = _TOTALS.findall(text)
    assert totals, text
    sent, received = (int(x) for x in totals[-1])  # the last line is the whole run
    assert sent > 0 and received == sent, text
    counts = out["counts"]
    assert isinstance(counts, dict)
    # uclient sends through one relay to the echo peer, which answers through the other: all
    # of it ChannelData, all of it in the kernel, none of it in user space.
    assert counts["kernel_to_peer"] == 5 and counts["kernel_to_client"] == 5, counts
    assert counts["user_to_peer"] == 0 and counts["user_to_client"] == 0, counts


@pytest.mark.chromium
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="chromium not installed")
@pytest.mark.parametrize("mux", [0, 4], ids=["own-ports", "relay_multiplex=4"])
@pytest.mark.parametrize("where", ["lo", "veth"])
def test_chromium_through_offload(netns: list[str], where: str, mux: int) -> None:
    """Chromium's TURN client (DataChannel, relay candidates only) with the offload on: the
    message crosses, and its ChannelData to the peer was forwarded by the kernel.  Each
    allocation's peer is the other's relay address, so the kernel's client -> peer leg ends at
    a relay socket on this host and the second leg (peer -> client) is relayed by user space.
    With turn.relay_multiplex the two relay addresses are two shared sockets."""
    m = ("--multiplex", str(mux))
    if where == "veth":
        # Chromium in the far namespace (default route over the veth), the relay on 10.117.0.1.
        relay_ns, far = _veth_pair(netns)
        _ip("-n", far, "route", "add", "default", "via", "10.117.0.1")
        out = _run(
            relay_ns,
            *("--host", "10.117.0.1", "--client-host", "10.117.0.2", "--peer-host", "10.117.0.3"),
            *("--other-peer", "10.117.0.4", "--chromium", "--peer-netns", far, *m),
        )
        _check_chromium(out)
        return
    ns = _new_ns(netns)
    # Chromium gathers no candidate at all in a namespace whose only interface is loopback (it
    # considers itself offline): a veth pair inside the namespace with a default route, used
    # for nothing else (this kernel has no dummy interfaces).
    tag = ns.rsplit("-", 1)[1]
    a, b = f"h17e{tag}x", f"h17e{tag}y"
    _ip("-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
    _ip("-n", ns, "addr", "add", "10.118.0.1/24", "dev", a)
    _ip("-n", ns, "link", "set", a, "up")
    _ip("-n", ns, "link", "set", b, "up")
    _ip("-n", ns, "route", "add", "default", "via", "10.118.0.2", "dev", a)
    out = _run(
        ns,
        *("--host", "127.0.0.1", "--client-host", "127.0.0.1", "--peer-host", "127.0.0.1"),
        *("--other-peer", "127.0.0.2", "--chromium", *m),
    )
    _check_chromium(out)


def _check_chromium(out: dict[str, object]) -> None:
    report = out["report"]
    assert isinstance(report, dict)
    assert report.get("ok"), (out["counts"], json.dumps(report)[:1500])
    assert report["message"] == "hello through confedge TURN"
    assert report["followUps"] == 20, report  # the messages after the first crossed too
    counts = out["counts"]
    assert isinstance(counts, dict)
    assert counts["kernel_to_peer"] > 0, counts


# -- offload + turn.relay_multiplex (shared relay sockets) ------------------------------------


def _check_mux(out: dict[str, Any], n: int) -> None:
    """What offload_scenario._mux() saw: 9 allocations on 4 shared sockets, n packets each way
    per allocation, then the 508, stray peers, a channel kept in user space, an allocation's
    end, a freed peer claimed again and a lapsed permission."""
    k = 9
    # The native plane puts an allocation on its relay thread's least-used socket, and the
    # thread follows the client's 5-tuple hash: 9 allocations use 2 to 4 of the 4 sockets
    # (each thread has 2), so some socket holds 3 or more, and another exists for D.
    assert 2 <= out["sockets"] <= 4 and out["largest_group"] >= 3, out
    assert out["binds"] == [200] * k and out["after_bind"]["offloaded"] == k
    # Every allocation's ChannelData both ways, from its shared relayed address, all by the
    # kernel: user space counted none of it.
    assert out["to_peer_ok"] is True and out["to_client_ok"] is True, out
    t = out["after_traffic"]
    assert (t["kernel_to_peer"], t["kernel_to_client"]) == (k * n, k * n), t
    assert (t["user_to_peer"], t["user_to_client"]) == (0, 0), t
    # 508 for a peer claimed by another allocation on the same socket: nothing in the map, the
    # channel not forwarded, the claimed peer still reaching its owner alone (by the kernel).
    assert out["conflict_bind"] == 508
    assert out["after_conflict"] == {**t, "offloaded": k}
    assert out["conflict_leaked"] == 0
    assert out["claimed_to_a"] == 5 and out["claimed_to_b"] == 0
    # An unclaimed port of a permitted IP (ambiguous on the socket) and an unpermitted IP: the
    # kernel forwards neither, user space delivers neither.
    before, after = out["stray_counts"]
    assert out["stray_delivered"] == 0 and before == after
    # A channel kept out of the kernel on a shared socket: its peer's packets pass the TC
    # program and user space demultiplexes them (both ways); C on the same socket stays in
    # the kernel.
    before, after = out["user_space_counts"]
    assert out["user_space_b"] == [5, 5] and out["kernel_c"] == 5
    assert after["user_to_client"] - before["user_to_client"] == 5
    assert after["user_to_peer"] - before["user_to_peer"] == 5
    assert after["kernel_to_client"] - before["kernel_to_client"] == 5  # C's
    # A's allocation ends: its channel leaves the map (B's was already out), the shared socket
    # keeps serving C by the kernel; A's peer, now free, is bound by C and offloaded for C.
    assert out["refresh0"] == 200
    assert out["after_end"] == {"offloaded": k - 2, "allocs": k - 1}
    assert out["c_after_end"] == 5
    assert out["rebind_freed"] == 200
    before, after, offloaded = out["freed_counts"]
    assert out["freed_to_c"] == [5, True] and offloaded == k - 1
    assert after["kernel_to_client"] - before["kernel_to_client"] == 5
    assert after["user_to_client"] == before["user_to_client"]
    # E's permission lapses (3 s): its channel leaves the map at once; nothing more is relayed
    # on it either way, by the kernel or by user space (RFC 8656 §9, §12: the channel is still
    # bound, but its peer has no permission), while D on another socket is still forwarded by
    # the kernel.
    assert out["e_shares"] is True and out["e_bind"] == 200
    assert out["e_before"] == [1, k] and out["e_after_offloaded"] == k - 1
    assert out["e_after_delivered"] == [0, 0]
    assert out["d_still"] == 5
    before, after = out["e_counts"]
    assert after["kernel_to_peer"] == before["kernel_to_peer"]
    assert after["kernel_to_client"] - before["kernel_to_client"] == 5  # D's only
    assert (after["user_to_peer"], after["user_to_client"]) == (
        before["user_to_peer"],
        before["user_to_client"],
    )
    # A CreatePermission renews it: the bound channel is offloaded and relayed again.
    assert out["e_renew"] == 200 and out["e_renewed_offloaded"] == k
    assert out["e_renewed_delivered"] == [1, 1]


@pytest.mark.parametrize("dataplane", ["native", "python"])
def test_offload_with_relay_multiplex_on_loopback(netns: list[str], dataplane: str) -> None:
    """turn.offload = "ebpf" with turn.relay_multiplex = 4 on the namespace's loopback, on both
    data planes (each demultiplexes what the kernel leaves to it)."""
    if dataplane == "native":
        from confedge.turn.native import native_available

        ok, why = native_available()
        if not ok:
            pytest.skip(f"native data plane: {why}")
    ns = _new_ns(netns, "i17mux")
    _ip("-n", ns, "addr", "add", "127.0.0.2/8", "dev", "lo")
    out = _run(
        ns,
        *("--host", "127.0.0.1", "--client-host", "127.0.0.1", "--peer-host", "127.0.0.1"),
        *("--other-peer", "127.0.0.2", "--count", "20", "--multiplex", "4"),
        *("--dataplane", dataplane),
    )
    _check_mux(out, 20)
    assert "clsact" not in _ns(ns, "tc", "qdisc", "show", "dev", "lo").stdout


def _settle_ipv6(*namespaces: str) -> None:
    """Wait (at most 5 s) until no address of the just-made veth is tentative: a neighbour
    solicitation sent before (the link-local addresses still in DAD) goes unanswered, and the
    first packets to a new neighbour wait for the retransmission 1 s later, in the kernel or in
    user space alike.  A host's real interfaces are up long before the relay starts."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not any(_ns(ns, "ip", "-6", "addr", "show", "tentative").stdout for ns in namespaces):
            return
        time.sleep(0.1)


@pytest.mark.parametrize("hosts", [V4_HOSTS, V6_HOSTS], ids=["ipv4", "ipv6"])
def test_offload_with_relay_multiplex_on_veth(netns: list[str], hosts: tuple[str, ...]) -> None:
    """The same across a veth pair (client and peers in the far namespace), IPv4 and IPv6."""
    relay_ns, far_ns = _veth_pair(netns, hosts, "i17mux")
    if ":" in hosts[0]:
        _settle_ipv6(relay_ns, far_ns)
    out = _run(
        relay_ns,
        *("--host", hosts[0], "--client-host", hosts[1], "--peer-host", hosts[2]),
        *("--other-peer", hosts[3], "--count", "20", "--multiplex", "4"),
        *("--peer-netns", far_ns),
    )
    _check_mux(out, 20)


@pytest.mark.parametrize("mux", [0, 4], ids=["own-ports", "relay_multiplex=4"])
@pytest.mark.parametrize("where", ["lo", "veth"])
def test_offload_relay_to_relay_with_user_space_peer(
    netns: list[str], where: str, mux: int
) -> None:
    """Client A's channel points at client B's relayed address; B has a permission but no
    channel (Data indications, relayed by user space).  On the veth, the kernel must not
    rewrite A's ChannelData into a packet from this host's own address that it cannot finish
    (handed to lo, it is dropped as a martian source): user space relays those, and B gets
    every one (what made Chromium's relay-to-relay test through the offload flaky)."""
    if where == "lo":
        ns, extra = _new_ns(netns, "i17mux"), ()
        hosts = ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2")
    else:
        ns, far = _veth_pair(netns, V4_HOSTS, "i17mux")
        hosts, extra = V4_HOSTS, ("--peer-netns", far)
    out = _run(
        ns,
        *("--host", hosts[0], "--client-host", hosts[1], "--peer-host", hosts[2]),
        *("--other-peer", hosts[3], "--count", "10", "--local-peer", "--multiplex", str(mux)),
        *extra,
    )
    assert out["bind"] == 200 and out["perm"] == 200
    assert out["b_got"] == 10 and out["b_ok"] is True, out
