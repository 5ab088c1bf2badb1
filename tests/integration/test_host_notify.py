"""sd_notify as systemd would see it: `confedge run` talking to a fake $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from confedge.host.notify import Notifier
from ports import spare_ports

CONFEDGE = str(Path(sys.executable).with_name("confedge"))


def _recv_until(sock: socket.socket, want: str, seen: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if want in seen[-1].splitlines():
            return
    raise AssertionError(f"no {want} within {timeout} s; got {seen}")


def test_notifier_parses_the_environment(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    n = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval == 15.0
    other = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is meant for another process
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert gone.send(READY=1) is False  # logged once, never raised
    assert Notifier({}).send(READY=1) is False


def test_run_sends_ready_watchdog_reloading_and_stopping(tmp_path: Path) -> None:
    name = f"h13host-notify-{secrets.token_hex(4)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # abstract namespace: NOTIFY_SOCKET="@name"
    https, mgmt = spare_ports(2)
    cfg = tmp_path / "confedge.toml"
    cfg.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[proxy]\nhttps_port = {https}\nhttp_port = 0\nnodes = ["http://127.0.0.1:9"]\n'
        "workers = 1\n"
        '[turn]\nport = 0\ntls_port = 0\nrelay_ports = "21000-21010"\nusername = "u"\n'
        'password = "p"\n'
        f"[management]\nport = {mgmt}\n"
    )
    env = dict(os.environ, NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        [CONFEDGE, "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    try:
        _recv_until(sock, "READY=1", seen)
        ready = seen[-1].splitlines()
        assert any(line.startswith("STATUS=running: guard, turn, proxy, admin") for line in ready)
        # READY comes after every part listens: the HTTPS and management ports answer now.
        for port in (https, mgmt):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # WATCHDOG=1 every WATCHDOG_USEC / 2 (0.2 s): several within a second.
        t0 = time.monotonic()
        for _ in range(3):
            _recv_until(sock, "WATCHDOG=1", seen, timeout=2)
        assert time.monotonic() - t0 < 1.5
        proc.send_signal(signal.SIGHUP)
        _recv_until(sock, "RELOADING=1", seen)
        assert any(line.startswith("MONOTONIC_USEC=") for line in seen[-1].splitlines())
        _recv_until(sock, "READY=1", seen)
        # A drain (SIGUSR1) shows in STATUS with what is left; SIGUSR2 cancels it.
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not any(ln.startswith("STATUS=draining (draining): ") for ln in seen[-1].split("\n")):
            assert time.monotonic() < deadline, seen[-5:]
            with contextlib.suppress(TimeoutError):
                seen.append(sock.recv(4096).decode())
        assert "turn allocations" in seen[-1]
        proc.send_signal(signal.SIGUSR2)
        _recv_until(sock, "STATUS=running; drain cancelled", seen)
        proc.send_signal(signal.SIGTERM)
        _recv_until(sock, "STOPPING=1", seen)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
