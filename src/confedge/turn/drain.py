"""Draining the TURN server: refuse or redirect new allocations, keep the live ones (sans-I/O).

Why: taking an edge out of service must not cut a call.  While draining, the core answers a
new Allocate with 300 Try Alternate naming ``turn.alternate_server`` in ALTERNATE-SERVER
(RFC 8489 §10, RFC 8656 §6.2 "the server MAY redirect"), authenticated like any answer to an
authenticated request (§10: a client discards an unauthenticated 300 once it has sent
credentials), or, with no alternate configured, with 508 Insufficient Capacity (RFC 8656 §7.2:
the client then tries another server).  Everything else -- Refresh, CreatePermission,
ChannelBind, relaying -- goes on, so the calls in progress continue until their allocations end.
:class:`Drain` holds the state; :class:`~.service.TurnService` exposes it (``start_drain``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["Drain", "parse_alternate"]

DEFAULT_PORT = 3478


def parse_alternate(value: str) -> tuple[str, int]:
    """``"203.0.113.6:3478"``, ``"203.0.113.6"`` (port 3478) or ``"[2001:db8::6]:3478"``.

    ALTERNATE-SERVER carries an IP address and port (RFC 8489 §14.15), not a host name, so a
    name is refused here rather than resolved once and silently kept.  Raises ValueError."""
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f'"{value}" has no closing "]" (e.g. "[2001:db8::6]:3478")')
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f'"{value}" is not "[address]:port"')
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f'"{value}" is not an IP address and port (ALTERNATE-SERVER carries an address, '
            'not a name: e.g. "203.0.113.6:3478" or "[2001:db8::6]:3478")'
        ) from None
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f'"{value}": the port must be within 1-65535')
        port = int(port_text)
    return str(ip), port


@dataclass(slots=True)
class Drain:
    """Drain state of one TURN core.  ``alternate`` is where new Allocates are sent (or None:
    508); ``since`` the time (core clock) draining began; ``redirected`` and ``refused`` count
    the Allocates turned away since then."""

    active: bool = False
    alternate: tuple[str, int] | None = None
    since: float = 0.0
    redirected: int = 0
    refused: int = 0
