"""TurnService: the TURN/STUN server as one runtime component (start/close/info/stats).

It wires the parts together -- UDP and TCP listeners on ``server.internal_address:turn.port``,
the relay data plane on ``server.relay_address`` and ``turn.relay_ports``, the sans-I/O core --
and drives the core's timers once a second.  Time given to the core is the loop's monotonic
clock; ``wall_offset`` converts it to Unix time for REST credential expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import psutil

from confedge.config import Config, config_warnings
from confedge.guard.hook import GuardHook

from .auth import RestCredentials
from .core import TurnCore
from .dataplane import CapacityError, DataPlane, UdpDataPlane
from .drain import parse_alternate
from .listeners import RelayedConnection, TcpConnection, UdpListener
from .native import (
    NativeDataPlane,
    NativeUdpListener,
    bind_listeners,
    choose_backend,
    thread_count,
)

__all__ = [
    "HostAddressWatch",
    "TurnService",
    "TurnStartError",
    "host_peer_entries",
    "read_host_addresses",
]

if TYPE_CHECKING:
    from .offload import OffloadDataPlane

log = logging.getLogger("confedge.turn")

TICK = 1.0  # seconds between timer sweeps; lifetimes are minutes, so 1 s resolution is plenty
HOST_ADDRESS_REFRESH = 60.0  # seconds between reads of the host's interface addresses


LISTENER_BUFFER = 4 * 1024 * 1024
TLS_HANDSHAKE_TIMEOUT = 10.0


def _grow_buffers(sock: socket.socket | None) -> None:
    """Every UDP client shares the listener socket: give it room for bursts (best effort; the
    kernel caps the value at net.core.rmem_max/wmem_max)."""
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, LISTENER_BUFFER)


def read_host_addresses() -> frozenset[str]:
    """Every IPv4 and IPv6 address on this host's interfaces, as text (scope ids kept).

    psutil's ``net_if_addrs()`` is getifaddrs(3): unlike the SIOCGIFADDR ioctl it also lists
    secondary IPv4 addresses, and it needs no hand-written netlink parsing."""
    return frozenset(
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    )


def host_peer_entries() -> list[str]:
    """This host's addresses as ``turn.allowed_peers`` entries (scope ids dropped).

    For the demo and tests only, whose peers (Chromium, aiortc) run on this very machine and
    offer its interface addresses as ICE candidates; everywhere else confedge refuses its own
    addresses as peers (docs/TURN.md, "What is refused and why")."""
    return sorted({a.split("%", 1)[0] for a in read_host_addresses()})


class HostAddressWatch:
    """When to re-read the host's addresses, and whether they changed (time injected).

    The README promises that confedge's own addresses are always refused as TURN peers, whatever
    the configuration lists: DHCP, a VPN or a container runtime can add one at any time, so they
    are read at start-up and every ``interval`` seconds.  A failed read keeps the last set.
    """

    def __init__(
        self,
        read: Callable[[], Iterable[str]] = read_host_addresses,
        interval: float = HOST_ADDRESS_REFRESH,
    ) -> None:
        self._read = read
        self.interval = interval
        self.current: frozenset[str] | None = None
        self._next = float("-inf")

    def start(self, now: float) -> frozenset[str]:
        """Read now, whatever was read before (a service starting again builds a new core)."""
        self.current = None
        self._next = float("-inf")
        return self.poll(now) or frozenset()

    def poll(self, now: float) -> frozenset[str] | None:
        """The new address set when it is time to look and it changed since last time."""
        if now < self._next:
            return None
        self._next = now + self.interval
        try:
            addrs = frozenset(self._read())
        except OSError as exc:
            log.warning("cannot read this host's interface addresses: %s", exc)
            return None
        if addrs == self.current:
            return None
        self.current = addrs
        return addrs


class TurnStartError(OSError):
    """The TURN server cannot start; the message is one sentence naming the key to fix.

    An OSError because that is what `confedge run` reports as "cannot start: ..." (one line, no
    traceback), like any other bind failure; ``str()`` is the message alone.
    """


_BIND_REASONS = {
    errno.EADDRINUSE: "the port is already in use (another confedge, coturn, or another part "
    "of this configuration?)",
    errno.EADDRNOTAVAIL: "the address is not an address of this host",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
}


def _bind_reason(exc: OSError, family: int, kind: int, host: str, port: int) -> tuple[int, str]:
    """(errno, reason) for a failed bind.  uvloop's message ("could not bind to local_addr")
    hides the reason, so a plain socket retries the bind to learn it."""
    code = exc.errno or 0
    if not code:
        try:
            with socket.socket(family, kind) as probe:
                if kind == socket.SOCK_STREAM:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as again:
            code = again.errno or 0
    if code in _BIND_REASONS:
        return code, _BIND_REASONS[code]
    return code, (os.strerror(code) if code else str(exc))


def _start_error(
    key: str, what: str, host: str, port: int, exc: OSError, kind: int
) -> TurnStartError:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    code, reason = _bind_reason(exc, family, kind, host, port)
    if code == errno.EADDRNOTAVAIL:
        key = "server.internal_address"
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return TurnStartError(f"{key}: cannot listen for {what} on {where}: {reason}")


class _SocketGroup:
    """The native UDP port's sockets before the relay threads take them (closed on a retry)."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks

    def close(self) -> None:
        for s in self.socks:
            s.close()


class TurnService:
    """The TURN server of SPEC §3.

    ``turn.port = 0`` binds an ephemeral port (UDP first, then TCP on the same number); the bound
    port is :attr:`port` afterwards.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        guard: GuardHook | None = None,
        host_addresses: HostAddressWatch | None = None,
        nonce_key: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        # Shared by the instances of a cluster (cluster/service.py); None: a key of our own.
        self.nonce_key = nonce_key
        self.guard = guard
        self.host_addresses = host_addresses or HostAddressWatch()
        self.core: TurnCore | None = None
        self.dataplane: DataPlane | None = None
        self.offload: OffloadDataPlane | None = None  # turn.offload (turn/offload.py)
        self.backend = "python"  # or "native" (turn.dataplane; set by start())
        self.port: int = 0
        self.udp_port: int = 0
        self.tcp_port: int = 0
        self._udp: asyncio.DatagramTransport | NativeUdpListener | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tls: asyncio.AbstractServer | None = None
        self.tls_port: int = 0
        self._tcp_conns: set[TcpConnection] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay: asyncio.AbstractServer | None = None
        self._relay_dir: str | None = None
        self._drained: asyncio.Future[None] | None = None

    @property
    def host(self) -> str:
        return self.cfg.server.internal_address

    def _relay_addresses(self) -> tuple[str | None, str | None]:
        relay = self.cfg.server.relay_address
        v4: str | None = None
        v6: str | None = self.cfg.turn.relay_address_v6
        if ipaddress.ip_address(relay).version == 4:
            v4 = relay
        elif v6 is None:
            v6 = relay
        return v4, v6

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        cfg = self.cfg
        v4, v6 = self._relay_addresses()
        try:
            self.backend = choose_backend(cfg.turn.dataplane)
        except ValueError as exc:
            raise TurnStartError(str(exc)) from None
        common: dict[str, Any] = {
            "relay_v4": v4,
            "relay_v6": v6,
            "port_range": cfg.turn.relay_port_range,
            "loop": loop,
            "multiplex": cfg.turn.relay_multiplex,
        }
        if self.backend == "native":
            self.dataplane = NativeDataPlane(
                **common,
                coalesce_us=cfg.turn.dataplane_coalesce_us,
                fold_pps=cfg.turn.dataplane_fold_pps,
            )
        else:
            self.dataplane = UdpDataPlane(**common)
        if cfg.turn.offload != "off":
            # Imported only here: a relay that does not offload never loads ctypes and the
            # BPF loader (memory: every module a process imports stays resident).
            from .offload import OffloadDataPlane, OffloadUnavailable, start_offload

            try:
                bpf = start_offload(cfg.turn.offload, {a for a in (v4, self.host) if a})
            except OffloadUnavailable as exc:
                raise TurnStartError(f"turn.offload = ebpf: {exc}; set it to auto or off") from None
            if bpf is not None:
                # The core drives the offload wrapper; the listeners keep the real data plane.
                self.offload = OffloadDataPlane(self.dataplane, bpf, (self.host, 0))
        self.core = TurnCore.from_config(
            cfg,
            self.offload or self.dataplane,
            guard=self.guard,
            relay_addresses=tuple(a for a in (v4, v6) if a),
            wall_offset=time.time() - loop.time(),
            nonce_key=self.nonce_key,
        )
        self.core.on_drained = self._on_drained
        self.core.set_host_addresses(loop.time(), self.host_addresses.start(loop.time()))
        self._bind_native_policy(self.core)
        for line in config_warnings(cfg):  # [turn]'s, as `confedge check` prints them
            if line.startswith("turn."):
                log.warning("%s", line)
        try:
            self._check_relay_addresses(v4, v6)
            await self._bind_listeners(loop)
        except BaseException:
            await self.close()
            raise
        lo, hi = cfg.turn.relay_port_range
        if hi - lo + 1 < cfg.turn.max_allocations and not cfg.turn.relay_multiplex:
            log.info(
                "turn.relay_ports %s holds %d ports: at most that many allocations at once "
                "(turn.max_allocations = %d); beyond them clients get 508",
                cfg.turn.relay_ports,
                hi - lo + 1,
                cfg.turn.max_allocations,
            )
        self._ticker = loop.create_task(self._tick_loop())
        log.info(
            "TURN listening on %s:%d (udp+tcp%s), relaying on %s ports %s, mode %s, data plane %s",
            self.host,
            self.port,
            f", tls on {self.tls_port}" if self.tls_port else "",
            "/".join(a for a in (v4, v6) if a),
            cfg.turn.relay_ports,
            cfg.turn.mode,
            f"native ({len(self.dataplane.transports)} relay threads)"
            if isinstance(self.dataplane, NativeDataPlane)
            else "python",
        )

    def _check_relay_addresses(self, v4: str | None, v6: str | None) -> None:
        """Relay sockets are bound per allocation, long after start: an external_address that
        is not on this host (a NAT's public address, a typo) would otherwise start "fine" and
        answer every Allocate with 508.  One throw-away bind per family says so at start."""
        server = self.cfg.server
        for ip in (v4, v6):
            if ip is None:
                continue
            if ip == self.cfg.turn.relay_address_v6:
                key = "turn.relay_address_v6"
            elif server.external_address is not None:
                key = "server.external_address"
            else:
                key = "server.internal_address"  # one NIC: relays are on the internal address
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.bind((ip, 0))
            except OSError as exc:
                reason = _BIND_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
                hint = (
                    " (behind 1:1 NAT, configure the host's own address, not the public one)"
                    if exc.errno == errno.EADDRNOTAVAIL
                    else ""
                )
                raise TurnStartError(
                    f"{key}: cannot bind TURN relay sockets on {ip}: {reason}{hint}"
                ) from None

    async def _bind_listeners(self, loop: asyncio.AbstractEventLoop) -> None:
        core, dp = self.core, self.dataplane
        assert core is not None and dp is not None
        want = self.cfg.turn.port
        # Each TCP connection carries at most one allocation, plus some headroom for Binding.
        tcp_cap = self.cfg.turn.max_allocations + 256
        native = isinstance(dp, NativeDataPlane)
        for _attempt in range(20 if want == 0 else 1):
            socks: list[socket.socket] = []
            control: socket.socket | None = None
            try:
                if native:
                    # One SO_REUSEPORT socket per relay thread and the control socket
                    # (turn/native.py).
                    socks, control = bind_listeners(
                        self.host, want, thread_count(self.cfg.turn.dataplane_threads)
                    )
                    udp: Any = _SocketGroup(socks + ([control] if control else []))
                    port = socks[0].getsockname()[1]
                else:
                    udp, _ = await loop.create_datagram_endpoint(
                        lambda: UdpListener(core, dp, loop), local_addr=(self.host, want)
                    )
                    port = udp.get_extra_info("sockname")[1]
            except OSError as exc:
                raise _start_error(
                    "turn.port", "TURN/STUN (udp)", self.host, want, exc, socket.SOCK_DGRAM
                ) from None
            try:
                tcp = await loop.create_server(
                    lambda: TcpConnection(core, dp, loop, self._tcp_conns, tcp_cap),
                    host=self.host,
                    port=port,
                    reuse_address=True,
                )
            except OSError as exc:
                udp.close()
                if want == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the ephemeral UDP number is taken on TCP: try another
                raise _start_error(
                    "turn.port", "TURN/STUN (tcp)", self.host, port, exc, socket.SOCK_STREAM
                ) from None
            if isinstance(dp, NativeDataPlane):
                try:
                    # the relay threads (and the control socket's reader) own the UDP port
                    dp.start(socks, control)
                except CapacityError as exc:  # turn.relay_multiplex: no room for its sockets
                    tcp.close()
                    raise TurnStartError(str(exc)) from None
                self._udp = NativeUdpListener(core, dp, loop)
            else:
                self._udp = udp
                _grow_buffers(udp.get_extra_info("socket"))
            self._tcp = tcp
            self.port = self.udp_port = self.tcp_port = port
            if self.offload is not None:
                self.offload.listener = (self.host, port)
            break
        else:
            raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")
        if self.cfg.turn.tls_port:
            await self._bind_tls(loop, tcp_cap)

    async def _bind_tls(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        """TURN over TLS on turn.tls_port (``turns:``), with the certificate of [tls]."""
        from confedge.tls.context import TLSContextHolder

        core, dp = self.core, self.dataplane
        assert core is not None and dp is not None
        from confedge.tls.certs import CertificateError

        try:
            holder = TLSContextHolder(self.cfg)
        except CertificateError as exc:
            raise TurnStartError(f"{exc} (needed by turn.tls_port)") from None
        self._tls_holder = holder
        try:
            tls = await loop.create_server(
                lambda: TcpConnection(core, dp, loop, self._tcp_conns, cap, kind="tls"),
                host=self.host,
                port=self.cfg.turn.tls_port,
                ssl=holder.context,
                # Until the handshake completes no TcpConnection exists (no cap, no setup
                # timer): a client that stalls mid-handshake is cut here, not after asyncio's
                # default 60 s.
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
                reuse_address=True,
            )
        except OSError as exc:
            raise _start_error(
                "turn.tls_port",
                "TURN over TLS",
                self.host,
                self.cfg.turn.tls_port,
                exc,
                socket.SOCK_STREAM,
            ) from None
        self._tls = tls
        self.tls_port = tls.sockets[0].getsockname()[1]

    def reload_config(self, cfg: Config) -> None:
        """A reloaded configuration (runtime.py checked it; listeners, ports and the data plane
        are restart-only): credentials and REST secrets, media node safelist, peer policy,
        quotas and limits. Allocations, their permissions and channels stay (core.adopt);
        ConfigError (an unusable password) leaves everything as it was."""
        core, loop, dp = self.core, self._loop, self.dataplane
        if core is None or loop is None or dp is None:
            self.cfg = cfg
            return
        v4, v6 = self._relay_addresses()
        fresh = TurnCore.from_config(
            cfg,
            dp,
            guard=self.guard,
            relay_addresses=tuple(a for a in (v4, v6) if a),
            wall_offset=core.wall_offset,
            nonce_key=self.nonce_key,
        )
        core.adopt(loop.time(), fresh, self.host_addresses.current or ())
        self._bind_native_policy(core)
        self.cfg = cfg

    def _bind_native_policy(self, core: TurnCore) -> None:
        """The native data plane forwards Sends in C to peers the core's policy allows."""
        if isinstance(self.dataplane, NativeDataPlane):
            peers = core.peers
            self.dataplane.bind_policy(
                lambda ip: (v := peers.check(ip)).allowed and not v.relay_ports_only
            )

    def reload_tls(self, cfg: Config | None = None) -> None:
        """Reload the turns: certificate (SIGHUP), from `cfg`'s [tls] when given; new
        handshakes use it, open ones stay."""
        holder = getattr(self, "_tls_holder", None)
        if holder is not None:
            holder.reload(cfg)

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            if self.core is not None:
                try:
                    self.core.tick(loop.time())
                    self.core.sample(loop.time())
                    self._refresh_host_addresses(loop.time())
                except Exception:  # a bug here must not stop expiry forever
                    log.exception("TURN timer sweep failed")

    def _refresh_host_addresses(self, now: float) -> None:
        """Hand the host's addresses to the peer policy when they changed."""
        addrs = self.host_addresses.poll(now)
        if addrs is not None and self.core is not None:
            self.core.set_host_addresses(now, addrs)
            log.debug("turn: this host's addresses, refused as peers: %s", ", ".join(sorted(addrs)))

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self.core is not None and self._loop is not None:
            self.core.shutdown(self._loop.time())
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        servers = [srv for srv in (self._tcp, self._tls, self._relay) if srv is not None]
        for srv in servers:
            srv.close()
        for conn in list(self._tcp_conns):
            if conn.transport is not None:
                conn.transport.close()
        for srv in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2.0)
        self._tcp = self._tls = self._relay = None
        if self._relay_dir is not None:
            import shutil  # (as tempfile below: only a relay that opened this listener)

            shutil.rmtree(self._relay_dir, ignore_errors=True)
            self._relay_dir = None
        if self.offload is not None:
            self.offload.close()  # closes the wrapped data plane too
        elif self.dataplane is not None:
            self.dataplane.close()

    def stream_protocol(self, kind: str = "tls") -> asyncio.Protocol:
        """A TURN-over-stream protocol for a connection accepted elsewhere.

        For sharing a port with HTTPS (SPEC §3: ``turns:`` on 443, ``turn.tls_on_https``): an
        in-process proxy, having seen ALPN ``stun.turn`` or STUN/ChannelData as the first bytes
        after the TLS handshake (portshare.py), hands the connection over::

            proto = turn.stream_protocol("tls-https")
            transport.set_protocol(proto)
            proto.connection_made(transport)
            proto.data_received(bytes_already_read)
        """
        core, dp, loop = self.core, self.dataplane, self._loop
        if core is None or dp is None or loop is None:
            raise RuntimeError("TurnService.stream_protocol() before start()")
        cap = self.cfg.turn.max_allocations + 256
        return TcpConnection(core, dp, loop, self._tcp_conns, cap, kind=kind)

    async def open_relay_listener(self) -> str:
        """The path of a Unix stream socket on which proxy worker processes relay TURN-over-TLS
        clients of the HTTPS port (turn.tls_on_https with proxy.workers > 1; portshare.py).

        Each connection starts with a PROXY protocol v2 header naming the client. The socket
        lives in a fresh directory of mode 0700, and peers of another user are refused too,
        because whoever can connect can claim any client address (restricted mode trusts
        addresses). Opened once; later calls return the same path.
        """
        loop, core, dp = self._loop, self.core, self.dataplane
        if loop is None or core is None or dp is None:
            raise RuntimeError("TurnService.open_relay_listener() before start()")
        if self._relay is not None and self._relay_dir is not None:
            return os.path.join(self._relay_dir, "turn.sock")
        import tempfile

        self._relay_dir = tempfile.mkdtemp(prefix="confedge-turn-")
        path = os.path.join(self._relay_dir, "turn.sock")
        cap = self.cfg.turn.max_allocations + 256

        def make() -> TcpConnection:
            return TcpConnection(core, dp, loop, self._tcp_conns, cap, kind="tls-https")

        self._relay = await loop.create_unix_server(
            lambda: RelayedConnection(make, loop), path, backlog=1024
        )
        return path

    def info(self) -> dict[str, Any]:
        """What a client (or `confedge demo --json`) needs to use this server.

        Permissive mode has no fixed password: a REST credential valid for 24 h is minted with
        the current secret."""
        t = self.cfg.turn
        realm = self.cfg.server.domain
        if t.mode == "restricted":
            username, password = t.username, t.password
        else:
            username, password = RestCredentials(t.secrets, realm).make("confedge", time.time())
        return {
            "host": self.host,
            "port": self.port,
            "username": username,
            "password": password,
            "realm": realm,
        }

    # -- drain ----------------------------------------------------------------------------------

    def start_drain(self, alternate: str | None = None) -> asyncio.Future[None]:
        """Take this TURN server out of service without cutting a call (SPEC §9, issue 15).

        From now on a new Allocate is answered with 300 Try Alternate and ALTERNATE-SERVER
        (RFC 8489 §10, RFC 8656 §6.2) naming ``alternate`` ("ip:port", "[v6]:port" or "ip"
        for port 3478; None = ``turn.alternate_server``), or, with neither, 508 Insufficient
        Capacity (RFC 8656 §7.2, the client tries another server).  Existing allocations keep
        relaying and may be refreshed, get permissions and channels, until they end (refresh
        to 0, expiry, TCP close).

        Returns a future that is resolved when the last allocation has ended (at once if there
        are none); the same future until :meth:`cancel_drain`.  ``drain_state()`` says what is
        left.  Raises ValueError for an ``alternate`` that is not an address.  Calling it again
        while draining changes the alternate and returns the same future.  The caller decides
        what to do at the end (``confedge drain`` exits the process) and about a deadline
        (``drain_timeout``): this method never ends an allocation itself."""
        core, loop = self.core, self._loop
        if core is None or loop is None:
            raise RuntimeError("TurnService.start_drain() before start()")
        alt = parse_alternate(alternate) if alternate is not None else None
        if self._drained is None or (self._drained.done() and not core.drain.active):
            self._drained = loop.create_future()
        was = core.drain.active
        core.start_drain(loop.time(), alt)
        if not was:
            where = core.drain.alternate
            log.info(
                "TURN draining: %d allocations left; new Allocates get %s",
                len(core.allocations),
                f"300 Try Alternate to {where[0]}:{where[1]}" if where else "508",
            )
        return self._drained

    def cancel_drain(self) -> None:
        """Back in service: new Allocates are answered again.  A pending future from
        :meth:`start_drain` is cancelled."""
        if self.core is not None and self.core.drain.active:
            self.core.cancel_drain()
            log.info("TURN drain cancelled: accepting allocations again")
        if self._drained is not None and not self._drained.done():
            self._drained.cancel()
        self._drained = None

    def _on_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            log.info("TURN drained: the last allocation has ended")
            self._drained.set_result(None)

    def drain_state(self) -> dict[str, Any]:
        """``draining`` (bool), ``since`` (seconds ago), ``alternate`` ("ip:port" or None),
        ``allocations`` left, and Allocates ``redirected`` (300) and ``refused`` (508) since
        draining began: for the status page, /metrics and ``confedge drain``."""
        core, loop = self.core, self._loop
        if core is None or loop is None:
            return {"draining": False, "allocations": 0}
        d = core.drain
        alt = d.alternate
        return {
            "draining": d.active,
            "since": round(loop.time() - d.since, 1) if d.active else None,
            "alternate": (f"[{alt[0]}]:{alt[1]}" if ":" in alt[0] else f"{alt[0]}:{alt[1]}")
            if alt
            else None,
            "allocations": len(core.allocations),
            "redirected": d.redirected,
            "refused": d.refused,
        }

    def live(self, top: int = 20) -> dict[str, Any]:
        """Live figures for the status page and /metrics (issue 15), plain data:

        * ``throughput``: bytes/s relayed to peers and to clients over the last second;
        * ``top``: the ``top`` allocations moving the most now, each with user, client,
          transport, relay address, bytes/s and bytes each way, packets dropped over a
          bandwidth cap, and age in seconds (counters sampled once a second while it lives);
        * ``answers``: error answers sent since start, as (code, cause, count) -- 401, 403,
          438, 486, 508 and 300 by the check that gave them; code 0 counts unauthenticated
          requests left unanswered because the ``unauth_budget`` was spent;
        * ``lifetimes``: ended allocations' lifetimes as cumulative (le, count) buckets, with
          ``sum`` and ``count``;
        * ``bandwidth``: the caps in force (bytes/s each direction, 0 = unlimited) and the
          policy; ``drain``: :meth:`drain_state`."""
        core, loop = self.core, self._loop
        if core is None or loop is None:
            return {}
        now = loop.time()
        allocs = sorted(
            core.allocations.values(),
            key=lambda a: a.rate.to_peer + a.rate.to_client,
            reverse=True,
        )
        rows = []
        for a in allocs[:top]:
            relay = a.relay
            rows.append(
                {
                    "id": a.id,
                    "user": a.username,
                    "client": f"{a.client.ip}:{a.client.port}",
                    "transport": a.client.transport,
                    "relay": f"[{relay.ip}]:{relay.port}"
                    if relay.family == 6
                    else f"{relay.ip}:{relay.port}",
                    "rate_to_peer": round(a.rate.to_peer),
                    "rate_to_client": round(a.rate.to_client),
                    "bytes_to_peer": a.rate.bytes_to_peer,
                    "bytes_to_client": a.rate.bytes_to_client,
                    "dropped_bandwidth": a.rate.dropped_bandwidth,
                    "age": round(now - a.created, 1),
                }
            )
        s = core.s
        h = core.lifetimes
        return {
            "throughput": {
                "to_peer": round(core.relay_rate[0]),
                "to_client": round(core.relay_rate[1]),
            },
            "top": rows,
            "answers": [[c, cause, n] for (c, cause), n in sorted(core.answers.counts.items())],
            "lifetimes": {
                # JSON has no infinity: the last bound is the string "+Inf"
                "buckets": [[b if b != float("inf") else "+Inf", n] for b, n in h.cumulative()],
                "sum": h.total,
                "count": h.n,
            },
            "bandwidth": {
                "per_allocation": s.bandwidth_per_allocation,
                "per_user": s.bandwidth_per_user,
                "total": s.bandwidth_total,
                "policy": s.bandwidth_policy,
            },
            "drain": self.drain_state(),
        }

    def stats(self) -> dict[str, int]:
        """Allocations now, and bytes/packets relayed each way since start."""
        if self.core is None:
            return {
                "allocations": 0,
                "bytes_to_peer": 0,
                "packets_to_peer": 0,
                "bytes_to_client": 0,
                "packets_to_client": 0,
                "dropped_no_permission": 0,
                "dropped_bandwidth": 0,
            }
        return self.core.stats()

    def dataplane_stats(self) -> dict[str, Any]:
        """Which data plane relays (``backend``), and for the native one its own counters:
        packets, syscalls, GSO use and every kind of drop (turn/native.py)."""
        dp = self.dataplane
        extra: dict[str, Any] = dp.stats() if isinstance(dp, NativeDataPlane) else {}
        if isinstance(dp, UdpDataPlane) and dp.multiplex:
            extra.update(dp.mux_stats())  # turn.relay_multiplex (turn/multiplex.py)
        if self.offload is not None:
            extra["offload"] = "ebpf"
            extra["offload_channels"] = self.offload.offloaded_channels()
        return {"backend": self.backend, **extra}
