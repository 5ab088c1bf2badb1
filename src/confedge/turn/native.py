"""The native TURN data plane: :class:`NativeDataPlane` and the UDP TURN port it owns.

Why: in the pure-Python backend every relayed packet costs an event-loop callback and one
syscall each way (docs/BENCHMARKS.md).  ``confedge.turn._native`` (C, ``_native.c``) runs N relay
threads with the GIL released that receive and send in batches (recvmmsg/sendmmsg, UDP GSO) and
forward, without Python, everything the control plane has installed:

* client -> peer: ChannelData (RFC 8656 §12) and Send indications (§10.2) whose peer has a
  permission the peer policy judges by IP alone;
* peer -> client: ChannelData when a channel is bound, else a Data indication (§10.3), else a
  counted drop (§9).

Everything else a UDP client sends (STUN requests, Send indications the C side does not judge)
reaches :class:`NativeUdpListener` -- from the control socket (see Steering) or through the
engine's queue, each in arrival order -- and goes to :meth:`TurnCore.handle` exactly as from the
Python listener.  The core is unchanged: it calls
the same :class:`DataPlane` methods, and this class forwards them to the engine's tables.

Threads: the TURN port is N ``SO_REUSEPORT`` UDP sockets bound to the same address, one per
relay thread; the steering program below (else the kernel's hash) picks one per client, so a
client always reaches the same thread, and the allocation it makes lives on that thread (its
relay socket is polled there too).  TCP/TLS clients stay on the Python listeners; their
allocations use the embedded :class:`UdpDataPlane` (their relayed packets must be written to a
Python stream transport).

Steering: one more socket joins the port's ``SO_REUSEPORT`` group, the control socket, and a
classic BPF program in the kernel (``_native.steer``) sends each datagram to a socket by its
first bytes: ChannelData and Send indications to the relay thread of its UDP source port
(port % N), everything else (STUN requests) to the control socket, which the event loop's
thread reads itself.  Why: a request then wakes the one thread that answers it; through a
relay thread it woke that thread, then Python through the engine's eventfd, and paid the
hand-over's latency on every Allocate (docs/BENCHMARKS.md, "Allocation rate").  Without the
program (a kernel that refuses it, or ``CONFEDGE_DATAPLANE_STEER=0``) the kernel hashes each
client to a relay thread and every request takes the relay thread's queue, as before.

Shared relay sockets (``turn.relay_multiplex``, turn/multiplex.py): each thread polls its share
of the shared sockets, and an allocation relays on one of its thread's, so one ``sendmmsg``
carries the round's packets of every allocation on that socket.

Backend choice: ``turn.dataplane`` ("auto", "native", "python"), overridden by the environment
variable ``CONFEDGE_DATAPLANE`` (the test suites run once per backend with it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Any

from confedge import backends

from .dataplane import (
    AllocationCounters,
    CapacityError,
    ClientSink,
    DataPlane,
    PeerTaken,
    RelayGrant,
    UdpDataPlane,
    _taken,
)

try:
    from . import _native
except ImportError as exc:  # not built: no compiler at install time, or CONFEDGE_PURE=1
    _native = None  # type: ignore[assignment]
    # A missing module says nothing more; a broken one (wrong ABI, missing symbol) does.
    _IMPORT_ERROR = "" if "cannot import name" in str(exc) else f" ({exc})"
else:
    _IMPORT_ERROR = ""

__all__ = [
    "NativeDataPlane",
    "NativeTransport",
    "NativeUdpListener",
    "bind_listeners",
    "bind_reuseport",
    "choose_backend",
    "native_available",
]

log = logging.getLogger("confedge.turn")

ENV = "CONFEDGE_DATAPLANE"
# "0": no control socket, every STUN request through a relay thread's queue (for comparison)
STEER_ENV = "CONFEDGE_DATAPLANE_STEER"
LISTENER_BUFFER = 4 * 1024 * 1024  # per listener socket: room for bursts (drops are counted)
QUEUE_LIMIT = 4096  # packets waiting for the control plane; beyond: dropped and counted
# turn.dataplane_coalesce_us: a relay thread that woke for only a few media packets (< 16) while
# its media runs at one packet per this many microseconds or faster pauses this long before it
# waits again, so that steady moderate traffic is moved in batches rather than one wake-up and
# one syscall each way per packet (interrupt coalescing; adds at most this much latency, far
# below any jitter buffer). docs/BENCHMARKS.md has the effect at 100,000 pkt/s.
COALESCE_US = 100
# turn.dataplane_fold_pps: below this many media packets a second in total, one relay thread
# serves every thread's sockets (fewer, fuller wake-ups); above twice this, each its own.
FOLD_PPS = 150_000
USER_SLOTS = 65536  # per-user bandwidth buckets in the engine (_native.c USER_SLOTS)


def native_available() -> tuple[bool, str]:
    """(built and usable here, why not)."""
    if not sys.platform.startswith("linux"):
        return False, "the native data plane needs Linux (epoll, recvmmsg, UDP GSO)"
    if _native is None:
        return False, (
            f"the extension confedge.turn._native is not built{_IMPORT_ERROR}; "
            "install with a C compiler (`make native`, `pip install .`) or set "
            'turn.dataplane = "python"'
        )
    return True, ""


def choose_backend(setting: str) -> str:
    """The backend, "native" or "python", for ``turn.dataplane`` (or CONFEDGE_DATAPLANE).

    Raises ValueError naming the key when "native" is asked for and not available."""
    return backends.choose(
        setting,
        env=ENV,
        key="turn.dataplane",
        available=native_available,
        fell_back=lambda why: log.info("TURN data plane: pure Python (%s)", why),
    )


def thread_count(setting: int) -> int:
    """``turn.dataplane_threads``; 0 = one per core."""
    if setting > 0:
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def bind_reuseport(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` UDP sockets on (host, port) with SO_REUSEPORT (port 0: the first one's port).

    Raises OSError from the first failing bind; no socket is left open then."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setblocking(False)
            s.bind((host, port))
            port = s.getsockname()[1]
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def bind_listeners(
    host: str, port: int, threads: int
) -> tuple[list[socket.socket], socket.socket | None]:
    """The TURN port for ``threads`` relay threads: their sockets and, when the kernel takes the
    steering program, the control socket (see the module docstring); else None.

    Raises OSError from the first failing bind; no socket is left open then."""
    if os.environ.get(STEER_ENV, "1") == "0" or _native is None:
        return bind_reuseport(host, port, threads), None
    socks = bind_reuseport(host, port, threads + 1)
    control = socks.pop()  # bound last: the group's socket number `threads`, as steer() expects
    try:
        _native.steer(socks[0].fileno(), threads)
    except OSError as exc:
        # Closing the last member leaves the others' numbers as they were.
        control.close()
        log.info(
            "TURN: the kernel refused the steering program (%s): STUN requests reach the "
            "control plane through the relay threads",
            exc.strerror or exc,
        )
        return socks, None
    return socks, control


class NativeTransport:
    """``ClientSink.transport`` of a UDP client reached through relay thread ``thread``: answers
    go out of that thread's listener socket (same address and port as the client wrote to)."""

    __slots__ = ("engine", "thread")

    def __init__(self, engine: Any, thread: int) -> None:
        self.engine = engine
        self.thread = thread

    def sendto(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.engine.send(self.thread, data, addr)


class NativeDataPlane(DataPlane):
    """:class:`DataPlane` whose UDP clients are relayed by the C engine.

    Created before the listeners (the core needs it); :meth:`start` hands it the bound listener
    sockets and starts the relay threads."""

    def __init__(
        self,
        *,
        relay_v4: str | None,
        relay_v6: str | None,
        port_range: tuple[int, int],
        loop: asyncio.AbstractEventLoop | None = None,
        gso: bool = True,
        multiplex: int = 0,
        coalesce_us: int = COALESCE_US,
        fold_pps: int = FOLD_PPS,
    ) -> None:
        ok, why = native_available()
        if not ok:
            raise RuntimeError(why)
        # Stream clients (TCP/TLS) and the relay port picking / EVEN-PORT reservations.
        self._py = UdpDataPlane(
            relay_v4=relay_v4,
            relay_v6=relay_v6,
            port_range=port_range,
            loop=loop,
            multiplex=multiplex,
        )
        # turn.relay_multiplex: (family, thread) -> that thread's shared sockets, each
        # [engine index, ip, port, allocations]; alloc_id -> its entry.
        self.multiplex = multiplex
        self._mux: dict[tuple[int, int], list[list[Any]]] = {}
        self._mux_of: dict[int, list[Any]] = {}
        self._gso = gso
        self._coalesce_us = coalesce_us
        self._fold_pps = fold_pps
        self.engine: Any = None
        self.transports: list[NativeTransport] = []
        self._native: set[int] = set()
        self._ended_kernel = 0
        # Which peer IPs the C side may forward Send indications to by itself: those the peer
        # policy allows on every port (see bind_policy).  Until bound: none (all via the core).
        self._send_fast: Callable[[str], bool] = lambda ip: False
        # Bandwidth caps (bytes/s, 0 = unlimited).  Per-user buckets live in the engine's slot
        # array; a username holds a slot while it has native allocations.
        self._caps = (0, 0, 0)
        self._user_slot: dict[str, list[int]] = {}  # user -> [slot, allocations]
        self._slot_of: dict[int, str] = {}  # alloc_id -> user
        # alloc_id -> (family, its own relay port): freed in the port table at its end
        self._port_of: dict[int, tuple[int, int]] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0

    def start(
        self, listeners: Sequence[socket.socket], control: socket.socket | None = None
    ) -> None:
        """Take ownership of the listener sockets (one per relay thread) and of the control
        socket (:func:`bind_listeners`), and start the threads."""
        engine = _native.Engine(
            [s.fileno() for s in listeners],
            queue_limit=QUEUE_LIMIT,
            buffer_bytes=LISTENER_BUFFER,
            gso=self._gso,
            coalesce_us=self._coalesce_us,
            fold_pps=self._fold_pps,
            control_fd=control.fileno() if control is not None else -1,
        )
        for s in listeners:
            s.detach()  # the engine closes them
        if control is not None:
            control.detach()
        engine.start()
        self.engine = engine
        if self._caps[2]:
            engine.set_total_rate(self._caps[2])
        self.transports = [NativeTransport(engine, k) for k in range(len(listeners))]
        if self.multiplex:
            self._start_mux(len(listeners))

    def _start_mux(self, threads: int) -> None:
        """turn.relay_multiplex shared sockets per relay address, spread over the relay threads
        (each socket polled by one; at least one per thread, as an allocation relays on a
        socket of the thread its client reaches).  Raises CapacityError naming the key."""
        count = max(self.multiplex, threads)
        for family in sorted(self.families()):
            try:
                socks = self._py.shared_sockets(family, count)
            except CapacityError as exc:
                raise CapacityError(
                    f"turn.relay_multiplex: cannot bind {count} shared relay sockets: {exc}"
                ) from None
            for k, sock in enumerate(socks):
                ip, port = sock.getsockname()[:2]
                index = self.engine.add_mux(sock.detach(), k % threads, family)
                self._mux.setdefault((family, k % threads), []).append([index, ip, port, 0])

    def bind_policy(self, allowed_on_every_port: Callable[[str], bool]) -> None:
        """Let Send indications to peers for which ``allowed_on_every_port(ip)`` holds be
        forwarded in C (the core's §10.2 checks are then: allocation, permission -- both in the
        engine's tables).  Peers the policy restricts to some ports (the server's own relay
        addresses) keep going through :meth:`TurnCore.handle`."""
        self._send_fast = allowed_on_every_port

    def families(self) -> frozenset[int]:
        return self._py.families()

    def add_allocation(
        self,
        alloc_id: int,
        family: int,
        client_key: Hashable,
        sink: ClientSink,
        *,
        even_port: bool = False,
        reserve_token: bytes | None = None,
        use_token: bytes | None = None,
        dont_fragment: bool = False,
        user: str = "",
    ) -> RelayGrant:
        t = sink.transport
        if not isinstance(t, NativeTransport) or t.engine is not self.engine or sink.addr is None:
            grant = self._py.add_allocation(
                alloc_id,
                family,
                client_key,
                sink,
                even_port=even_port,
                reserve_token=reserve_token,
                use_token=use_token,
                dont_fragment=dont_fragment,
                user=user,
            )
            if self.engine is not None:
                # A stream client, relayed in Python: its username's and the relay's budget
                # are the engine's buckets, the ones its UDP clients spend (one cap each).
                self._py.share_buckets(alloc_id, partial(self.engine.charge, self._take_slot(user)))
                self._slot_of[alloc_id] = user
            return grant
        shared = self._mux.get((family, t.thread))
        entry: list[Any] | None = None
        sock: socket.socket | None = None
        if shared and not (reserve_token or use_token or dont_fragment):
            # turn/multiplex.py: the thread's shared socket with the fewest allocations
            # (an even port: EVEN-PORT is met; a reserved pair, a RESERVATION-TOKEN and
            # DONT-FRAGMENT keep a port of their own)
            entry = min(shared, key=lambda m: m[3])
            ip, port = entry[1], entry[2]
        else:
            sock = self._py.relay_socket(
                family,
                even_port=even_port,
                reserve_token=reserve_token,
                use_token=use_token,
                dont_fragment=dont_fragment,
            )
            ip, port = sock.getsockname()[:2]
        slot = self._take_slot(user)
        try:
            # A port of its own: the engine owns the descriptor from here on (it closes it if
            # this fails). On a shared socket: no descriptor, the socket's engine index.
            self.engine.add_allocation(
                alloc_id,
                t.thread,
                sock.detach() if sock is not None else -1,
                family,
                sink.addr,
                slot,
                self._caps[0],
                entry[0] if entry is not None else -1,
            )
        except BaseException:
            if entry is None:
                self._py.release_port(family, port)
            self._give_slot(user)
            raise
        if entry is None:
            self._port_of[alloc_id] = (family, port)
        else:
            entry[3] += 1
            self._mux_of[alloc_id] = entry
        self._slot_of[alloc_id] = user
        self._native.add(alloc_id)
        return RelayGrant(family, ip, port)

    def release_reservation(self, token: bytes) -> None:
        self._py.release_reservation(token)

    def remove_allocation(self, alloc_id: int) -> AllocationCounters:
        if alloc_id not in self._native:
            if alloc_id in self._slot_of:
                self._give_slot(self._slot_of.pop(alloc_id))
            return self._py.remove_allocation(alloc_id)
        self._native.discard(alloc_id)
        entry = self._mux_of.pop(alloc_id, None)
        if entry is not None:
            entry[3] -= 1
        c = self.engine.remove_allocation(alloc_id)
        own = self._port_of.pop(alloc_id, None)
        if own is not None:
            self._py.release_port(*own)
        self._give_slot(self._slot_of.pop(alloc_id, None))
        if c is None:
            return AllocationCounters()
        self._ended_kernel += c[5]
        return AllocationCounters(c[0], c[1], c[2], c[3], c[4], c[6])

    # -- bandwidth caps -------------------------------------------------------------------

    def set_bandwidth(self, per_allocation: int, per_user: int, total: int) -> None:
        self._caps = (per_allocation, per_user, total)
        self._py.set_bandwidth(per_allocation, per_user, total)
        if self.engine is None:
            return
        self.engine.set_total_rate(total)
        for slot, _ in self._user_slot.values():
            self.engine.set_user_rate(slot, per_user)
        for alloc_id in self._native:
            self.engine.set_allocation_rate(alloc_id, per_allocation)

    def set_allocation_rate(self, alloc_id: int, rate: int) -> None:
        if alloc_id in self._native:
            self.engine.set_allocation_rate(alloc_id, rate)
        else:
            self._py.set_allocation_rate(alloc_id, rate)

    def _take_slot(self, user: str) -> int:
        """The engine slot of ``user``'s bucket (a fresh, full one for a new user); -1 when
        every slot is taken (that user's allocations then have no per-user cap)."""
        entry = self._user_slot.get(user)
        if entry is None:
            if self._free_slots:
                slot = self._free_slots.pop()
            elif self._next_slot < USER_SLOTS:
                slot, self._next_slot = self._next_slot, self._next_slot + 1
            else:
                return -1
            self.engine.set_user_rate(slot, self._caps[1])
            entry = self._user_slot[user] = [slot, 0]
        entry[1] += 1
        return entry[0]

    def _give_slot(self, user: str | None) -> None:
        entry = self._user_slot.get(user) if user is not None else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._user_slot[user]  # type: ignore[arg-type]
            self._free_slots.append(entry[0])

    def add_permission(self, alloc_id: int, peer_ip: str) -> None:
        if alloc_id in self._native:
            self.engine.add_permission(alloc_id, peer_ip, self._send_fast(peer_ip))
        else:
            self._py.add_permission(alloc_id, peer_ip)

    def remove_permission(self, alloc_id: int, peer_ip: str) -> None:
        if alloc_id in self._native:
            self.engine.remove_permission(alloc_id, peer_ip)
        else:
            self._py.remove_permission(alloc_id, peer_ip)

    def add_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None:
        if alloc_id in self._native:
            try:
                self.engine.add_channel(alloc_id, channel, peer)
            except _native.PeerTaken as exc:
                entry = self._mux_of[alloc_id]
                raise PeerTaken(_taken(peer, (entry[1], entry[2]), str(exc))) from None
        else:
            self._py.add_channel(alloc_id, channel, peer)

    def remove_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None:
        if alloc_id in self._native:
            self.engine.remove_channel(alloc_id, channel)
        else:
            self._py.remove_channel(alloc_id, channel, peer)

    def send_to_peer(self, alloc_id: int, peer: tuple[str, int], payload: bytes) -> None:
        if alloc_id in self._native:
            self.engine.send_to_peer(alloc_id, peer, payload)
        else:
            self._py.send_to_peer(alloc_id, peer, payload)

    def client_channel_data(self, client_key: Hashable, data: bytes) -> bool:
        # Only stream clients get here: UDP ChannelData never leaves the engine.
        return self._py.client_channel_data(client_key, data)

    def counters(self, alloc_id: int) -> AllocationCounters:
        if alloc_id not in self._native:
            return self._py.counters(alloc_id)
        c = self.engine.counters(alloc_id)
        if c is None:
            return AllocationCounters()
        return AllocationCounters(c[0], c[1], c[2], c[3], c[4], c[6])

    def totals(self) -> AllocationCounters:
        t = self._py.totals()
        if self.engine is not None:
            n = self.engine.totals()
            t.pkts_to_peer += n[0]
            t.bytes_to_peer += n[1]
            t.pkts_to_client += n[2]
            t.bytes_to_client += n[3]
            t.dropped += n[4]
            t.dropped_bandwidth += n[5]
        return t

    def stats(self) -> dict[str, int]:
        """The engine's own counters: packets each way, syscalls, GSO use and every kind of
        drop (unknown channel, short ChannelData, send failures, control-plane queue full,
        kernel receive-buffer overflows on the listeners and relay sockets)."""
        if self.engine is None:
            return {}
        s: dict[str, int] = self.engine.stats()
        s["kernel_drops_relay"] += self._ended_kernel
        if self._py.multiplex:  # stream clients' shared sockets (the Python plane's)
            for key, value in self._py.mux_stats().items():
                s[key] += value
        return s

    def close(self) -> None:
        for alloc_id in list(self._native):
            self.remove_allocation(alloc_id)
        self._py.close()
        if self.engine is not None:
            self.engine.close()


class NativeUdpListener:
    """The UDP TURN port in native mode: feeds the core what the control socket holds (STUN
    requests, steered there by the kernel) and what the relay threads queued (everything, without
    steering; Send indications they do not judge), each source in its arrival order."""

    def __init__(self, core: Any, dataplane: NativeDataPlane, loop: asyncio.AbstractEventLoop):
        from .core import Client

        self._client = Client
        self.core = core
        self.dp = dataplane
        self._loop = loop
        self._engine = dataplane.engine
        self._fd: int = self._engine.fileno()
        loop.add_reader(self._fd, self._ready)
        self._cfd: int = self._engine.control_fileno()
        if self._cfd >= 0:
            loop.add_reader(self._cfd, self._ready_control)

    def _ready(self) -> None:
        self._serve(self._engine.drain())

    def _ready_control(self) -> None:
        self._serve(self._engine.receive())

    def _serve(self, items: list[tuple[bytes, tuple[Any, ...], int]]) -> None:
        now = self._loop.time()
        handle = self.core.handle
        transports = self.dp.transports
        client_cls = self._client
        # The answers leave together after the batch: one sendmmsg per relay thread's listener
        # instead of a sendto each (a burst of Allocates has many per batch).
        outs: list[tuple[int, bytes, tuple[Any, ...]]] = []
        for data, addr, thread in items:
            client = client_cls(addr, addr[0], addr[1], "udp", ClientSink(transports[thread], addr))
            try:
                answers = handle(now, client, data)
            except Exception:  # one bad packet must not lose the rest of the batch
                log.exception("TURN request from %s:%d failed", addr[0], addr[1])
                continue
            for out in answers:
                outs.append((thread, out, addr))
        if outs:
            self._engine.send_many(outs)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        if self._cfd >= 0:
            self._loop.remove_reader(self._cfd)
            self._cfd = -1
