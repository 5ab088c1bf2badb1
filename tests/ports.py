"""Loopback ports for tests.

Each test area has its own port range (so areas running side by side, or a running demo, never
collide); tests that can use any port and bind it themselves bind port 0; tests that must name
a port before something binds it (a subprocess, a config file) take a spare one (spare_port).
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Callable

# Ports for tests that name a port and bind it later (often in a subprocess). Below the kernel's
# ephemeral range (32768-60999): a port the kernel gave out for bind(0) and took back was often
# handed to another test's socket before the subprocess bound it ("Address already in use" in
# test_cluster.py). Here nothing binds but a test that picked the port, at random among ~1000.
SPARE_PORTS = range(31000, 32000)


def spare_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1 now, drawn at random from SPARE_PORTS."""
    return spare_ports(1)[0]


def spare_ports(n: int) -> list[int]:
    """`n` different ports from SPARE_PORTS, each free for TCP and UDP now."""
    ports = list(SPARE_PORTS)
    random.shuffle(ports)
    found = [p for p in ports[: 4 * n + 50] if port_free(p)][:n]
    if len(found) < n:
        found = [p for p in ports if port_free(p)][:n]
    if len(found) < n:
        raise RuntimeError(f"fewer than {n} free ports in {SPARE_PORTS}")
    return found


def free_port(lo: int, hi: int, *, shuffle: bool = False, udp: bool = False) -> int:
    """A port in [lo, hi) free for TCP (and for UDP too when `udp`) on 127.0.0.1 now.

    `shuffle` tries the range in random order: for servers restarted per case, so that a fresh
    one does not land on a port a previous case's client still remembers.
    """
    ports = list(range(lo, hi))
    if shuffle:
        random.shuffle(ports)
    for port in ports:
        if port_free(port, udp=udp):
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


# `confedge demo --port-base N` in tests: N in this range, below the kernel's ephemeral ports
# (32768-60999) and clear of the other areas' ranges. A demo uses N..N+7 and relays on
# N+100..N+1099 (src/confedge/demo.py); relays are picked at random and skip busy ports, so a
# neighbour's relay range overlapping these service ports costs nothing in practice.
DEMO_BASES = range(25000, 31000, 100)
DEMO_SERVICE_PORTS = 8


def demo_port_base() -> int:
    """A port base for a demo whose service ports are all free (TCP and UDP) now, tried in
    random order so that test runs side by side rarely pick the same one."""
    bases = list(DEMO_BASES)
    random.shuffle(bases)
    for base in bases:
        if all(port_free(p) for p in range(base, base + DEMO_SERVICE_PORTS)):
            return base
    raise RuntimeError(f"no demo port base free in {DEMO_BASES}")


def port_free(port: int, *, tcp: bool = True, udp: bool = True) -> bool:
    """Whether `port` can be bound on 127.0.0.1 now, for TCP when `tcp` and UDP when `udp`."""
    try:
        with contextlib.ExitStack() as held:
            if tcp:
                held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            if udp:
                u = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                u.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def udp_echo_ready(
    host: str, port: int, proc_alive: Callable[[], bool], timeout: float = 5.0
) -> None:
    """Wait until the UDP echo server on host:port (turnutils_peer) answers a probe.

    Why: a fixed sleep after starting it passed a peer that had not bound yet, or had exited
    because its port was taken (it reports that on its stderr only), and the TURN test then
    failed as "0 messages back" with no hint. Raises RuntimeError naming which.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            if not proc_alive():
                raise RuntimeError(f"the UDP echo peer on {host}:{port} exited (port taken?)")
            s.sendto(b"ready?", (host, port))
            try:
                if s.recv(64) == b"ready?":
                    return
            except OSError:  # timeout, or ICMP port unreachable: not bound yet
                continue
    raise RuntimeError(f"the UDP echo peer on {host}:{port} did not answer in {timeout:g} s")


def tcp_listening(
    port: int, proc: subprocess.Popen[str], what: str, *, timeout: float = 60.0
) -> None:
    """Wait until something accepts TCP on 127.0.0.1:`port` while `proc` (which should) lives.

    Raises AssertionError with the process's output when it exits first (a port taken, a bad
    configuration: its own words), or naming `what` when nothing listens within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout is not None else ""
            raise AssertionError(f"{what} exited {proc.returncode}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{what}: nothing listening on {port} after {timeout:g} s"
                ) from None
            time.sleep(0.1)
