"""Kernel offload of the relay: bound ChannelData over UDP forwarded by eBPF (docs/TURN.md).

Why: even the batched native relay pays two syscalls' worth of kernel work per packet.  A TC
ingress program (``bpf/relay.bpf.c``) on the interface holding the relay address rewrites bound
ChannelData in the kernel -- header stripped or added, addresses and ports rewritten, checksums
fixed -- and forwards it; user space never sees those packets.

Who decides what: the control plane (``core.py``, unchanged) still decides permissions, channels,
lifetimes and quotas, and calls the :class:`DataPlane` methods as before.
:class:`OffloadDataPlane` wraps the real data plane (Python or native), forwards every call to it
(so anything not offloaded takes the existing path) and mirrors into the kernel maps exactly the
channels that are bound *and* whose peer IP holds a permission: a channel is removed from the map
the moment the core removes it or its permission (RFC 8656 §9, §12).

Loader: ctypes against Debian's ``libbpf.so.1`` (open/load the object, ``bpf_tc_hook_create`` +
``bpf_tc_attach`` on clsact ingress, ``bpf_map_*_elem``).  No subprocess per channel bind (as
the ``bpftool``/``tc`` CLI would need), no compiler at run time (as bcc needs), and no new Python
dependency (pyroute2 would cover attaching but not the object loading).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import socket
import struct
import subprocess
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dataplane import AllocationCounters, ClientSink, DataPlane, RelayGrant

__all__ = [
    "BPF_OBJECT",
    "BpfRelay",
    "OffloadDataPlane",
    "OffloadUnavailable",
    "interfaces_for",
    "start_offload",
]

log = logging.getLogger("confedge.turn")

BPF_OBJECT = Path(__file__).with_name("bpf") / "relay.bpf.o"
_PROG = b"confedge_relay"
_TC_INGRESS = 1
_TC_HANDLE = 0xCE17  # fixed handle + priority: a stale filter of a crashed run is replaced
_TC_PRIORITY = 0xCE17
_TC_F_REPLACE = 1
_BPF_ANY = 0
_MAX_SLOTS = 65536

_IN_KEY = struct.Struct("=4s2s2s2sH")  # client ip, client port, listener port, channel, pad
_IN_VAL = struct.Struct("=4s4s2s2sI")  # relay ip, peer ip, relay port, peer port, slot
_OUT_KEY = struct.Struct("=4s4s2s2s")  # peer ip, relay ip, peer port, relay port
_OUT_VAL = struct.Struct("=4s4s2s2s2sHI")  # listener ip, client ip, ports, channel, pad, slot
# The same for IPv6 (maps cd_in6, cd_out6): 16-byte addresses.
_IN6_KEY = struct.Struct("=16s2s2s2sH")
_IN6_VAL = struct.Struct("=16s16s2s2sI")
_OUT6_KEY = struct.Struct("=16s16s2s2s")
_OUT6_VAL = struct.Struct("=16s16s2s2s2sHI")
_COUNTERS = struct.Struct("=QQQQ")  # pkts/bytes to peer, pkts/bytes to client


class OffloadUnavailable(Exception):
    """The kernel offload cannot run here; the message says why (logged by ``auto``)."""


class _TcHook(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise OffloadUnavailable(f"libbpf not found ({exc}); apt install libbpf1") from None
    lib.bpf_object__open_file.restype = ctypes.c_void_p
    lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.bpf_object__load.argtypes = [ctypes.c_void_p]
    lib.bpf_object__close.argtypes = [ctypes.c_void_p]
    lib.bpf_object__find_program_by_name.restype = ctypes.c_void_p
    lib.bpf_object__find_program_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.bpf_program__fd.argtypes = [ctypes.c_void_p]
    lib.bpf_object__find_map_fd_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for fn in ("bpf_map_update_elem",):
        getattr(lib, fn).argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulonglong,
        ]
    lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]
    for fn in ("bpf_tc_hook_create", "bpf_tc_hook_destroy"):
        getattr(lib, fn).argtypes = [ctypes.POINTER(_TcHook)]
    for fn in ("bpf_tc_attach", "bpf_tc_detach"):
        getattr(lib, fn).argtypes = [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]
    return lib


def _err(rc: int) -> str:
    return os.strerror(-rc if rc < 0 else ctypes.get_errno())


def interfaces_for(addresses: set[str]) -> dict[str, int]:
    """The interfaces (name -> ifindex) in this network namespace that hold ``addresses``."""
    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise OffloadUnavailable(f"cannot list interfaces with `ip -j addr` ({exc})") from None
    found: dict[str, int] = {}
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            if a.get("local") in addresses:
                if link.get("link_type") not in ("ether", "loopback"):
                    # The program parses a 14-byte Ethernet header (lo has one too); on a
                    # link without it (WireGuard, tun) it would read the IP header wrongly.
                    raise OffloadUnavailable(
                        f"{link['ifname']} holds {a['local']} but is a {link.get('link_type')} "
                        "link; the offload needs an Ethernet interface (or lo)"
                    )
                found[link["ifname"]] = int(link["ifindex"])
    missing = addresses - {
        a.get("local") for link in json.loads(out or "[]") for a in link.get("addr_info", [])
    }
    if missing:
        raise OffloadUnavailable(
            f"no interface holds {', '.join(sorted(missing))} (a wildcard or NAT address); "
            "the offload attaches to the interface of the relay and listener addresses"
        )
    return found


class BpfRelay:
    """The loaded program, its TC attachments and its maps (one per TURN service)."""

    def __init__(self, ifaces: dict[str, int], obj_path: Path = BPF_OBJECT) -> None:
        if not obj_path.is_file():
            raise OffloadUnavailable(
                f"{obj_path} was not built (clang missing at install time: apt install clang "
                "libbpf-dev, then reinstall)"
            )
        self.lib = lib = _libbpf()
        self.ifaces = dict(ifaces)
        self._hooks: list[tuple[_TcHook, bool]] = []
        obj = lib.bpf_object__open_file(str(obj_path).encode(), None)
        if not obj:
            raise OffloadUnavailable(f"cannot open {obj_path}: {_err(-1)}")
        self._obj: int | None = obj
        try:
            rc = lib.bpf_object__load(obj)
            if rc:
                raise OffloadUnavailable(
                    f"the kernel refused the BPF program: {_err(rc)} (it needs CAP_BPF and "
                    "CAP_NET_ADMIN; a verifier rejection prints its log above)"
                )
            prog = lib.bpf_object__find_program_by_name(obj, _PROG)
            self.prog_fd = lib.bpf_program__fd(prog)
            self.fd_in = lib.bpf_object__find_map_fd_by_name(obj, b"cd_in")
            self.fd_out = lib.bpf_object__find_map_fd_by_name(obj, b"cd_out")
            self.fd_counters = lib.bpf_object__find_map_fd_by_name(obj, b"cd_counters")
            self.fd_in6 = lib.bpf_object__find_map_fd_by_name(obj, b"cd_in6")
            self.fd_out6 = lib.bpf_object__find_map_fd_by_name(obj, b"cd_out6")
            for name, ifindex in ifaces.items():
                leftover_qdisc = self._remove_stale(name, ifindex)
                self._attach(name, ifindex, leftover_qdisc)
        except BaseException:
            self.close()
            raise

    def _remove_stale(self, name: str, ifindex: int) -> bool:
        """Remove confedge relay filters on ``name`` that no running process owns.

        Why: a confedge killed with SIGKILL (or crashing) never detaches, and its program stays
        on the interface, still forwarding the channels its maps held for allocations that no
        longer exist.  Such a filter is recognised by the program's name (``confedge_relay``,
        any handle and priority, so an older version's too) and by no process holding the
        program (the only reference left is the filter's).  A filter a running confedge owns is
        left alone.  Returns whether the clsact qdisc is now empty, i.e. a leftover of the dead
        process as well (then this process removes it when it stops).
        """
        filters = _tc_filters(name)
        removed = 0
        for f in filters:
            opts = f.get("options") or {}
            prog = opts.get("prog") or {}
            if prog.get("name") != _PROG.decode() or "handle" not in opts:
                continue
            prog_id = int(prog.get("id", 0))
            holders = _prog_holders(prog_id)
            if holders:
                log.warning(
                    "kernel offload: %s already has a confedge relay program (id %d) held by "
                    "running process(es) %s; not removing it",
                    name,
                    prog_id,
                    ", ".join(map(str, holders)),
                )
                continue
            handle, pref = int(str(opts["handle"]), 16), int(f["pref"])
            hook = _TcHook(ctypes.sizeof(_TcHook), ifindex, _TC_INGRESS, 0, 0)
            o = _TcOpts(ctypes.sizeof(_TcOpts), 0, 0, 0, handle, pref, 0)
            rc = self.lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(o))
            if rc:
                log.warning(
                    "kernel offload: cannot remove the stale confedge filter on %s "
                    "(program id %d, handle %#x, pref %d): %s",
                    name,
                    prog_id,
                    handle,
                    pref,
                    _err(rc),
                )
                continue
            removed += 1
            log.warning(
                "kernel offload: removed a stale confedge TC filter from %s ingress (program id "
                "%d, tag %s, handle %#x, pref %d), left by a confedge that did not stop cleanly "
                "(killed?)",
                name,
                prog_id,
                prog.get("tag", "?"),
                handle,
                pref,
            )
        if not removed:
            return False
        return not any("options" in f for d in ("ingress", "egress") for f in _tc_filters(name, d))

    def _attach(self, name: str, ifindex: int, leftover_qdisc: bool = False) -> None:
        hook = _TcHook(ctypes.sizeof(_TcHook), ifindex, _TC_INGRESS, 0, 0)
        rc = self.lib.bpf_tc_hook_create(ctypes.byref(hook))
        if rc and rc != -errno.EEXIST:
            raise OffloadUnavailable(f"cannot add a clsact qdisc on {name}: {_err(rc)}")
        # An existing clsact qdisc (someone else's) is left in place, unless it is the empty
        # leftover of a killed confedge (_remove_stale): then it goes when this one stops.
        created = rc == 0 or leftover_qdisc
        opts = _TcOpts(
            ctypes.sizeof(_TcOpts), self.prog_fd, _TC_F_REPLACE, 0, _TC_HANDLE, _TC_PRIORITY, 0
        )
        rc = self.lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
        if rc:
            if created:
                hook.attach_point = _TC_INGRESS | 2
                self.lib.bpf_tc_hook_destroy(ctypes.byref(hook))
            raise OffloadUnavailable(f"cannot attach the TC program on {name}: {_err(rc)}")
        self._hooks.append((hook, created))

    # -- maps ---------------------------------------------------------------------------------

    def _update(self, fd: int, key: bytes, val: bytes) -> None:
        rc = self.lib.bpf_map_update_elem(fd, key, val, _BPF_ANY)
        if rc:
            raise OSError(-rc, f"bpf map update: {_err(rc)}")

    def _delete(self, fd: int, key: bytes) -> None:
        self.lib.bpf_map_delete_elem(fd, key)

    def install(self, ch: _Offloaded) -> None:
        """Both directions of one channel (counters of ``ch.slot`` zeroed first)."""
        slot = struct.pack("=I", ch.slot)
        fd_in, fd_out = (self.fd_in6, self.fd_out6) if ch.v6 else (self.fd_in, self.fd_out)
        self._update(self.fd_counters, slot, bytes(_COUNTERS.size))
        self._update(fd_out, ch.out_key, ch.out_val)
        self._update(fd_in, ch.in_key, ch.in_val)

    def uninstall(self, ch: _Offloaded) -> None:
        fd_in, fd_out = (self.fd_in6, self.fd_out6) if ch.v6 else (self.fd_in, self.fd_out)
        self._delete(fd_in, ch.in_key)
        self._delete(fd_out, ch.out_key)

    def read_counters(self, slot: int) -> tuple[int, int, int, int]:
        buf = ctypes.create_string_buffer(_COUNTERS.size)
        rc = self.lib.bpf_map_lookup_elem(self.fd_counters, struct.pack("=I", slot), buf)
        if rc:
            return (0, 0, 0, 0)
        a, b, c, d = _COUNTERS.unpack(buf.raw)
        return (a, b, c, d)

    def close(self) -> None:
        """Detach from every interface (removing the clsact qdiscs this made) and free the
        maps (they go with the last file descriptor)."""
        for hook, created in self._hooks:
            opts = _TcOpts(ctypes.sizeof(_TcOpts), 0, 0, 0, _TC_HANDLE, _TC_PRIORITY, 0)
            self.lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
            if created:
                hook.attach_point = _TC_INGRESS | 2
                self.lib.bpf_tc_hook_destroy(ctypes.byref(hook))
        self._hooks.clear()
        if self._obj is not None:
            self.lib.bpf_object__close(self._obj)
            self._obj = None


def _tc_filters(name: str, direction: str = "ingress") -> list[dict[str, Any]]:
    """``tc -j filter show dev NAME DIRECTION`` (empty when tc is missing or fails: then no
    stale filter can be found, and attaching still replaces one at our handle and priority)."""
    try:
        out = subprocess.run(
            ["tc", "-j", "filter", "show", "dev", name, direction],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        parsed = json.loads(out or "[]")
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        log.debug("kernel offload: cannot list the TC filters on %s: %s", name, exc)
        return []
    return [f for f in parsed if isinstance(f, dict)]


def _prog_holders(prog_id: int) -> list[int]:
    """The processes holding a file descriptor of BPF program ``prog_id`` (/proc/*/fdinfo)."""
    holders: list[int] = []
    want = f"prog_id:\t{prog_id}\n"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                    continue
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            if want in info:
                holders.append(int(pid))
                break
    return holders


def _ip(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in s else socket.AF_INET, s)


def _port(p: int) -> bytes:
    return struct.pack("!H", p)


@dataclass(slots=True)
class _Offloaded:
    slot: int
    in_key: bytes
    in_val: bytes
    out_key: bytes
    out_val: bytes
    v6: bool = False


@dataclass(slots=True)
class _Alloc:
    client: tuple[str, int] | None  # None: not offloadable (stream client, other family)
    relay: tuple[str, int]
    perms: set[str] = field(default_factory=set)
    channels: dict[int, tuple[str, int]] = field(default_factory=dict)
    live: dict[int, _Offloaded] = field(default_factory=dict)
    done: AllocationCounters = field(default_factory=AllocationCounters)  # removed channels


class OffloadDataPlane(DataPlane):
    """A :class:`DataPlane` that forwards everything to ``inner`` and mirrors bound, permitted
    UDP channels (IPv4 and IPv6) into the kernel (see the module docstring)."""

    def __init__(self, inner: DataPlane, bpf: BpfRelay, listener: tuple[str, int]) -> None:
        self.inner = inner
        self.bpf = bpf
        self.listener = listener  # the UDP TURN port's (address, port): source towards clients
        self._allocs: dict[int, _Alloc] = {}
        self._capped = False  # a bandwidth cap is set: nothing is offloaded (set_bandwidth)
        self._free = list(range(_MAX_SLOTS - 1, -1, -1))
        self._ended = AllocationCounters()

    # -- the mirror ---------------------------------------------------------------------------

    def _install(self, a: _Alloc, channel: int, peer: tuple[str, int]) -> None:
        if a.client is None or channel in a.live or not self._free:
            return
        cip, cport = a.client
        lip, lport = self.listener
        rip, rport = a.relay
        pip, pport = peer
        v6 = ":" in cip
        if any((":" in ip) != v6 for ip in (lip, rip, pip)):
            return  # one family end to end only (the program rewrites headers in place)
        slot = self._free.pop()
        in_key, in_val, out_key, out_val = (
            (_IN6_KEY, _IN6_VAL, _OUT6_KEY, _OUT6_VAL)
            if v6
            else (_IN_KEY, _IN_VAL, _OUT_KEY, _OUT_VAL)
        )
        ch = _Offloaded(
            slot,
            in_key.pack(_ip(cip), _port(cport), _port(lport), _port(channel), 0),
            in_val.pack(_ip(rip), _ip(pip), _port(rport), _port(pport), slot),
            out_key.pack(_ip(pip), _ip(rip), _port(pport), _port(rport)),
            out_val.pack(_ip(lip), _ip(cip), _port(lport), _port(cport), _port(channel), 0, slot),
            v6,
        )
        try:
            self.bpf.install(ch)
        except OSError as exc:
            self._free.append(slot)
            log.warning("kernel offload: channel %#x not offloaded: %s", channel, exc)
            return
        a.live[channel] = ch

    def _uninstall(self, a: _Alloc, channel: int) -> None:
        ch = a.live.pop(channel, None)
        if ch is None:
            return
        self.bpf.uninstall(ch)
        p2p, b2p, p2c, b2c = self.bpf.read_counters(ch.slot)
        a.done.pkts_to_peer += p2p
        a.done.bytes_to_peer += b2p
        a.done.pkts_to_client += p2c
        a.done.bytes_to_client += b2c
        self._free.append(ch.slot)

    def kernel_counters(self, alloc_id: int) -> AllocationCounters:
        """What the kernel forwarded for this allocation (live channels and removed ones)."""
        a = self._allocs.get(alloc_id)
        if a is None:
            return AllocationCounters()
        out = AllocationCounters(
            a.done.pkts_to_peer, a.done.bytes_to_peer, a.done.pkts_to_client, a.done.bytes_to_client
        )
        for ch in a.live.values():
            p2p, b2p, p2c, b2c = self.bpf.read_counters(ch.slot)
            out.pkts_to_peer += p2p
            out.bytes_to_peer += b2p
            out.pkts_to_client += p2c
            out.bytes_to_client += b2c
        return out

    def keep_in_user_space(self, alloc_id: int) -> None:
        """Take this allocation's channels out of the kernel for good: for allocations whose
        traffic user space must see packet by packet (a bandwidth cap, docs/TURN.md).  Its
        packets take the wrapped data plane's path from the next one on."""
        a = self._allocs.get(alloc_id)
        if a is None:
            return
        for channel in list(a.live):
            self._uninstall(a, channel)
        a.client = None  # _install skips it from now on

    def kernel_totals(self) -> AllocationCounters:
        """What the kernel forwarded since start (live and ended allocations)."""
        t = AllocationCounters()
        _add(t, self._ended)
        for alloc_id in self._allocs:
            _add(t, self.kernel_counters(alloc_id))
        return t

    def offloaded_channels(self) -> int:
        return sum(len(a.live) for a in self._allocs.values())

    # -- DataPlane ----------------------------------------------------------------------------

    def families(self) -> frozenset[int]:
        return self.inner.families()

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
        grant = self.inner.add_allocation(
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
        client = sink.addr
        v6 = family == 6
        if (
            client is None
            or (":" in client[0]) != v6
            or (":" in self.listener[0]) != v6
            or "%" in client[0]
            or self._capped
        ):
            # TCP/TLS clients, clients of the other family than the listener or the relay
            # address, and link-local (scoped) clients stay in user space; so does everything
            # while a bandwidth cap is set (the kernel program has no token bucket:
            # docs/TURN.md).
            client = None
        self._allocs[alloc_id] = _Alloc(
            (client[0], client[1]) if client else None, (grant.ip, grant.port)
        )
        return grant

    def set_bandwidth(self, per_allocation: int, per_user: int, total: int) -> None:
        """Caps apply packet by packet in the wrapped data plane, which the kernel path would
        bypass: while any cap is set, no channel is offloaded (live ones come out at once)."""
        self.inner.set_bandwidth(per_allocation, per_user, total)
        self._capped = bool(per_allocation or per_user or total)
        if self._capped:
            for alloc_id in list(self._allocs):
                self.keep_in_user_space(alloc_id)

    def set_allocation_rate(self, alloc_id: int, rate: int) -> None:
        self.inner.set_allocation_rate(alloc_id, rate)
        if rate:
            self.keep_in_user_space(alloc_id)

    def release_reservation(self, token: bytes) -> None:
        self.inner.release_reservation(token)

    def remove_allocation(self, alloc_id: int) -> AllocationCounters:
        a = self._allocs.get(alloc_id)
        if a is not None:
            for channel in list(a.live):
                self._uninstall(a, channel)
        k = self.kernel_counters(alloc_id)
        self._allocs.pop(alloc_id, None)
        c = self.inner.remove_allocation(alloc_id)
        _add(self._ended, k)
        _add(c, k)
        return c

    def add_permission(self, alloc_id: int, peer_ip: str) -> None:
        self.inner.add_permission(alloc_id, peer_ip)
        a = self._allocs.get(alloc_id)
        if a is not None and peer_ip not in a.perms:
            a.perms.add(peer_ip)
            for channel, peer in a.channels.items():
                if peer[0] == peer_ip:
                    self._install(a, channel, peer)

    def remove_permission(self, alloc_id: int, peer_ip: str) -> None:
        # §9: without a permission nothing is relayed: out of the kernel's map at once.
        a = self._allocs.get(alloc_id)
        if a is not None:
            a.perms.discard(peer_ip)
            for channel, peer in list(a.channels.items()):
                if peer[0] == peer_ip:
                    self._uninstall(a, channel)
        self.inner.remove_permission(alloc_id, peer_ip)

    def add_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None:
        self.inner.add_channel(alloc_id, channel, peer)
        a = self._allocs.get(alloc_id)
        if a is None:
            return
        a.channels[channel] = peer
        if peer[0] in a.perms:
            self._install(a, channel, peer)

    def remove_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None:
        a = self._allocs.get(alloc_id)
        if a is not None:
            a.channels.pop(channel, None)
            self._uninstall(a, channel)
        self.inner.remove_channel(alloc_id, channel, peer)

    def send_to_peer(self, alloc_id: int, peer: tuple[str, int], payload: bytes) -> None:
        self.inner.send_to_peer(alloc_id, peer, payload)

    def client_channel_data(self, client_key: Hashable, data: bytes) -> bool:
        return self.inner.client_channel_data(client_key, data)

    def counters(self, alloc_id: int) -> AllocationCounters:
        c = self.inner.counters(alloc_id)
        _add(c, self.kernel_counters(alloc_id))
        return c

    def totals(self) -> AllocationCounters:
        t = self.inner.totals()
        _add(t, self.kernel_totals())
        return t

    def close(self) -> None:
        for alloc_id in list(self._allocs):
            a = self._allocs[alloc_id]
            for channel in list(a.live):
                self._uninstall(a, channel)
        self._allocs.clear()
        self.bpf.close()
        self.inner.close()


def _add(into: AllocationCounters, k: AllocationCounters) -> None:
    into.pkts_to_peer += k.pkts_to_peer
    into.bytes_to_peer += k.bytes_to_peer
    into.pkts_to_client += k.pkts_to_client
    into.bytes_to_client += k.bytes_to_client


def start_offload(setting: str, addresses: set[str]) -> BpfRelay | None:
    """The loaded offload for ``turn.offload`` (``"auto"``, ``"ebpf"``, ``"off"``), or None.

    ``ebpf`` raises :class:`OffloadUnavailable` when it cannot run; ``auto`` logs why and
    returns None (the relay works the same, in user space)."""
    if setting == "off":
        return None
    try:
        if not addresses:
            raise OffloadUnavailable("no relay or listener address")
        return BpfRelay(interfaces_for(addresses))
    except OffloadUnavailable as exc:
        if setting == "ebpf":
            raise
        log.info("turn.offload = auto: relaying in user space: %s", exc)
        return None
