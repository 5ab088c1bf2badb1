"""Load generator for the TURN benchmark: client worker processes and a UDP peer sink.

Why this shape:

* The same generator drives coturn and confedge, so it speaks TURN with its own tiny codec
  (stunmini) and never imports confedge.
* Allocation setup is pipelined: each worker keeps a window of allocations in flight on
  non-blocking sockets behind one epoll selector, so "allocations per second" measures the
  server, not one client's round-trip latency.
* Relaying is measured where it matters, at the peer: a separate sink process counts the
  packets that the relay actually delivered. Workers count what they offered. Both counters live
  in shared memory so the orchestrator samples them at the window edges without any messaging
  on the hot path.
* Hot loops are plain `sock.send(frame)` calls on connected sockets (no per-packet allocation);
  a direct client-to-sink run gives the generator's own ceiling for comparison.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import cgen
import stunmini as sm

RTO = 0.5  # first retransmission timeout; RFC 8489 §6.2.1 suggests 500 ms
MAX_TRIES = 6


@dataclass(frozen=True)
class Target:
    """Where and how a worker reaches the TURN server and the peer."""

    server: tuple[str, int]
    username: str
    password: str
    peer: tuple[str, int]
    # Each allocation its own peer address (spread_peer(), the sink's port): with confedge's
    # turn.relay_multiplex (or coturn's --multiplex-peer) a peer transport address can serve one
    # allocation per shared socket, so 50 allocations cannot all name the one sink address.
    spread_peers: bool = False


def spread_peer(worker: int, j: int) -> str:
    """The loopback address of allocation ``j`` of worker ``worker`` (the sink binds 0.0.0.0)."""
    return f"127.{100 + worker}.{j // 250}.{j % 250 + 1}"


@dataclass
class _Alloc:
    sock: socket.socket
    step: int = 0  # index into the step list
    realm: str = ""
    nonce: bytes = b""
    key: bytes = b""
    txid: bytes = b""
    msg: bytes = b""
    sent_at: float = 0.0
    tries: int = 0
    relay: tuple[str, int] | None = None
    done: bool = False
    failed: str = ""
    peer_value: bytes = b""  # its own XOR-PEER-ADDRESS (Target.spread_peers)


# Steps of one allocation's setup: 401 probe, authenticated Allocate, then optional
# CreatePermission and ChannelBind (the order browsers and conferencing nodes use).
PROBE, ALLOCATE, PERMISSION, CHANNEL = "probe", "allocate", "permission", "channel"
CHANNEL_NUMBER = 0x4000


class Engine:
    """Pipelined TURN allocation setup/teardown over many UDP client sockets."""

    def __init__(self, target: Target) -> None:
        self.t = target
        self.sel = selectors.DefaultSelector()
        self.peer_value = sm.xor_address_value(*target.peer)

    def _request(self, a: _Alloc, step: str) -> None:
        attrs: list[tuple[int, bytes]]
        if step == PROBE:
            method = sm.ALLOCATE
            attrs = [(sm.ATTR_REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")]
            key = None
        else:
            auth = [
                (sm.ATTR_USERNAME, self.t.username.encode()),
                (sm.ATTR_REALM, a.realm.encode()),
                (sm.ATTR_NONCE, a.nonce),
            ]
            key = a.key
            if step == ALLOCATE:
                method = sm.ALLOCATE
                attrs = [(sm.ATTR_REQUESTED_TRANSPORT, b"\x11\x00\x00\x00"), *auth]
            elif step == PERMISSION:
                method = sm.CREATE_PERMISSION
                attrs = [(sm.ATTR_XOR_PEER_ADDRESS, a.peer_value or self.peer_value), *auth]
            elif step == CHANNEL:
                method = sm.CHANNEL_BIND
                attrs = [
                    (sm.ATTR_CHANNEL_NUMBER, bytes([CHANNEL_NUMBER >> 8, 0, 0, 0])),
                    (sm.ATTR_XOR_PEER_ADDRESS, a.peer_value or self.peer_value),
                    *auth,
                ]
            else:  # "release": Refresh with LIFETIME 0 (RFC 8656 §7.2)
                method = sm.REFRESH
                attrs = [(sm.ATTR_LIFETIME, b"\x00\x00\x00\x00"), *auth]
        a.txid, a.msg = sm.build_request(method, attrs, key=key)
        a.tries = 1
        a.sent_at = time.monotonic()
        with contextlib.suppress(OSError):  # treated like a loss: retransmitted on timeout
            a.sock.send(a.msg)

    def _on_response(self, a: _Alloc, steps: Sequence[str], data: bytes) -> None:
        try:
            r = sm.parse_response(data)
        except sm.StunError:
            return
        if r.txid != a.txid:
            return  # a late answer to a retransmission
        step = steps[a.step]
        code = r.error_code
        if step == PROBE:
            if code != 401:
                a.failed = f"probe answered {code or 'success'} instead of 401"
                return
            a.realm = r.attrs.get(sm.ATTR_REALM, b"").decode()
            a.nonce = r.attrs.get(sm.ATTR_NONCE, b"")
            a.key = sm.long_term_key(self.t.username, a.realm, self.t.password)
        elif code == 438:  # stale nonce: retry the same step with the new one (RFC 8489 §9.2.4)
            a.nonce = r.attrs.get(sm.ATTR_NONCE, a.nonce)
            self._request(a, step)
            return
        elif not r.is_success:
            if step == "release":
                a.done = True  # already gone is fine for teardown
                return
            a.failed = f"{step} answered error {code}"
            return
        elif step == ALLOCATE:
            a.relay = r.xor_address(sm.ATTR_XOR_RELAYED_ADDRESS)
        a.step += 1
        if a.step == len(steps):
            a.done = True
        else:
            self._request(a, steps[a.step])

    def run(
        self,
        allocs: list[_Alloc],
        steps: Sequence[str],
        window: int,
        deadline: float,
    ) -> None:
        """Drive every alloc through `steps`, at most `window` in flight, until done or deadline."""
        pending = list(reversed(allocs))
        active: dict[int, _Alloc] = {}

        def start_next() -> None:
            while pending and len(active) < window:
                a = pending.pop()
                a.step = 0
                a.done = False
                a.failed = ""
                active[a.sock.fileno()] = a
                self.sel.register(a.sock, selectors.EVENT_READ, a)
                self._request(a, steps[0])

        def finish(a: _Alloc) -> None:
            self.sel.unregister(a.sock)
            del active[a.sock.fileno()]

        start_next()
        last_scan = time.monotonic()
        while active:
            now = time.monotonic()
            if now > deadline:
                for a in list(active.values()):
                    a.failed = a.failed or f"{steps[a.step]} timed out (benchmark deadline)"
                    finish(a)
                break
            for key, _ in self.sel.select(timeout=0.05):
                a = key.data
                try:
                    data = a.sock.recv(2048)
                except OSError:
                    continue
                self._on_response(a, steps, data)
                if a.done or a.failed:
                    finish(a)
            if now - last_scan > 0.05:  # retransmissions (RFC 8489 §6.2.1, doubling RTO)
                last_scan = now
                for a in list(active.values()):
                    if now - a.sent_at > RTO * (2 ** (a.tries - 1)):
                        if a.tries >= MAX_TRIES:
                            a.failed = f"{steps[a.step]} got no answer after {MAX_TRIES} tries"
                            finish(a)
                            continue
                        a.tries += 1
                        a.sent_at = now
                        with contextlib.suppress(OSError):
                            a.sock.send(a.msg)
            start_next()


def _new_socket(connect_to: tuple[str, int], source_ip: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    s.bind((source_ip, 0))
    s.connect(connect_to)
    s.setblocking(False)
    return s


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def worker_main(
    idx: int, target: Target, conn: Connection, sent: Any, stop: Any
) -> None:  # pragma: no cover - runs in a child process
    """Serve orchestrator commands over `conn` until "quit".

    Commands: ("alloc", n, steps, window, timeout, source_ip) | ("direct", n) | ("blast", size, rate) |
    ("release", window) | ("quit",). `sent[idx]` is this worker's offered-packet counter;
    `stop[0]` != 0 ends a blast.
    """
    engine = Engine(target)
    allocs: list[_Alloc] = []
    direct = False
    while True:
        cmd = conn.recv()
        op = cmd[0]
        if op == "quit":
            break
        if op == "alloc":
            _, n, steps, window, timeout, source_ip = cmd
            fresh = [_Alloc(_new_socket(target.server, source_ip)) for _ in range(n)]
            if target.spread_peers:
                for j, a in enumerate(fresh, start=len(allocs)):
                    a.peer_value = sm.xor_address_value(spread_peer(idx, j), target.peer[1])
            c0, t0 = _cpu(), time.monotonic()
            engine.run(fresh, steps, window, t0 + timeout)
            t1 = time.monotonic()
            ok = [a for a in fresh if a.done]
            errors = sorted({a.failed for a in fresh if a.failed})
            for a in fresh:
                if not a.done:
                    a.sock.close()
            allocs.extend(ok)
            conn.send(("alloc", len(ok), n - len(ok), t0, t1, _cpu() - c0, errors[:3]))
        elif op == "direct":
            # Generator ceiling: the same send loop straight to the sink, no TURN server.
            allocs.extend(_Alloc(_new_socket(target.peer), done=True) for _ in range(cmd[1]))
            direct = True
            conn.send(("direct", cmd[1]))
        elif op == "blast":
            _, size, rate, *c_sender = cmd
            payload = os.urandom(size)
            frame = payload if direct else sm.channel_data(CHANNEL_NUMBER, payload)
            if c_sender and c_sender[0] is not None:
                n_sent, c_cpu = _blast_c(c_sender[0], [a.sock for a in allocs], frame, rate, idx)
                conn.send(("blast", n_sent, c_cpu))
                continue
            sends = [a.sock.send for a in allocs]
            c0 = _cpu()
            n_sent = _blast(sends, frame, rate, idx, sent, stop)
            conn.send(("blast", n_sent, _cpu() - c0))
        elif op == "release":
            if not direct and allocs:
                engine.run(allocs, ["release"], cmd[1], time.monotonic() + 10)
            for a in allocs:
                a.sock.close()
            allocs = []
            direct = False
            conn.send(("release",))
    conn.close()


@dataclass(frozen=True)
class CSender:
    """How a worker runs the C sender (bench/turn/turnload.c) instead of its own loop."""

    binary: str
    slots: str  # the shared counter file (cgen.Slots.path)
    stop_slot: int
    sent0_slot: int  # worker idx counts into sent0_slot + idx
    threads: int = 1
    cpus: str = ""  # comma list to pin the sender threads to, "" = no pinning
    packet: bool = False  # AF_PACKET frames into lo with the sockets' 5-tuples (turnload --packet)


def _blast_c(
    c: CSender, socks: list[socket.socket], frame: bytes, rate: float, idx: int
) -> tuple[int, float]:
    """Blast `frame` on the allocations' sockets from the C sender until the stop slot is set.

    The sockets (connected, already bound to their channel by this worker's handshake) are
    inherited as file descriptors; the C process counts into this worker's `sent` slot itself.
    Returns (packets offered, the C process's CPU seconds).
    """
    if not socks:
        return 0, 0.0
    fds = [s.fileno() for s in socks]
    cmd = [
        c.binary,
        "send",
        "--shm",
        c.slots,
        "--stop",
        str(c.stop_slot),
        "--count",
        str(c.sent0_slot + idx),
        "--frame",
        frame.hex(),
        "--rate",
        str(rate),
        "--threads",
        str(c.threads),
    ]
    if c.cpus:
        cmd += ["--cpus", c.cpus]
    if c.packet:
        cmd.append("--packet")
    proc = subprocess.run(
        [*cmd, *map(str, fds)], pass_fds=fds, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"turnload send failed ({proc.returncode}): {proc.stderr.strip()}")
    summary = cgen.parse_exit_line(proc.stdout)
    return int(summary["packets"]), summary["utime"] + summary["stime"]


def _blast(sends: list[Any], frame: bytes, rate: float, idx: int, sent: Any, stop: Any) -> int:
    """Send `frame` round-robin over the allocations until stop[0]; rate 0 = as fast as possible.

    Paced mode sends in 1 ms ticks (the number due since the start), so a slow tick is caught
    up rather than lost, but the offered rate never exceeds the target over a window.
    """
    n = 0
    k = len(sends)
    if not k:
        return 0
    batch = [sends[i % k] for i in range(max(k, 256))]
    if rate <= 0:
        while not stop[0]:
            for send in batch:
                try:
                    send(frame)
                except OSError:
                    continue  # a full socket buffer: the packet was not offered
                n += 1
            sent[idx] = n
        return n
    t0 = time.monotonic()
    i = 0
    while not stop[0]:
        due = int(rate * (time.monotonic() - t0)) - n
        for _ in range(due):
            try:
                sends[i](frame)
                n += 1
            except OSError:
                pass
            i = i + 1 if i + 1 < k else 0
        sent[idx] = n
        time.sleep(0.001)
    return n


def sink_main(
    port: int, counts: Any, stop: Any, ready: Any, host: str = "127.0.0.1"
) -> None:  # pragma: no cover - runs in a child process
    """Count packets and bytes arriving at the peer address until stop[0].

    counts[0] = packets, counts[1] = bytes, published every 64 packets and on idle, so the
    orchestrator's sample is at most 64 packets stale.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((host, port))  # "0.0.0.0" for spread peers: every 127.x.y.z at this port
    # A blocking socket with SO_RCVTIMEO, not settimeout(): CPython polls before every recv on a
    # socket with a timeout, which would double the sink's syscalls per packet.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))
    ready.set()
    buf = bytearray(4096)
    recv_into = s.recv_into
    packets = 0
    nbytes = 0
    while not stop[0]:
        try:
            for _ in range(64):
                nbytes += recv_into(buf)
                packets += 1
        except OSError:  # EAGAIN after SO_RCVTIMEO: idle
            pass
        counts[0] = packets
        counts[1] = nbytes
    s.close()
