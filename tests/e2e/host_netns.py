"""Network namespaces for the host tests: made, used, and always removed by the test that made them.

Names start with "h13host-" (namespaces) and "h13h" (veth ends, 15 characters at most) plus a
random tag, so parallel runs never collide, and nothing is ever loaded into the root
namespace: every nft, ip and confedge command goes through `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFEDGE = str(Path(sys.executable).with_name("confedge"))
CLIENT = str(Path(__file__).with_name("host_netns_client.py"))


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


class Netns:
    """One namespace; `exec` runs a command inside it, `spawn` starts a process inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[str]] = []

    def exec(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in {self.name}: {proc.stderr or proc.stdout}")
        return proc.stdout

    def spawn(
        self, *cmd: str, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        fh = log.open("w")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        fh.close()
        self.procs.append(proc)
        return proc

    def client(self, *args: str) -> dict[str, object]:
        """One host_netns_client.py command in this namespace; its JSON answer."""
        out = self.exec(sys.executable, CLIENT, *args)
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def nft_json(self, *what: str) -> list[dict[str, object]]:
        data = json.loads(self.exec("nft", "-j", "list", *what))
        return data["nftables"]  # type: ignore[no-any-return]

    def rule_packets(self, comment: str) -> int:
        """Packets counted by the rule(s) of table inet confedge with this comment."""
        total = 0
        for item in self.nft_json("table", "inet", "confedge"):
            rule = item.get("rule")
            if isinstance(rule, dict) and rule.get("comment") == comment:
                for expr in rule["expr"]:
                    if "counter" in expr:
                        total += int(expr["counter"]["packets"])
        return total

    def banned(self) -> list[str]:
        out: list[str] = []
        for item in self.nft_json("table", "inet", "confedge"):
            s = item.get("set")
            if isinstance(s, dict) and str(s.get("name", "")).startswith("confedge_banned"):
                for e in s.get("elem", []):
                    val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                    out.append(str(val))
        return out

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@contextlib.contextmanager
def namespaces(*roles: str) -> Iterator[dict[str, Netns]]:
    """Namespaces named h13host-<role>-<tag>, loopback up; all deleted on exit."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = secrets.token_hex(3)
    made: dict[str, Netns] = {}
    try:
        for role in roles:
            ns = Netns(f"h13host-{role}-{tag}")
            _run("ip", "netns", "add", ns.name)
            made[role] = ns
            ns.exec("ip", "link", "set", "lo", "up")
        probe = made[roles[0]]
        res = subprocess.run(
            ["ip", "netns", "exec", probe.name, "nft", "add", "table", "inet", "h13host_probe"],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            pytest.skip(f"the kernel refuses nf_tables in a namespace: {res.stderr.strip()}")
        probe.exec("nft", "delete", "table", "inet", "h13host_probe")
        yield made
    finally:
        for ns in made.values():
            ns.stop_all()
        for ns in made.values():
            _run("ip", "netns", "del", ns.name, check=False)


_link_count = 0


def link(a: Netns, a_addrs: list[str], b: Netns, b_addrs: list[str]) -> tuple[str, str]:
    """A veth pair between two namespaces with the given CIDR addresses; (a end, b end)."""
    global _link_count
    _link_count += 1
    tag = secrets.token_hex(2)
    ea, eb = f"h13h{tag}{_link_count}a", f"h13h{tag}{_link_count}b"
    _run("ip", "link", "add", ea, "netns", a.name, "type", "veth", "peer", eb, "netns", b.name)
    for ns, end, addrs in ((a, ea, a_addrs), (b, eb, b_addrs)):
        for addr in addrs:
            ns.exec("ip", "addr", "add", addr, "dev", end)
        ns.exec("ip", "link", "set", end, "up")
    return ea, eb


def wait_ready(sock: socket.socket, proc: subprocess.Popen[str], log: Path) -> list[str]:
    """Read sd_notify datagrams until READY=1; return every message received so far."""
    seen: list[str] = []
    deadline = time.monotonic() + 40
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"confedge exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any("READY=1" in m.splitlines() for m in seen):
            return seen
    raise AssertionError(f"no READY=1 within 40 s: {seen}; log: {log.read_text()[-3000:]}")


def notify_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    return s
