"""The cluster registry's records, sans I/O: what one instance publishes and what it accepts
from the others.

Why a record per instance rather than a key per allocation: one SET with a TTL per publication
makes a dead instance's allocations vanish together, after ``cluster.ttl``, without any cleanup
by the survivors; and a reader gets every instance with one MGET. The record carries at most
``MAX_LISTED`` allocations (the busiest first) and the true count beside them.

Records come from other processes, possibly of other versions, and from a store anyone with the
Redis password can write: :func:`decode_record` checks every field and refuses what does not
fit, so one bad record costs that instance's line on the page, never the page.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import socket
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "MAX_LISTED",
    "AllocationRow",
    "InstanceRecord",
    "decode_record",
    "instance_name",
    "secret_fingerprint",
]

MAX_LISTED = 200
STATES = ("serving", "draining")


def instance_name(configured: str) -> str:
    """``cluster.instance``, or the host name's first label when it is empty."""
    if configured:
        return configured
    host = socket.gethostname().split(".", 1)[0]
    return host or "confedge"


def secret_fingerprint(secrets: Sequence[str]) -> str:
    """A short tag of the current REST secret (the first of ``turn.secrets``), "" without one.

    Instances compare tags to find one whose configuration lags a rotation; the secret itself
    never leaves the configuration file. The tag is an HMAC keyed with the secret, so it is as
    hard to reverse as any REST password a browser already holds."""
    if not secrets:
        return ""
    return hmac.new(
        secrets[0].encode(), b"confedge cluster fingerprint", hashlib.sha256
    ).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AllocationRow:
    """One live allocation as the other instances see it."""

    client: str  # "ip:port" ([ip]:port for IPv6) and transport, e.g. "192.0.2.7:5000/udp"
    relay: str
    username: str
    created: float  # Unix time
    bytes_to_peer: int
    bytes_to_client: int


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What one instance publishes every ``cluster.interval`` seconds."""

    instance: str
    state: str  # "serving" or "draining"
    started: float  # Unix time
    updated: float  # Unix time of this publication
    turn: str  # the TURN listener "host:port", "" when TURN is off
    fingerprint: str  # secret_fingerprint() of its REST secret, "" in restricted mode
    allocation_count: int
    allocations: list[AllocationRow] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def busiest(rows: Iterable[AllocationRow], limit: int = MAX_LISTED) -> list[AllocationRow]:
    """The ``limit`` rows that relayed most, most first (ties: oldest first)."""
    return sorted(rows, key=lambda r: (-(r.bytes_to_peer + r.bytes_to_client), r.created))[:limit]


def _str(d: dict[str, Any], k: str, limit: int = 300) -> str:
    v = d[k]
    if not isinstance(v, str) or len(v) > limit:
        raise ValueError(k)
    return v


def _num(d: dict[str, Any], k: str) -> float:
    """A time: finite and not negative. ``json.loads`` takes ``Infinity`` and ``1e999`` (inf);
    such a time once made /status.json a 500 (``allow_nan=False``) and the status page a 500
    (``duration()`` of an infinite age), for as long as the record stayed in Redis."""
    v = d[k]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(k)
    v = float(v)  # OverflowError for an int past a float's range (caught by decode_record)
    if not math.isfinite(v) or v < 0:
        raise ValueError(k)
    return v


MAX_COUNT = 2**63 - 1


def _count(d: dict[str, Any], k: str) -> int:
    """A counter: an int from 0 to 2**63-1. A JSON int may have 4300 digits, and
    ``human_bytes()`` of one past a float's range raised OverflowError (the page a 500)."""
    v = d[k]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
        raise ValueError(k)
    return v


def decode_record(raw: str | bytes | None) -> InstanceRecord | None:
    """The record in ``raw``, or None when it is absent or does not fit (see the module doc)."""
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or not isinstance(d.get("allocations"), list):
            return None
        rows = []
        for a in d["allocations"][:MAX_LISTED]:
            if not isinstance(a, dict):
                return None
            rows.append(
                AllocationRow(
                    client=_str(a, "client"),
                    relay=_str(a, "relay"),
                    username=_str(a, "username", 600),
                    created=_num(a, "created"),
                    bytes_to_peer=_count(a, "bytes_to_peer"),
                    bytes_to_client=_count(a, "bytes_to_client"),
                )
            )
        state = _str(d, "state")
        return InstanceRecord(
            instance=_str(d, "instance", 63),
            state=state if state in STATES else "unknown",
            started=_num(d, "started"),
            updated=_num(d, "updated"),
            turn=_str(d, "turn"),
            fingerprint=_str(d, "fingerprint", 64),
            allocation_count=_count(d, "allocation_count"),
            allocations=rows,
        )
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None


def allocation_rows(turn_core: Any) -> list[AllocationRow]:
    """Every live allocation of a ``TurnCore``, with its data plane's counters now.

    Reads ``allocations``, ``wall_offset`` and ``dp.counters`` only: the registry is a reader
    of TURN's state and never on its packet path."""
    if turn_core is None:
        return []
    off = float(turn_core.wall_offset)
    out = []
    for alloc in list(turn_core.allocations.values()):
        c = turn_core.dp.counters(alloc.id)
        out.append(
            AllocationRow(
                client=f"{hostport(alloc.client.ip, alloc.client.port)}/{alloc.client.transport}",
                relay=hostport(alloc.relay.ip, alloc.relay.port),
                username=alloc.username,
                created=alloc.created + off,
                bytes_to_peer=c.bytes_to_peer,
                bytes_to_client=c.bytes_to_client,
            )
        )
    return out
