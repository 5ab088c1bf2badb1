"""The kernel-offload scenario, run inside a network namespace made by test_turn_offload_netns.py.

Not a test module itself: it must run in its own process, because the relay has to live in the
test's namespace (the offload attaches to that namespace's interfaces, never the host's).  It
starts TurnService with ``turn.offload = "ebpf"`` on ``--host``, makes a client and a peer (in
the namespace ``--peer-netns`` when given: the veth case), drives ChannelData both ways and
prints one JSON object of what it saw; the test asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confedge.stun import (
    Attr,
    Method,
    MsgClass,
    decode_xor_address,
    encode_channel_number,
    encode_xor_address,
    new_transaction_id,
    parse_message,
)
from confedge.turn.service import TurnService
from confedge.turn.testing import UdpTurnClient, response_code, turn_config

_CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def _in_netns(name: str) -> Iterator[None]:
    """Sockets made inside are in namespace ``name`` (the veth case's far side; none: here)."""
    if not name:
        yield
        return
    home_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/run/netns/{name}")
        yield
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(home_fd, _CLONE_NEWNET)
        os.close(home_fd)


async def _bind(cli: UdpTurnClient, ch: int, addr: tuple[str, int]) -> int:
    """ChannelBind ``ch`` to ``addr``: the response code (0 when nothing came back).

    XOR-PEER-ADDRESS of an IPv6 peer is XORed with the transaction ID too (RFC 8489 §14.2), so
    the request is built here with its ID (a 438 retry needs a new one)."""
    r = None
    for _ in range(2):
        tid = new_transaction_id()
        attrs = [
            (Attr.CHANNEL_NUMBER, encode_channel_number(ch)),
            (Attr.XOR_PEER_ADDRESS, encode_xor_address(addr[0], addr[1], tid)),
        ]
        r = await cli.transact(cli.build(Method.CHANNEL_BIND, attrs, tid, True), tid)
        if r is None or r.msg_class == MsgClass.SUCCESS or r.get(Attr.NONCE) is None:
            break
        cli.nonce = r.get(Attr.NONCE)
    return 0 if r is None else response_code(r)


async def _recv(sock: socket.socket, timeout: float) -> tuple[bytes, Any] | None:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), timeout)
    except TimeoutError:
        return None


async def _recv_all(sock: socket.socket, timeout: float) -> list[bytes]:
    """Every datagram on a connected socket until none came for ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout))
        except TimeoutError:
            return got


async def _drain(sock: socket.socket, timeout: float = 0.3) -> list[tuple[bytes, Any]]:
    got = []
    while (r := await _recv(sock, timeout)) is not None:
        got.append(r)
    return got


def _counts(svc: TurnService) -> dict[str, int]:
    assert svc.dataplane is not None and svc.offload is not None
    user = svc.dataplane.totals()
    kern = AllocTotals(svc)
    return {
        "user_to_peer": user.pkts_to_peer,
        "user_to_client": user.pkts_to_client,
        "kernel_to_peer": kern.to_peer,
        "kernel_to_client": kern.to_client,
        "kernel_bytes_to_peer": kern.bytes_to_peer,
        "offloaded_channels": svc.offload.offloaded_channels(),
        # What the metrics (admin/render.py) and the stop line read: user space + kernel.
        "stats_to_peer": svc.stats()["packets_to_peer"],
        "stats_to_client": svc.stats()["packets_to_client"],
    }


class AllocTotals:
    def __init__(self, svc: TurnService) -> None:
        off = svc.offload
        assert off is not None and svc.core is not None
        self.to_peer = self.to_client = self.bytes_to_peer = 0
        for alloc_id in svc.core.allocations:
            k = off.kernel_counters(alloc_id)
            self.to_peer += k.pkts_to_peer
            self.to_client += k.pkts_to_client
            self.bytes_to_peer += k.bytes_to_peer


async def _uclient(svc: TurnService, args: argparse.Namespace) -> dict[str, Any]:
    """coturn's turnutils_uclient (channels, -c: no RTCP pair) through the offloaded relay to
    turnutils_peer (echo), both in ``--peer-netns`` when given; bounded by a timeout."""
    pre = ["ip", "netns", "exec", args.peer_netns] if args.peer_netns else []
    port = 47000 + os.getpid() % 1000
    peer = await asyncio.create_subprocess_exec(
        *pre, "turnutils_peer", "-p", str(port), "-L", args.peer_host,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(0.3)
    try:
        proc = await asyncio.create_subprocess_exec(
            *pre, "turnutils_uclient", "-c", "-p", str(svc.port), "-n", str(args.uclient),
            "-u", "turnuser", "-w", "turnpass", "-e", args.peer_host, "-r", str(port), args.host,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            text, _ = await asyncio.wait_for(proc.communicate(), 40)
        except TimeoutError:
            proc.kill()
            text, _ = await proc.communicate()
        counts = _counts_all(svc)
    finally:
        peer.terminate()
        await peer.wait()
    return {"uclient": text.decode(errors="replace")[-3000:], "counts": counts}


CHROMIUM_SECRET = "offload-chromium-secret"


async def _chromium(svc: TurnService, args: argparse.Namespace) -> dict[str, Any]:
    """Chromium's DataChannel relay-to-relay through the offloaded relay (the e2e test's driver;
    in ``--peer-netns`` when given, through a ``node`` wrapper that enters it)."""
    e2e = Path(__file__).resolve().parent.parent / "e2e"
    sys.path.insert(0, str(e2e))
    import test_turn_chromium as chromium_case  # the driver wrapper and the REST credential

    if args.peer_netns:
        node = shutil.which("node")
        wrapper = Path(f"/tmp/{args.peer_netns}-node")
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {args.peer_netns} {node} "$@"\n')
        wrapper.chmod(0o700)
        chromium_case.shutil.which = lambda _name: str(wrapper)  # type: ignore[assignment]
    username, credential = chromium_case.rest_credential(CHROMIUM_SECRET, "offload")
    url = f"turn:{args.host}:{svc.port}?transport=udp"
    # 20 more messages after the first: Chromium sends its first packets to a peer as Send
    # indications until its ChannelBind is answered, and under load a session of one message
    # could end before any ChannelData (what the kernel forwards) was sent.
    report = await chromium_case._chromium(
        url, username, credential, timeout_ms=12000, follow_ups=20
    )
    return {"report": report, "counts": _counts_all(svc)}


def _counts_all(svc: TurnService) -> dict[str, int]:
    """User-space and kernel counters over every allocation (live ones; uclient keeps them)."""
    assert svc.dataplane is not None and svc.offload is not None
    user = svc.dataplane.totals()
    kern = svc.offload.kernel_totals()
    return {
        "user_to_peer": user.pkts_to_peer,
        "user_to_client": user.pkts_to_client,
        "kernel_to_peer": kern.pkts_to_peer,
        "kernel_to_client": kern.pkts_to_client,
    }


async def _mux(svc: TurnService, args: argparse.Namespace) -> dict[str, Any]:
    """Offload + ``turn.relay_multiplex``: many allocations on each shared relay socket.

    9 allocations on 4 shared sockets (so one socket holds 3 or more: A, B, C), each with a
    channel to a peer of its own: what the kernel must forward and what it must leave to user
    space, where the shared socket's demultiplexing (turn/multiplex.py, _native.c) decides."""
    assert svc.core is not None and svc.offload is not None
    off, core = svc.offload, svc.core
    v6 = ":" in args.host
    family = socket.AF_INET6 if v6 else socket.AF_INET
    k, n = 9, args.count
    out: dict[str, Any] = {}
    with _in_netns(args.peer_netns):
        peers = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(k + 2)]
        for p in peers:
            p.bind((args.peer_host, 0))
        intruder = socket.socket(family, socket.SOCK_DGRAM)
        intruder.bind((args.other_peer, 0))
        server, local = (args.host, svc.port), (args.client_host, 0)
        clis = [
            UdpTurnClient(server, "turnuser", "turnpass", "example.test", local=local)
            for _ in range(k + 3)  # k, then E and up to two more tries at a shared socket
        ]
    socks = [*peers, intruder, *(c.sock for c in clis)]
    for s in socks:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    paddr = [p.getsockname()[:2] for p in peers]

    async def from_relay(i: int, timeout: float = 0.2) -> list[tuple[bytes, Any]]:
        return await _drain(peers[i], timeout)

    async def at_client(j: int, timeout: float = 0.2) -> list[bytes]:
        return await _recv_all(clis[j].sock, timeout)

    try:
        relay: list[tuple[str, int]] = []
        for cl in clis[:k]:
            resp = await cl.allocate(6 if v6 else 4)
            assert resp is not None and resp.msg_class == MsgClass.SUCCESS, resp
            relay.append(
                decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)
            )
        groups: dict[tuple[str, int], list[int]] = {}
        for j, r in enumerate(relay):
            groups.setdefault(r, []).append(j)
        out["sockets"] = len(groups)
        out["largest_group"] = max(len(g) for g in groups.values())
        a, b, c = max(groups.values(), key=len)[:3]
        d = next(j for j in range(k) if relay[j] != relay[a])  # on another shared socket
        out["binds"] = [await _bind(clis[j], 0x4001, paddr[j]) for j in range(k)]
        out["after_bind"] = _counts_all(svc) | {"offloaded": off.offloaded_channels()}
        # Both ways for every allocation: from its (shared) relayed address to its own peer.
        for j in range(k):
            for i in range(n):
                clis[j].sock.send(struct.pack("!HHHH", 0x4001, 4, j, i))
        ok_to_peer = True
        for j in range(k):
            got = [(d, src[:2]) for d, src in await from_relay(j)]
            ok_to_peer &= sorted(got) == sorted(
                (struct.pack("!HH", j, i), relay[j]) for i in range(n)
            )
        for j in range(k):
            for i in range(n):
                peers[j].sendto(struct.pack("!HH", j, i), relay[j])
        ok_to_client = True
        for j in range(k):
            ok_to_client &= sorted(await at_client(j)) == sorted(
                struct.pack("!HHHH", 0x4001, 4, j, i) for i in range(n)
            )
        out["to_peer_ok"], out["to_client_ok"] = ok_to_peer, ok_to_client
        out["after_traffic"] = _counts_all(svc) | {"offloaded": off.offloaded_channels()}
        # 508: B (A's socket) binds A's peer, claimed by A on that socket.  Nothing enters the
        # map; B's ChannelData on it is not forwarded; A's peer still reaches A alone.
        out["conflict_bind"] = await _bind(clis[b], 0x4002, paddr[a])
        out["after_conflict"] = _counts_all(svc) | {"offloaded": off.offloaded_channels()}
        clis[b].sock.send(struct.pack("!HH", 0x4002, 4) + b"nope")
        out["conflict_leaked"] = len(await from_relay(a))
        for i in range(5):
            peers[a].sendto(b"A%d" % i, relay[a])
        out["claimed_to_a"] = len(await at_client(a))
        out["claimed_to_b"] = len(await at_client(b, 0.1))
        # A port nobody claimed, from an IP every allocation of the socket has a permission
        # for (ambiguous: dropped by user space), and an IP without any permission: neither is
        # forwarded by the kernel nor delivered to anyone.
        before = _counts_all(svc)
        peers[k].sendto(b"unclaimed", relay[a])
        intruder.sendto(b"intruder", relay[a])
        out["stray_delivered"] = sum([len(await at_client(j, 0.1)) for j in (a, b, c)], 0)
        out["stray_counts"] = [before, _counts_all(svc)]
        # An allocation on the shared socket whose channel is not offloaded (what a bandwidth
        # cap does): its peer's packets pass the TC program and are demultiplexed in user
        # space; A and C on the same socket stay in the kernel.
        off.keep_in_user_space(core_id(svc, clis[b]))
        before = _counts_all(svc)
        for i in range(5):
            peers[b].sendto(b"B%d" % i, relay[b])
            peers[c].sendto(b"C%d" % i, relay[c])
            clis[b].sock.send(struct.pack("!HH", 0x4001, 2) + b"b%d" % i)
        out["user_space_b"] = [len(await at_client(b)), len(await from_relay(b))]
        out["kernel_c"] = len(await at_client(c))
        out["user_space_counts"] = [before, _counts_all(svc)]
        # A's allocation ends (Refresh with LIFETIME 0, RFC 8656 §7.3): its channel leaves the
        # map, the shared socket stays for B and C; A's peer is free, and C binds it.
        ended = await clis[a].request(Method.REFRESH, [(Attr.LIFETIME, struct.pack("!I", 0))])
        out["refresh0"] = 0 if ended is None else response_code(ended)
        out["after_end"] = {"offloaded": off.offloaded_channels(), "allocs": len(core.allocations)}
        for i in range(5):
            peers[c].sendto(b"C%d" % i, relay[c])
        out["c_after_end"] = len(await at_client(c))
        out["rebind_freed"] = await _bind(clis[c], 0x4002, paddr[a])
        before = _counts_all(svc)
        for i in range(5):
            peers[a].sendto(b"a%d" % i, relay[c])
        back = await at_client(c)
        out["freed_to_c"] = [len(back), all(g[:2] == b"\x40\x02" for g in back)]
        out["freed_counts"] = [before, _counts_all(svc), off.offloaded_channels()]
        # A permission that lapses (3 s for this allocation only) takes its channel out of the
        # map at once; D's on another socket and C's stay.
        core.s = dataclasses.replace(core.s, permission_lifetime=3)
        # E must land on a socket that already holds an allocation. Its thread follows its
        # client's 5-tuple hash, and a thread that got at most one of the k allocations still
        # has an empty socket (its fewest-allocations pick). Such a try stays allocated, so it
        # fills that socket; at most 4 - sockets (<= 2) tries can miss, so the third shares.
        seen = set(groups)
        e, relay_e = -1, ("", 0)
        for e in range(k, k + 3):
            resp = await clis[e].allocate(6 if v6 else 4)
            assert resp is not None and resp.msg_class == MsgClass.SUCCESS, resp
            tid = resp.transaction_id
            relay_e = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", tid)
            if relay_e in seen:
                break
            seen.add(relay_e)
        out["e_shares"] = relay_e in seen
        out["e_bind"] = await _bind(clis[e], 0x4001, paddr[k + 1])
        peers[k + 1].sendto(b"e0", relay_e)
        out["e_before"] = [len(await at_client(e)), off.offloaded_channels()]
        await asyncio.sleep(4.5)
        out["e_after_offloaded"] = off.offloaded_channels()
        before = _counts_all(svc)
        peers[k + 1].sendto(b"e1", relay_e)
        clis[e].sock.send(struct.pack("!HH", 0x4001, 2) + b"e2")
        out["e_after_delivered"] = [len(await at_client(e)), len(await from_relay(k + 1))]
        for i in range(5):
            peers[d].sendto(b"D%d" % i, relay[d])
        out["d_still"] = len(await at_client(d))
        out["e_counts"] = [before, _counts_all(svc)]
        # The channel is still bound (600 s): a CreatePermission for the peer's IP renews it,
        # back in the map and relayed by the kernel both ways.
        out["e_renew"] = await clis[e].create_permission(paddr[k + 1][0])
        out["e_renewed_offloaded"] = off.offloaded_channels()
        peers[k + 1].sendto(b"e3", relay_e)
        clis[e].sock.send(struct.pack("!HH", 0x4001, 2) + b"e4")
        out["e_renewed_delivered"] = [len(await at_client(e)), len(await from_relay(k + 1))]
    finally:
        for s in socks:
            s.close()
        await svc.close()
    return out


def core_id(svc: TurnService, cli: UdpTurnClient) -> int:
    """The allocation id of ``cli``'s allocation (by its 5-tuple's client address)."""
    assert svc.core is not None
    for alloc_id, alloc in svc.core.allocations.items():
        if (alloc.client.ip, alloc.client.port) == cli.local:
            return alloc_id
    raise LookupError(cli.local)


async def _local_peer(svc: TurnService, args: argparse.Namespace) -> dict[str, Any]:
    """Client A's channel to client B's relayed address (relay to relay), while B has only a
    permission (no channel: Data indications, user space).  The kernel may take A's ChannelData
    only if it can also deliver it; B must get every datagram either way."""
    v6 = ":" in args.host
    with _in_netns(args.peer_netns):
        server, local = (args.host, svc.port), (args.client_host, 0)
        a = UdpTurnClient(server, "turnuser", "turnpass", "example.test", local=local)
        b = UdpTurnClient(server, "turnuser", "turnpass", "example.test", local=local)
    out: dict[str, Any] = {}
    try:
        relays = []
        for c in (a, b):
            r = await c.allocate(6 if v6 else 4)
            assert r is not None and r.msg_class == MsgClass.SUCCESS, r
            relays.append(
                decode_xor_address(r.get(Attr.XOR_RELAYED_ADDRESS) or b"", r.transaction_id)
            )
        out["bind"] = await _bind(a, 0x4001, relays[1])
        out["perm"] = await b.create_permission(args.host)
        n = args.count
        for i in range(n):
            a.sock.send(struct.pack("!HH", 0x4001, 8) + struct.pack("!Q", i))
        got = await _recv_all(b.sock, 0.5)
        data = [m.get(Attr.DATA) for m in map(parse_message, got) if m.method == Method.DATA]
        out["b_got"] = len(got)
        out["b_ok"] = sorted(data) == sorted(struct.pack("!Q", i) for i in range(n))
        out["counts"] = _counts_all(svc)
    finally:
        a.close()
        b.close()
        await svc.close()
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.chromium:
        # Browsers use REST credentials (permissive mode); each allocation's peer is the other's
        # relay address on loopback (test_turn_chromium.py explains the set-up).
        # Permissive mode caps bandwidth by default, and a capped allocation is never offloaded
        # (docs/TURN.md): lift the caps, as an operator offloading permissive media would.
        extra: dict[str, Any] = {
            "mode": "permissive",
            "secrets": [CHROMIUM_SECRET],
            "bandwidth_per_allocation": "unlimited",
            "bandwidth_per_user": "unlimited",
        }
        peers = ["127.0.0.0/8", f"{args.host}/32"]
    else:
        extra = {}
        peers = [args.peer_host, args.other_peer] + ([args.host] if args.local_peer else [])
    v6 = ":" in args.host  # IPv6 end to end: a v6 listener, relay address, client and peers
    cfg = turn_config(
        **extra,
        host=args.host,
        relay_ports="40000-40999",
        allowed_peers=peers,
        media_nodes=[args.client_host + ("/128" if v6 else "/32")],
        offload="ebpf",
        relay_multiplex=args.multiplex,
        dataplane=args.dataplane,
        sections={
            "server": {
                "domain": "example.test",
                "internal_address": args.host,
                "state_dir": "/tmp",
                "external_address": args.host,
            }
        },
    )
    svc = TurnService(cfg)
    await svc.start()
    assert svc.core is not None and svc.offload is not None
    if args.uclient:
        try:
            return await _uclient(svc, args)
        finally:
            await svc.close()
    if args.chromium:
        try:
            return await _chromium(svc, args)
        finally:
            await svc.close()
    if args.local_peer:
        return await _local_peer(svc, args)
    if args.multiplex:
        return await _mux(svc, args)
    # Short lifetimes so that expiry is observable in seconds (the same timers as in production).
    svc.core.s = dataclasses.replace(svc.core.s, channel_lifetime=3, permission_lifetime=3)
    with _in_netns(args.peer_netns):
        family = socket.AF_INET6 if v6 else socket.AF_INET
        peer = socket.socket(family, socket.SOCK_DGRAM)
        peer.bind((args.peer_host, 0))
        other = socket.socket(family, socket.SOCK_DGRAM)
        other.bind((args.other_peer, 0))
        cli = UdpTurnClient(
            (args.host, svc.port),
            "turnuser",
            "turnpass",
            "example.test",
            local=(args.client_host, 0),
        )
    for s in (peer, other, cli.sock):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    paddr = peer.getsockname()[:2]  # (host, port) of either family
    try:
        resp = await cli.allocate(6 if v6 else 4)
        assert resp is not None and resp.msg_class == MsgClass.SUCCESS, resp
        raddr = decode_xor_address(resp.get(Attr.XOR_RELAYED_ADDRESS) or b"", resp.transaction_id)
        out["relay"] = list(raddr)
        out["client"] = list(cli.local)
        out["peer"] = list(paddr)
        out["listener"] = [args.host, svc.port]

        async def bind(ch: int, addr: tuple[str, int]) -> int:
            return await _bind(cli, ch, addr)

        # Unbound channel: never forwarded (user space drops it, RFC 8656 §12.4).
        cli.sock.send(struct.pack("!HH", 0x4002, 4) + b"nope")
        out["unbound_delivered"] = len(await _drain(peer))
        out["bind"] = await bind(0x4001, paddr)
        out["after_bind"] = _counts(svc)
        n = args.count
        for i in range(n):
            cli.sock.send(struct.pack("!HH", 0x4001, 8) + struct.pack("!Q", i))
        got = await _drain(peer)
        out["to_peer_delivered"] = len(got)
        out["to_peer_ok"] = all(src[:2] == tuple(raddr) for _, src in got) and sorted(
            struct.unpack("!Q", d)[0] for d, _ in got
        ) == list(range(n))
        for i in range(n):
            peer.sendto(struct.pack("!Q", i) + b"x", tuple(raddr))
        back = await _recv_all(cli.sock, 0.3)
        out["to_client_delivered"] = len(back)
        out["to_client_ok"] = sorted(back) == sorted(
            struct.pack("!HH", 0x4001, 9) + struct.pack("!Q", i) + b"x" for i in range(n)
        )
        out["after_traffic"] = _counts(svc)
        # A peer without a permission (another IP) sending to the relay: never forwarded.
        other.sendto(b"intruder", tuple(raddr))
        await asyncio.sleep(0.2)
        out["other_peer_counts"] = _counts(svc)
        # Expiry: nothing refreshes the channel; after its lifetime (3 s here) plus one timer
        # tick the core removes it, and the kernel must stop forwarding.
        await asyncio.sleep(5.0)
        out["after_expiry"] = _counts(svc)
        cli.sock.send(struct.pack("!HH", 0x4001, 4) + b"late")
        out["expired_delivered"] = len(await _drain(peer, 0.5))
        out["final"] = _counts(svc)
        # Bound again: offloaded again.  Then taken out of the kernel for good (what a
        # bandwidth cap does, docs/TURN.md): user space relays from the next packet on.
        out["rebind"] = await bind(0x4001, paddr)
        out["after_rebind"] = _counts(svc)
        (alloc_id,) = list(svc.core.allocations)
        svc.offload.keep_in_user_space(alloc_id)
        for i in range(5):
            cli.sock.send(struct.pack("!HH", 0x4001, 8) + struct.pack("!Q", i))
        out["user_space_delivered"] = len(await _drain(peer))
        out["after_keep_in_user_space"] = _counts(svc)
        snmp = Path("/proc/net/snmp").read_text().splitlines()
        out["udp_snmp"] = [line.split() for line in snmp if line.startswith("Udp:")]
    finally:
        cli.close()
        peer.close()
        other.close()
        await svc.close()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--client-host", required=True)
    p.add_argument("--peer-host", required=True)
    p.add_argument("--other-peer", required=True)
    p.add_argument("--peer-netns", default="")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--uclient", type=int, default=0, help="run turnutils_uclient with -n N")
    p.add_argument("--multiplex", type=int, default=0, help="turn.relay_multiplex: _mux()")
    p.add_argument("--local-peer", action="store_true", help="relay to relay: _local_peer()")
    p.add_argument("--dataplane", default="auto", help="turn.dataplane")
    p.add_argument("--chromium", action="store_true", help="Chromium's DataChannel relay test")
    a = p.parse_args()
    try:
        result = asyncio.run(main(a))
    except Exception as exc:  # reported to the test, which shows it
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    print(json.dumps(result))
