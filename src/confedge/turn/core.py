"""Sans-I/O TURN server core: allocations, permissions, channels, authentication, quotas.

Theory of operation
-------------------
A listener hands every STUN message from a client to :meth:`TurnCore.handle` together with the
current (monotonic) time and a :class:`Client` describing the 5-tuple; it gets back the
response datagrams to send to that client.  The core never touches a socket or a clock: relay
ports, permission and channel tables live behind the injected :class:`~.dataplane.DataPlane`,
and everything time-driven happens in :meth:`TurnCore.tick`, which the adapter calls about once a
second (tests call it with simulated time and never sleep).

ChannelData never reaches the core: the listener gives it to the data plane's table lookup
first.  The core is the control plane only; it runs at request rate.

Request pipeline (RFC 8489 §6.3, §9.2.4; RFC 8656 §5-§11):

1. parse (undecodable -> drop; malformed request -> 400);
2. Binding: answered to anyone with XOR-MAPPED-ADDRESS (the box is a STUN server too);
3. guard ban -> drop; restricted mode and a client outside ``media_nodes`` -> 403;
4. long-term credential check with stateless nonces (401 / 438 / 400); unauthenticated answers
   (401, 438, and the 403 of step 3) are limited by ``unauth_budget`` on UDP only, per source IP
   for everyone and per source IP and port for media nodes, and a request carrying a nonce we
   minted for its address with a valid MESSAGE-INTEGRITY is never limited (see
   :class:`~.auth.UnauthBudget`);
5. unknown comprehension-required attributes -> 420;
6. the method: Allocate, Refresh, CreatePermission, ChannelBind.

Send indications skip authentication (RFC 8656 §10.2) but need an allocation on the 5-tuple and
a permission for the peer.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from confedge.config import Config, ConfigError
from confedge.guard.hook import GuardHook
from confedge.stun import (
    REASONS,
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    StunError,
    check_integrity,
    decode_even_port,
    decode_requested_address_family,
    decode_requested_transport,
    decode_reservation_token,
    decode_u32,
    decode_xor_address,
    encode_address,
    encode_u32,
    encode_unknown_attributes,
    parse_message,
    unknown_comprehension_required,
)

from .auth import Credentials, LongTermCredentials, NonceManager, RestCredentials, UnauthBudget
from .dataplane import CapacityError, ClientSink, DataPlane, RelayGrant
from .drain import Drain, parse_alternate
from .framing import decode_channel_number
from .metrics import AnswerTally, Histogram, Rate
from .policy import ClientPolicy, PeerPolicy

__all__ = ["Allocation", "Client", "CoreSettings", "TurnCore"]

log = logging.getLogger("confedge.turn")

UDP = 17  # REQUESTED-TRANSPORT protocol number (RFC 8656 §18.7)
RESERVATION_LIFETIME = 30.0  # RFC 8656 §7.2: "approximately 30 seconds"
CHANNEL_COOLDOWN = 300.0  # RFC 8656 §11: 5 minutes before a channel/peer may be rebound
RETIRED_CREDENTIALS = 4  # rotated-away credentials whose requests are refused uncounted


class Client:
    """One client 5-tuple as the listener sees it (never changed once made).

    ``key`` is the listener's own hashable for this 5-tuple (the data plane routes ChannelData by
    it); ``transport`` is "udp", "tcp" or "tls" (for logs); ``sink`` is how relayed data reaches
    the client.

    A plain class, not a frozen dataclass: the UDP listener makes one per request, and a frozen
    dataclass's ``__init__`` (interpreted even under mypyc) sets each field through
    ``object.__setattr__``."""

    __slots__ = ("ip", "key", "port", "sink", "transport")

    def __init__(self, key: Hashable, ip: str, port: int, transport: str, sink: ClientSink) -> None:
        self.key = key
        self.ip = ip
        self.port = port
        self.transport = transport
        self.sink = sink

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Client) and (
            self.key,
            self.ip,
            self.port,
            self.transport,
            self.sink,
        ) == (other.key, other.ip, other.port, other.transport, other.sink)

    def __hash__(self) -> int:
        return hash((self.key, self.ip, self.port, self.transport))

    def __repr__(self) -> str:
        return f"Client({self.transport} {self.ip}:{self.port})"


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """What the core needs from TurnConfig, plus the RFC 8656 lifetimes (overridable in tests)."""

    realm: str
    restricted: bool
    max_allocations: int = 10000
    user_quota: int = 10000
    max_permissions: int = 64
    max_channels: int = 64
    unauth_budget: int = 50
    software: str = ""
    reason_phrases: bool = False
    default_lifetime: int = 600  # RFC 8656 §3.2
    max_lifetime: int = 3600  # RFC 8656 §7.2 recommends 3600 s as the maximum
    permission_lifetime: int = 300  # RFC 8656 §9
    channel_lifetime: int = 600  # RFC 8656 §12
    # Bandwidth caps, bytes/s each direction, 0 = unlimited (bandwidth.py)
    bandwidth_per_allocation: int = 0
    bandwidth_per_user: int = 0
    bandwidth_total: int = 0
    bandwidth_policy: str = "refuse"  # or "degrade"
    alternate_server: tuple[str, int] | None = None  # drain: 300 Try Alternate to here

    @classmethod
    def from_config(cls, cfg: Config) -> CoreSettings:
        t = cfg.turn
        return cls(
            realm=cfg.server.domain,
            restricted=t.mode == "restricted",
            max_allocations=t.max_allocations,
            user_quota=t.effective_user_quota,
            max_permissions=t.max_permissions,
            max_channels=t.max_channels,
            unauth_budget=t.unauth_budget,
            software=t.software,
            reason_phrases=t.reason_phrases,
            bandwidth_per_allocation=t.effective_bandwidth_per_allocation,
            bandwidth_per_user=t.effective_bandwidth_per_user,
            bandwidth_total=t.effective_bandwidth_total,
            bandwidth_policy=t.bandwidth_policy,
            alternate_server=parse_alternate(t.alternate_server) if t.alternate_server else None,
        )


@dataclass(slots=True)
class _Channel:
    number: int
    peer: tuple[str, int]
    expires: float


class Allocation:
    """Control-plane state of one allocation (RFC 8656 §3.2); traffic counters live in the
    data plane.

    A plain class, not a dataclass: its constructor runs once per Allocate, and a dataclass's
    generated ``__init__`` stays interpreted Python even when mypyc compiles this module."""

    __slots__ = (
        "cap",
        "channels",
        "client",
        "cool_number",
        "cool_peer",
        "create_response",
        "create_tid",
        "created",
        "expires",
        "id",
        "key",
        "peer_channel",
        "permissions",
        "rate",
        "relay",
        "timer_at",
        "username",
    )

    def __init__(
        self,
        *,
        id: int,
        client: Client,
        username: str,
        key: bytes,
        relay: RelayGrant,
        created: float,
        expires: float,
        create_tid: bytes,
        create_response: bytes,
    ) -> None:
        self.id = id
        self.client = client
        self.username = username
        self.key = key
        self.relay = relay
        self.created = created
        self.expires = expires
        self.create_tid = create_tid
        self.create_response = create_response
        self.timer_at = 0.0  # when the pending expiry timer fires
        self.permissions: dict[str, float] = {}
        self.channels: dict[int, _Channel] = {}
        self.peer_channel: dict[tuple[str, int], int] = {}
        # RFC 8656 §11 cool-down after a binding expires: number -> (peer, until), peer -> number.
        self.cool_number: dict[int, tuple[tuple[str, int], float]] = {}
        self.cool_peer: dict[tuple[str, int], tuple[int, float]] = {}
        self.rate = Rate()  # live throughput, from TurnCore.sample
        self.cap = -1  # bandwidth cap last given to the data plane by the degrade policy


class _Reject(Exception):
    """Internal: answer the current request with this error code."""

    def __init__(
        self,
        code: int,
        where: str = "",
        extra: Sequence[tuple[int, bytes]] = (),
        cause: str = "protocol",
    ) -> None:
        super().__init__(code)
        self.code = code
        self.where = where  # for the debug log: which check refused
        self.extra = extra
        self.cause = cause  # for the answer tally (metrics label)


class _LogLimiter:
    """At most ``rate`` refusal log lines per second, so a client cannot flood the log."""

    def __init__(self, rate: int = 20) -> None:
        self.rate = rate
        self._second = -1
        self._count = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        s = int(now)
        if s != self._second:
            self._second, self._count = s, 0
        self._count += 1
        if self._count > self.rate:
            self.suppressed += 1
            return False
        return True


class TurnCore:
    """The TURN control plane.  Not thread-safe; one per event loop."""

    def __init__(
        self,
        settings: CoreSettings,
        credentials: Credentials,
        dataplane: DataPlane,
        *,
        peer_policy: PeerPolicy,
        client_policy: ClientPolicy,
        nonces: NonceManager,
        guard: GuardHook | None = None,
        wall_offset: float = 0.0,
    ) -> None:
        self.s = settings
        self.creds = credentials
        # The credentials that reloads rotated away, newest first (at most RETIRED_CREDENTIALS):
        # a request signed with one is refused but is no guess (`_auth_failed`).
        self._retired: list[Credentials] = []
        self.dp = dataplane
        self.peers = peer_policy
        self.clients = client_policy
        self.nonces = nonces
        self.guard = guard
        # REST usernames carry a Unix expiry, while `now` is monotonic: wall = now + offset.
        self.wall_offset = wall_offset
        # Unauthenticated UDP answers: per source IP for everyone, per (IP, port) in a table of
        # their own for media nodes (UnauthBudget says why).
        self.budget = UnauthBudget(settings.unauth_budget)
        self.node_budget = UnauthBudget(settings.unauth_budget)
        self.allocations: dict[int, Allocation] = {}
        self._by_client: dict[Hashable, Allocation] = {}
        self._per_user: dict[str, int] = {}
        # RESERVATION-TOKEN -> (expiry, username, family). A held port counts against the total
        # and the user's quota like an allocation, so EVEN-PORT cannot be used to hoard ports.
        self._reservations: dict[bytes, tuple[float, str, int]] = {}
        self._timers: list[tuple[float, int, str, int, object]] = []
        self._seq = 0
        self._next_id = 1
        self._loglimit = _LogLimiter()
        self._realm_attr = settings.realm.encode()
        self._software = settings.software.encode() if settings.software else b""
        # Live figures (metrics.py) and drain state (drain.py).
        self.answers = AnswerTally()
        self.lifetimes = Histogram()
        self.relay_rate = (0.0, 0.0)  # bytes/s to peers, to clients (last sample)
        self._sampled: tuple[float, int, int] | None = None
        self.drain = Drain(alternate=settings.alternate_server)
        self.on_drained: Callable[[], None] | None = None
        dataplane.set_bandwidth(
            settings.bandwidth_per_allocation, settings.bandwidth_per_user, settings.bandwidth_total
        )

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        dataplane: DataPlane,
        *,
        guard: GuardHook | None = None,
        relay_addresses: tuple[str, ...] = (),
        wall_offset: float = 0.0,
        nonce_key: bytes | None = None,
    ) -> TurnCore:
        t = cfg.turn
        realm = cfg.server.domain
        creds: Credentials
        if t.mode == "restricted":
            try:
                creds = LongTermCredentials(t.username, t.password, realm)
            except ValueError as exc:  # SASLprep (RFC 4013) refuses e.g. control characters
                raise ConfigError(
                    [f"turn.password: not usable as a TURN password ({exc}); use printable text"]
                ) from None
        else:
            creds = RestCredentials(t.secrets, realm)
        relays = {cfg.server.relay_address, *relay_addresses}
        return cls(
            CoreSettings.from_config(cfg),
            creds,
            dataplane,
            peer_policy=PeerPolicy(
                permissive=t.mode == "permissive",
                allowed=t.allowed_peers,
                denied=t.denied_peers,
                server_addresses=[cfg.server.internal_address],
                relay_addresses=sorted(relays),
                relay_ports=t.relay_port_range,
            ),
            client_policy=ClientPolicy(
                restricted=t.mode == "restricted", media_nodes=t.media_nodes
            ),
            nonces=NonceManager(t.nonce_lifetime, nonce_key),
            guard=guard,
            wall_offset=wall_offset,
        )

    # -- entry points ---------------------------------------------------------------------------

    def handle(self, now: float, client: Client, data: bytes) -> list[bytes]:
        """Process one STUN message from ``client``; return datagrams to send back to it."""
        try:
            msg = parse_message(data)
        except StunError as exc:
            # RFC 8489 §6.3: answer a malformed *request* with its code; drop everything else.
            if (
                exc.code is not None
                and exc.msg_class == MsgClass.REQUEST
                and exc.method is not None
                and exc.transaction_id is not None
            ):
                b = MessageBuilder(exc.method, MsgClass.ERROR, exc.transaction_id)
                return [self._finish_error(b, exc.code, None, False)]
            return []
        if msg.msg_class == MsgClass.INDICATION:
            if msg.method == Method.SEND:
                self._on_send(now, client, msg)
            return []  # other indications (and Data from a client) are ignored, RFC 8656 §10.2
        if msg.msg_class != MsgClass.REQUEST:
            return []
        fp = msg.fingerprint_offset >= 0
        if msg.method == Method.BINDING:
            return [self._binding(client, msg, fp)]
        if msg.method not in _METHODS:
            # RFC 8489 §6.3.1: unknown method in a request -> 400.
            return [self._error(msg, 400, None, fp)]
        if self.guard is not None and self.guard.check(client.ip) is not None:
            return []  # banned: no answer at all (no work, no reflection)
        if not self.clients.may_allocate(client.ip):
            # SPEC §3 restricted mode: refused before any authentication work.
            if not self._may_answer(now, client):
                return []
            if self._loglimit.allow(now):
                log.info(
                    "turn request refused: client %s is not in turn.media_nodes (restricted mode)",
                    client.ip,
                )
            self.answers.add(403, "not-media-node")
            return [self._error(msg, 403, None, fp)]
        auth = self._authenticate(now, client, msg, fp)
        if isinstance(auth, list):
            return auth
        username, key = auth
        unknown = unknown_comprehension_required(msg)
        if unknown:
            extra = [(Attr.UNKNOWN_ATTRIBUTES, encode_unknown_attributes(unknown))]
            return [self._error(msg, 420, key, fp, extra)]
        try:
            if msg.method == Method.ALLOCATE:
                return [self._allocate(now, client, msg, username, key, fp)]
            alloc = self._by_client.get(client.key)
            if alloc is None:
                raise _Reject(437, "no allocation on this 5-tuple")  # RFC 8656 §7.3, §9.2, §11.2
            if username != alloc.username:
                raise _Reject(441, "not the username of the Allocate")  # RFC 8656 §5
            if msg.method == Method.REFRESH:
                return [self._refresh(now, alloc, msg, key, fp)]
            if msg.method == Method.CREATE_PERMISSION:
                return [self._create_permission(now, alloc, msg, key, fp)]
            return [self._channel_bind(now, alloc, msg, key, fp)]
        except StunError as exc:
            log.debug("turn request from %s:%d -> 400: %s", client.ip, client.port, exc.reason)
            return [self._error(msg, exc.code or 400, key, fp)]
        except _Reject as rej:
            log.debug(
                "turn %s from %s:%d -> %d (%s)",
                _METHOD_NAMES.get(msg.method, hex(msg.method)),
                client.ip,
                client.port,
                rej.code,
                rej.where,
            )
            self.answers.add(rej.code, rej.cause)
            return [self._error(msg, rej.code, key, fp, rej.extra)]

    def tick(self, now: float) -> None:
        """Expire allocations, permissions, channels and reservations whose time has come."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, alloc_id, item = heapq.heappop(timers)
            if kind == "resv":
                token = item
                assert isinstance(token, bytes)
                held = self._reservations.get(token)
                if held is not None and held[0] <= now:
                    del self._reservations[token]
                    self._count_user(held[1], -1)
                    self.dp.release_reservation(token)
                continue
            alloc = self.allocations.get(alloc_id)
            if alloc is None:
                continue
            # One pending timer per item: a refresh only moves the expiry, and the timer, when
            # it fires early, re-arms itself (so repeated refreshes cannot grow the heap).
            if kind == "alloc":
                if alloc.expires <= now:
                    self._end(now, alloc, "expired")
                else:
                    alloc.timer_at = alloc.expires
                    self._timer(alloc.expires, "alloc", alloc.id, None)
            elif kind == "perm":
                assert isinstance(item, str)
                exp = alloc.permissions.get(item)
                if exp is None:
                    continue
                if exp <= now:
                    del alloc.permissions[item]
                    self.dp.remove_permission(alloc.id, item)
                else:
                    self._timer(exp, "perm", alloc.id, item)
            elif kind == "chan":
                assert isinstance(item, int)
                ch = alloc.channels.get(item)
                if ch is None:
                    continue
                if ch.expires <= now:
                    self._unbind(now, alloc, ch)
                else:
                    self._timer(ch.expires, "chan", alloc.id, item)
            elif kind == "cool":
                self._sweep_cooldown(now, alloc)

    def has_allocation(self, client_key: Hashable) -> bool:
        return client_key in self._by_client

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def client_gone(self, now: float, client_key: Hashable, reason: str = "tcp-closed") -> None:
        """The client's connection closed (RFC 8656 §3.1: a TCP allocation ends with it)."""
        alloc = self._by_client.get(client_key)
        if alloc is not None:
            self._end(now, alloc, reason)

    def set_host_addresses(self, now: float, addresses: Iterable[str]) -> None:
        """The host's interface addresses changed (the service reads them at start and every
        minute): refuse them as peers from now on, and withdraw permissions and channels that
        were granted to an address before it became one of ours."""
        if not self.peers.set_host_addresses(addresses):
            return
        self._withdraw_refused(now, "is now an address of this host")

    def _withdraw_refused(self, now: float, why: str) -> None:
        """Withdraw the permissions (and their channels) the peer policy now refuses."""
        for alloc in self.allocations.values():
            refused = [ip for ip in alloc.permissions if not self.peers.check(ip).allowed]
            for ip in refused:
                for ch in [c for c in alloc.channels.values() if c.peer[0] == ip]:
                    self._unbind(now, alloc, ch)
                del alloc.permissions[ip]
                self.dp.remove_permission(alloc.id, ip)
                if self._loglimit.allow(now):
                    log.warning(
                        "turn permission withdrawn: user=%s client=%s:%d peer=%s %s",
                        alloc.username,
                        alloc.client.ip,
                        alloc.client.port,
                        ip,
                        why,
                    )

    def adopt(self, now: float, fresh: TurnCore, host_addresses: Iterable[str]) -> None:
        """Take the settings, credentials and policies of `fresh` (built by from_config from a
        reloaded configuration); allocations, permissions, channels and nonces stay.

        A live allocation keeps its key (`_authenticate` accepts it for the allocation's own
        client), so a REST secret or password rotated away never refuses a call in progress;
        permissions to peers the new policy refuses are withdrawn like host addresses are.
        """
        self.s = fresh.s
        if fresh.creds.identity() != self.creds.identity():
            kept = [c for c in self._retired if c.identity() != fresh.creds.identity()]
            self._retired = [self.creds, *kept][:RETIRED_CREDENTIALS]
        self.creds = fresh.creds
        self.peers = fresh.peers
        self.clients = fresh.clients
        self.budget = fresh.budget
        self.node_budget = fresh.node_budget
        self._realm_attr = fresh._realm_attr
        self._software = fresh._software
        self.peers.set_host_addresses(host_addresses)
        self._withdraw_refused(now, "is refused by the reloaded peer policy")

    def shutdown(self, now: float) -> None:
        for alloc in list(self.allocations.values()):
            self._end(now, alloc, "shutdown")
        for token in list(self._reservations):
            self.dp.release_reservation(token)
        self._reservations.clear()

    # -- drain (drain.py) -----------------------------------------------------------------------

    def start_drain(self, now: float, alternate: tuple[str, int] | None = None) -> None:
        """From now on answer new Allocates with 300 (to ``alternate``, else the configured
        ``turn.alternate_server``) or, with neither, 508; everything else goes on.  Calling it
        again while draining changes the alternate."""
        d = self.drain
        if not d.active:
            d.active, d.since, d.redirected, d.refused = True, now, 0, 0
        if alternate is not None:
            d.alternate = alternate
        if not self.allocations and self.on_drained is not None:
            self.on_drained()

    def cancel_drain(self) -> None:
        """Back in service: Allocates are answered again."""
        self.drain.active = False
        self.drain.alternate = self.s.alternate_server

    def _drain_refusal(self) -> None:
        """Raise the answer to an Allocate while draining (RFC 8489 §10, RFC 8656 §7.2)."""
        alt = self.drain.alternate
        if alt is None:
            self.drain.refused += 1
            raise _Reject(508, "draining, no turn.alternate_server", cause="draining")
        self.drain.redirected += 1
        # RFC 8489 §14.15: ALTERNATE-SERVER has the MAPPED-ADDRESS format (not XOR'ed); the
        # 300 carries MESSAGE-INTEGRITY like any answer to an authenticated request (§10).
        raise _Reject(
            300,
            "draining",
            [(Attr.ALTERNATE_SERVER, encode_address(alt[0], alt[1]))],
            cause="draining",
        )

    # -- live figures (metrics.py) --------------------------------------------------------------

    def sample(self, now: float) -> None:
        """Read every allocation's counters from the data plane and update its throughput,
        the relay's total, and (``bandwidth_policy = "degrade"``) each allocation's share.

        Called about once a second by the service; both data planes read their counters
        without stopping the relay."""
        for alloc in self.allocations.values():
            c = self.dp.counters(alloc.id)
            alloc.rate.update(now, c.bytes_to_peer, c.bytes_to_client, c.dropped_bandwidth)
        t = self.dp.totals()
        prev = self._sampled
        if prev is not None and now > prev[0]:
            dt = now - prev[0]
            self.relay_rate = (
                max(0.0, (t.bytes_to_peer - prev[1]) / dt),
                max(0.0, (t.bytes_to_client - prev[2]) / dt),
            )
        self._sampled = (now, t.bytes_to_peer, t.bytes_to_client)
        if self.s.bandwidth_total and self.s.bandwidth_policy == "degrade":
            self._degrade()

    def _degrade(self) -> None:
        """``bandwidth_policy = "degrade"``: when the relay runs at its total cap, every
        allocation that is moving media gets the same share of it (capped by the
        per-allocation cap), so a few heavy flows cannot starve the rest; below the cap each
        allocation has its own cap only."""
        total = self.s.bandwidth_total
        own = self.s.bandwidth_per_allocation
        busy = [a for a in self.allocations.values() if a.rate.to_peer > 0 or a.rate.to_client > 0]
        saturated = max(self.relay_rate) >= 0.9 * total
        share = max(1, total // max(1, len(busy))) if saturated else 0
        for alloc in self.allocations.values():
            rate = min(own, share) if own and share else (share or own)
            if rate != alloc.cap:
                alloc.cap = rate
                self.dp.set_allocation_rate(alloc.id, rate)

    def stats(self) -> dict[str, int]:
        t = self.dp.totals()
        return {
            "allocations": len(self.allocations),
            "bytes_to_peer": t.bytes_to_peer,
            "packets_to_peer": t.pkts_to_peer,
            "bytes_to_client": t.bytes_to_client,
            "packets_to_client": t.pkts_to_client,
            "dropped_no_permission": t.dropped,
            "dropped_bandwidth": t.dropped_bandwidth,
        }

    # -- helpers --------------------------------------------------------------------------------

    def _count_user(self, username: str, delta: int) -> None:
        left = self._per_user.get(username, 0) + delta
        if left > 0:
            self._per_user[username] = left
        else:
            self._per_user.pop(username, None)

    def _timer(self, when: float, kind: str, alloc_id: int, item: object) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, kind, alloc_id, item))

    def _finish_error(
        self,
        b: MessageBuilder,
        code: int,
        key: bytes | None,
        fp: bool,
        extra: Sequence[tuple[int, bytes]] | None = None,
        sha256: bool = False,
    ) -> bytes:
        b.add_error(code, REASONS.get(code, "") if self.s.reason_phrases else "")
        for attr, value in extra or ():
            b.add(attr, value)
        if self._software:
            b.add(Attr.SOFTWARE, self._software)
        return b.build(key=key, sha256=sha256, fingerprint=fp)

    def _error(
        self,
        msg: Message,
        code: int,
        key: bytes | None,
        fp: bool,
        extra: Sequence[tuple[int, bytes]] | None = None,
    ) -> bytes:
        b = MessageBuilder(msg.method, MsgClass.ERROR, msg.transaction_id)
        sha = key is not None and msg.integrity_sha256_offset >= 0
        return self._finish_error(b, code, key, fp, extra, sha)

    def _success(self, msg: Message, key: bytes | None, fp: bool, b: MessageBuilder) -> bytes:
        if self._software:
            b.add(Attr.SOFTWARE, self._software)
        sha = key is not None and msg.integrity_sha256_offset >= 0
        return b.build(key=key, sha256=sha, fingerprint=fp)

    def _may_answer(self, now: float, client: Client) -> bool:
        """May an unauthenticated answer go to this client?  Spends its budget (UDP only)."""
        if client.transport != "udp":
            return True  # TCP/TLS: the handshake proved the source; nothing can be reflected
        if self.clients.is_media_node(client.ip):
            return self.node_budget.spend(now, (client.ip, client.port))
        return self.budget.spend(now, client.ip)

    def _tallied(self, out: list[bytes], code: int, cause: str) -> list[bytes]:
        """Count a challenge in the answer tally (code 0: left unanswered, budget spent)."""
        if out:
            self.answers.add(code, cause)
        else:
            self.answers.add(0, "unauth-budget")
        return out

    def _challenge(
        self, now: float, client: Client, msg: Message, code: int, fp: bool, proven: bool = False
    ) -> list[bytes]:
        """401 / 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4), within the budget unless
        ``proven`` (the request carried our nonce for this address and a valid integrity)."""
        if not proven and not self._may_answer(now, client):
            return []
        # Wall time, not the monotonic `now`: instances sharing the nonce key (cluster.store)
        # must agree on a nonce's age.
        nonce = self.nonces.issue(now + self.wall_offset, client.ip, client.port).encode()
        extra = [(Attr.REALM, self._realm_attr), (Attr.NONCE, nonce)]
        return [self._error(msg, code, None, fp, extra)]

    def _authenticate(
        self, now: float, client: Client, msg: Message, fp: bool
    ) -> tuple[str, bytes] | list[bytes]:
        """RFC 8489 §9.2.4 long-term credential checks; (username, key) or the answer."""
        if msg.integrity_offset < 0 and msg.integrity_sha256_offset < 0:
            return self._tallied(self._challenge(now, client, msg, 401, fp), 401, "no-credentials")
        raw_user = msg.get(Attr.USERNAME)
        realm = msg.get(Attr.REALM)
        nonce = msg.get(Attr.NONCE)
        if raw_user is None or realm is None or nonce is None:
            return [self._error(msg, 400, None, fp)]
        try:
            username = raw_user.decode("utf-8")
            nonce_text = nonce.decode("ascii")
        except UnicodeDecodeError:
            return [self._error(msg, 400, None, fp)]
        wall = now + self.wall_offset
        state = self.nonces.check(nonce_text, wall, client.ip, client.port)
        if state != "fresh":
            # 438 with a fresh nonce.  A stale nonce we minted for this very address, on a
            # request whose integrity verifies, proves a client that heard our earlier answer:
            # its 438 is sent even when forged datagrams have spent the address's budget.
            proven = False
            if state == "stale":
                proven = self._key_of(client, msg, username, wall) is not None
                if not proven:
                    self._auth_failed(now, client, msg, username, wall)
            answer = self._challenge(now, client, msg, 438, fp, proven)
            return self._tallied(answer, 438, "stale-nonce")
        found = self._key_of(client, msg, username, wall)
        if found is None:
            self._auth_failed(now, client, msg, username, wall)
            return self._tallied(self._challenge(now, client, msg, 401, fp), 401, "bad-credentials")
        return username, found

    def _key_of(self, client: Client, msg: Message, username: str, wall: float) -> bytes | None:
        """The key whose integrity verifies: a current credential's, or the key of the
        allocation this client already holds under that username (a reload may have rotated
        the secret or password away: issue 15, "rotation without refusing the old secret's live
        allocations")."""
        found = self._verify(msg, username, wall)
        if found is None:
            alloc = self._by_client.get(client.key)
            if (
                alloc is not None
                and alloc.username == username
                and not self.creds.expired(username, wall)
                and check_integrity(msg, alloc.key)
            ):
                found = alloc.key
        return found

    def _auth_failed(
        self, now: float, client: Client, msg: Message, username: str, wall: float
    ) -> None:
        """A request carrying our nonce for this very address and port (fresh or stale) whose
        integrity does not verify: a wrong password, reported to the guard (``turn_maxretry``).

        The stale case counts too.  RFC 8489 §9.2.4 checks the nonce (438) before the
        integrity, but the source is just as proven (only a client that received our answer at
        that address holds the nonce), and a guess is a guess: not counting it let a client
        keep one nonce past ``nonce_lifetime`` and guess without limit -- over UDP with an
        oracle, since once its own 401 budget is spent a right password still gets the
        (budget-free, "proven") 438 and a wrong one silence.  An invalid nonce (another
        address's, forged, or from an instance with another key) is never counted: UDP
        sources are forgeable, and counting it would let anyone get an innocent address banned.

        Not guesses, so refused without being counted: a well-formed credential that has
        merely expired, and one that verifies with credentials a reload rotated away (the
        password of before, or a REST username used while its removed secret was current).
        Rotation cannot be atomic: in restricted mode the media node keeps the old password
        until it is reconfigured, and a browser may hold a REST credential of a removed
        secret.  Counted, its new Allocates got the node banned
        after ``turn_maxretry`` of them, and the ban then dropped the Refreshes of the very
        allocations that rotation promises to keep (issue 15; CONFIGURATION.md, "Reload").
        """
        if self._retired_verify(msg, username, wall):
            if self._loglimit.allow(now):
                log.info(
                    "turn credential rotated away by a reload: client %s:%d", client.ip, client.port
                )
            return
        if self.guard is not None and not self.creds.expired(username, wall):
            self.guard.record_turn_auth_failure(client.ip)
        if self._loglimit.allow(now):
            log.info("turn authentication failed: client %s:%d", client.ip, client.port)

    def _retired_verify(self, msg: Message, username: str, wall: float) -> bool:
        """Does the request verify with credentials a reload rotated away?  Only with keys
        already at hand (`Credentials.known_keys_for`): a restricted-mode password's, and REST
        usernames used while their secret was current."""
        return any(
            check_integrity(msg, key)
            for creds in self._retired
            for key in creds.known_keys_for(username, wall)
        )

    def _verify(self, msg: Message, username: str, wall: float) -> bytes | None:
        """The key whose MESSAGE-INTEGRITY(-SHA256) verifies, or None."""
        found: bytes | None = None
        # Check every candidate key (REST: one per secret) so timing does not reveal which.
        for key in self.creds.keys_for(username, wall):
            if check_integrity(msg, key) and found is None:
                found = key
        return found

    def _binding(self, client: Client, msg: Message, fp: bool) -> bytes:
        # RFC 8489 §7.3.1: reflect the source transport address.
        b = MessageBuilder(Method.BINDING, MsgClass.SUCCESS, msg.transaction_id)
        b.add_xor_address(Attr.XOR_MAPPED_ADDRESS, client.ip, client.port)
        return self._success(msg, None, fp, b)

    def _lifetime(self, requested: int | None) -> int:
        """RFC 8656 §7.2 / §7.3: min(requested, max), but never below the default."""
        if requested is None:
            return self.s.default_lifetime
        return max(self.s.default_lifetime, min(requested, self.s.max_lifetime))

    def _peer(
        self, now: float, alloc: Allocation, value: bytes, tid: bytes, *, with_port: bool
    ) -> tuple[str, int]:
        """Decode XOR-PEER-ADDRESS and apply the peer policy (SPEC §3) and family check.

        ``with_port``: the port matters (ChannelBind), not only the IP (CreatePermission, whose
        port RFC 8656 §9 says to ignore)."""
        ip, port = decode_xor_address(value, tid)
        verdict = self.peers.check(ip)
        rule = verdict.rule
        ok = verdict.allowed
        if ok and with_port and not self.peers.port_allowed(verdict, port):
            ok, rule = False, "server-address (not a relay port)"
        if not ok:
            if self._loglimit.allow(now):
                log.warning(
                    "turn peer refused (403): user=%s client=%s:%d peer=%s (as %s) rule=%s",
                    alloc.username,
                    alloc.client.ip,
                    alloc.client.port,
                    f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}",
                    verdict.address,
                    rule,
                )
            raise _Reject(403, f"peer policy: {rule}", cause="peer-policy")
        if (6 if ":" in ip else 4) != alloc.relay.family:
            raise _Reject(443, "peer family differs from relay")  # RFC 8656 §9.2, RFC 6156 §6
        return ip, port

    # -- methods --------------------------------------------------------------------------------

    def _allocate(
        self, now: float, client: Client, msg: Message, username: str, key: bytes, fp: bool
    ) -> bytes:
        """RFC 8656 §7.2 (and RFC 6156 §4.2 for the address family)."""
        existing = self._by_client.get(client.key)
        if existing is not None:
            if existing.create_tid == msg.transaction_id:
                return existing.create_response  # retransmission: same answer
            raise _Reject(437, "5-tuple already has an allocation")
        if self.drain.active:
            self._drain_refusal()
        rt = msg.get(Attr.REQUESTED_TRANSPORT)
        if rt is None:
            raise _Reject(400, "REQUESTED-TRANSPORT missing")
        if decode_requested_transport(rt) != UDP:
            raise _Reject(442, "REQUESTED-TRANSPORT is not UDP")
        dont_fragment = msg.has(Attr.DONT_FRAGMENT)
        raw_token = msg.get(Attr.RESERVATION_TOKEN)
        raw_even = msg.get(Attr.EVEN_PORT)
        raw_family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if raw_token is not None and (raw_even is not None or raw_family is not None):
            raise _Reject(400, "RESERVATION-TOKEN with EVEN-PORT or REQUESTED-ADDRESS-FAMILY")
        if raw_family is not None and msg.has(Attr.ADDITIONAL_ADDRESS_FAMILY):
            raise _Reject(400, "REQUESTED- and ADDITIONAL-ADDRESS-FAMILY together")
        families = self.dp.families()
        if raw_family is not None:
            fam_code = decode_requested_address_family(raw_family)
            family = {1: 4, 2: 6}.get(fam_code, 0)
            if family not in families:
                raise _Reject(440, f"no IPv{family or '?'} relay address")
        else:
            family = 4 if 4 in families else 6
        token = decode_reservation_token(raw_token) if raw_token is not None else None
        even = raw_even is not None
        reserve = decode_even_port(raw_even) if raw_even is not None else False
        held = self._reservations.get(token) if token is not None else None
        if token is not None and held is None:
            raise _Reject(508, "unknown RESERVATION-TOKEN", cause="reservation-token")  # §7.2
        # A held port about to become this allocation is already counted; a new reservation
        # (EVEN-PORT with R) will count too.
        extra = (1 if reserve else 0) - (1 if held is not None else 0)
        mine = 1 if held is not None and held[1] == username else 0
        if len(self.allocations) + len(self._reservations) + extra >= self.s.max_allocations:
            raise _Reject(508, "turn.max_allocations reached", cause="max-allocations")
        if self._per_user.get(username, 0) + (1 if reserve else 0) - mine >= self.s.user_quota:
            raise _Reject(486, "per-user quota reached", cause="user-quota")
        total = self.s.bandwidth_total
        if total and self.s.bandwidth_policy == "refuse" and max(self.relay_rate) >= 0.95 * total:
            # turn.bandwidth_policy = "refuse": the relay runs at its total cap; a new call would
            # only take from the ones in progress.
            raise _Reject(508, "turn.bandwidth_total reached", cause="bandwidth-total")
        if token is not None and held is not None:
            del self._reservations[token]
            self._count_user(held[1], -1)
            family = held[2]
        new_token = os.urandom(8) if reserve else None
        alloc_id = self._next_id
        self._next_id += 1
        try:
            grant = self.dp.add_allocation(
                alloc_id,
                family,
                client.key,
                client.sink,
                even_port=even,
                reserve_token=new_token,
                use_token=token,
                dont_fragment=dont_fragment,
                user=username,
            )
        except CapacityError as exc:
            log.warning("turn allocation failed (508): %s", exc)
            raise _Reject(508, str(exc), cause="relay-ports") from None
        if new_token is not None:
            self._reservations[new_token] = (now + RESERVATION_LIFETIME, username, family)
            self._count_user(username, +1)
            self._timer(now + RESERVATION_LIFETIME, "resv", 0, new_token)
        lifetime = self._lifetime(decode_u32(lt) if (lt := msg.get(Attr.LIFETIME)) else None)
        b = MessageBuilder(Method.ALLOCATE, MsgClass.SUCCESS, msg.transaction_id)
        b.add_xor_address(Attr.XOR_RELAYED_ADDRESS, grant.ip, grant.port)
        b.add(Attr.LIFETIME, encode_u32(lifetime))
        if new_token is not None:
            b.add(Attr.RESERVATION_TOKEN, new_token)
        b.add_xor_address(Attr.XOR_MAPPED_ADDRESS, client.ip, client.port)
        response = self._success(msg, key, fp, b)
        alloc = Allocation(
            id=alloc_id,
            client=client,
            username=username,
            key=key,
            relay=grant,
            created=now,
            expires=now + lifetime,
            create_tid=msg.transaction_id,
            create_response=response,
        )
        self.allocations[alloc_id] = alloc
        self._by_client[client.key] = alloc
        self._count_user(username, +1)
        alloc.timer_at = alloc.expires
        self._timer(alloc.expires, "alloc", alloc_id, None)
        log.debug(
            "allocation created: user=%s client=%s:%d/%s relay=%s:%d lifetime=%d",
            username,
            client.ip,
            client.port,
            client.transport,
            grant.ip,
            grant.port,
            lifetime,
        )
        return response

    def _refresh(self, now: float, alloc: Allocation, msg: Message, key: bytes, fp: bool) -> bytes:
        """RFC 8656 §7.3; lifetime 0 deletes the allocation."""
        raw_family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if raw_family is not None:
            fam = {1: 4, 2: 6}.get(decode_requested_address_family(raw_family), 0)
            if fam != alloc.relay.family:
                raise _Reject(443, "REQUESTED-ADDRESS-FAMILY differs from relay")
        lt = msg.get(Attr.LIFETIME)
        requested = decode_u32(lt) if lt is not None else None
        if requested == 0:
            self._end(now, alloc, "refreshed-to-0")
            lifetime = 0
        else:
            lifetime = self._lifetime(requested)
            alloc.expires = now + lifetime
            if alloc.expires < alloc.timer_at:  # shortened: the pending timer would be late
                alloc.timer_at = alloc.expires
                self._timer(alloc.expires, "alloc", alloc.id, None)
        b = MessageBuilder(Method.REFRESH, MsgClass.SUCCESS, msg.transaction_id)
        b.add(Attr.LIFETIME, encode_u32(lifetime))
        return self._success(msg, key, fp, b)

    def _install_permissions(self, now: float, alloc: Allocation, ips: list[str]) -> None:
        new = {ip for ip in ips if ip not in alloc.permissions}
        if len(alloc.permissions) + len(new) > self.s.max_permissions:
            raise _Reject(508, "turn.max_permissions reached", cause="max-permissions")
        expires = now + self.s.permission_lifetime
        for ip in ips:
            alloc.permissions[ip] = expires
            if ip in new:
                self.dp.add_permission(alloc.id, ip)
                self._timer(expires, "perm", alloc.id, ip)

    def _create_permission(
        self, now: float, alloc: Allocation, msg: Message, key: bytes, fp: bool
    ) -> bytes:
        """RFC 8656 §9.2: all-or-nothing over every XOR-PEER-ADDRESS."""
        values = msg.get_all(Attr.XOR_PEER_ADDRESS)
        if not values:
            raise _Reject(400, "no XOR-PEER-ADDRESS")
        ips = [self._peer(now, alloc, v, msg.transaction_id, with_port=False)[0] for v in values]
        self._install_permissions(now, alloc, ips)
        b = MessageBuilder(Method.CREATE_PERMISSION, MsgClass.SUCCESS, msg.transaction_id)
        return self._success(msg, key, fp, b)

    def _channel_bind(
        self, now: float, alloc: Allocation, msg: Message, key: bytes, fp: bool
    ) -> bytes:
        """RFC 8656 §11.2."""
        raw_ch = msg.get(Attr.CHANNEL_NUMBER)
        raw_peer = msg.get(Attr.XOR_PEER_ADDRESS)
        if raw_ch is None or raw_peer is None:
            raise _Reject(400, "CHANNEL-NUMBER or XOR-PEER-ADDRESS missing")
        number = decode_channel_number(raw_ch)  # 400 outside 0x4000-0x7FFF (RFC 5766 range)
        peer = self._peer(now, alloc, raw_peer, msg.transaction_id, with_port=True)
        bound = alloc.channels.get(number)
        if bound is not None and bound.peer != peer:
            raise _Reject(400, "number already bound to another peer")
        other = alloc.peer_channel.get(peer)
        if other is not None and other != number:
            raise _Reject(400, "peer already bound to another number")
        if bound is None:
            # §11: after expiry the pair stays locked for 5 minutes.
            self._sweep_cooldown(now, alloc)
            cool = alloc.cool_number.get(number)
            if cool is not None and cool[0] != peer:
                raise _Reject(400, "channel number cooling down after expiry")
            coolp = alloc.cool_peer.get(peer)
            if coolp is not None and coolp[0] != number:
                raise _Reject(400, "peer cooling down after its channel expired")
            if len(alloc.channels) >= self.s.max_channels:
                raise _Reject(508, "turn.max_channels reached", cause="max-channels")
        # §11.2: binding also installs or refreshes the permission for the peer's IP.
        self._install_permissions(now, alloc, [peer[0]])
        expires = now + self.s.channel_lifetime
        if bound is None:
            try:
                self.dp.add_channel(alloc.id, number, peer)
            except CapacityError as exc:  # PeerTaken: turn.relay_multiplex (turn/multiplex.py)
                raise _Reject(508, str(exc), cause="relay-multiplex") from None
            alloc.channels[number] = _Channel(number, peer, expires)
            alloc.peer_channel[peer] = number
            alloc.cool_number.pop(number, None)
            alloc.cool_peer.pop(peer, None)
            self._timer(expires, "chan", alloc.id, number)
        else:
            bound.expires = expires
        b = MessageBuilder(Method.CHANNEL_BIND, MsgClass.SUCCESS, msg.transaction_id)
        return self._success(msg, key, fp, b)

    def _on_send(self, now: float, client: Client, msg: Message) -> None:
        """RFC 8656 §10.2: Send indication; every failure is a silent drop."""
        alloc = self._by_client.get(client.key)
        if alloc is None or unknown_comprehension_required(msg):
            return
        raw_peer = msg.get(Attr.XOR_PEER_ADDRESS)
        data = msg.get(Attr.DATA)
        if raw_peer is None or data is None:
            return
        try:
            ip, port = decode_xor_address(raw_peer, msg.transaction_id)
        except StunError:
            return
        if ip not in alloc.permissions:
            return
        verdict = self.peers.check(ip)
        if not verdict.allowed or not self.peers.port_allowed(verdict, port):
            return
        self.dp.send_to_peer(alloc.id, (ip, port), data)

    # -- teardown -------------------------------------------------------------------------------

    def _unbind(self, now: float, alloc: Allocation, ch: _Channel) -> None:
        del alloc.channels[ch.number]
        alloc.peer_channel.pop(ch.peer, None)
        self.dp.remove_channel(alloc.id, ch.number, ch.peer)
        until = now + CHANNEL_COOLDOWN
        alloc.cool_number[ch.number] = (ch.peer, until)
        alloc.cool_peer[ch.peer] = (ch.number, until)
        self._timer(until, "cool", alloc.id, None)

    @staticmethod
    def _sweep_cooldown(now: float, alloc: Allocation) -> None:
        for n, (_, until) in list(alloc.cool_number.items()):
            if until <= now:
                del alloc.cool_number[n]
        for p, (_, until) in list(alloc.cool_peer.items()):
            if until <= now:
                del alloc.cool_peer[p]

    def _end(self, now: float, alloc: Allocation, reason: str) -> None:
        """Delete an allocation and write its one log line (no secrets in it)."""
        self.allocations.pop(alloc.id, None)
        if self._by_client.get(alloc.client.key) is alloc:
            del self._by_client[alloc.client.key]
        self._count_user(alloc.username, -1)
        c = self.dp.remove_allocation(alloc.id)
        self.lifetimes.observe(now - alloc.created)
        relay = alloc.relay
        relay_txt = (
            f"[{relay.ip}]:{relay.port}" if relay.family == 6 else f"{relay.ip}:{relay.port}"
        )
        log.info(
            "allocation ended: user=%s client=%s:%d/%s relay=%s to_peer=%d bytes/%d pkts "
            "to_client=%d bytes/%d pkts dropped=%d over_cap=%d duration=%.0fs reason=%s",
            alloc.username,
            alloc.client.ip,
            alloc.client.port,
            alloc.client.transport,
            relay_txt,
            c.bytes_to_peer,
            c.pkts_to_peer,
            c.bytes_to_client,
            c.pkts_to_client,
            c.dropped,
            c.dropped_bandwidth,
            now - alloc.created,
            reason,
        )
        if self.drain.active and not self.allocations and self.on_drained is not None:
            self.on_drained()


_METHOD_NAMES = {m.value: m.name for m in Method}
_METHODS = frozenset(
    {Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND}
)
