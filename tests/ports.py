"""Loopback ports for tests.

Each test area has its own port range (so areas running side by side, or a running demo, never
collide); tests that can use any port take an ephemeral one from the kernel.
"""

from __future__ import annotations

import random
import socket


def ephemeral_port() -> int:
    """A TCP port the kernel considers free now (bind to port 0, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port(lo: int, hi: int, *, shuffle: bool = False, udp: bool = False) -> int:
    """A port in [lo, hi) free for TCP (and for UDP too when `udp`) on 127.0.0.1 now.

    `shuffle` tries the range in random order: for servers restarted per case, so that a fresh
    one does not land on a port a previous case's client still remembers.
    """
    ports = list(range(lo, hi))
    if shuffle:
        random.shuffle(ports)
    for port in ports:
        try:
            with socket.socket() as t:
                t.bind(("127.0.0.1", port))
                if udp:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                        u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port in {lo}-{hi - 1}")


def has_ipv6_loopback() -> bool:
    """True when ::1 can be bound (containers and CI hosts sometimes have IPv6 off)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True
