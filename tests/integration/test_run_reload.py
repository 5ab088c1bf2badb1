"""`confedge run` as an operator meets it: SIGHUP reloads the certificate without dropping anyone."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ops_support import peer_cn as _peer_cn
from ops_support import write_cert as _write_cert

from ports import spare_ports


def _wait_port(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} never opened")


def _start(tmp_path: Path, workers: int) -> tuple[subprocess.Popen[str], Path, Path, int, int]:
    """`confedge run` with the proxy (`workers`) and TURN over TLS on ephemeral ports, serving
    the certificate "first.example.com"; returns once fully started (its pid file exists)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    _write_cert(cert, key, "first.example.com")
    https, turn, turns, relay = spare_ports(4)
    cfg = tmp_path / "confedge.toml"
    cfg.write_text(
        f"""
[server]
hostname = "edge"
domain = "example.com"
state_dir = "{tmp_path / "state"}"
[proxy]
https_port = {https}
http_port = 0
workers = {workers}
nodes = ["http://127.0.0.1:9"]
[turn]
port = {turn}
tls_port = {turns}
relay_ports = "{relay}-{relay}"
username = "u"
password = "p"
media_nodes = ["127.0.0.1"]
[management]
enabled = false
[tls]
cert = "{cert}"
key = "{key}"
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "confedge", "run", "--config", str(cfg)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_port(https, proc)
        _wait_port(turns, proc)
        # Fully started (a first worker serves before the others are up): the pid file.
        # A start that failed after the first worker listened (a worker that could not
        # start) exits without one: said with its stderr at once, not as a missing file.
        deadline = time.monotonic() + 30  # (ProxyService allows a worker 30 s to start)
        while not (tmp_path / "state" / "confedge.pid").exists():
            assert proc.poll() is None, f"exited {proc.returncode} while starting"
            assert time.monotonic() < deadline, "no pid file within 30 s"
            time.sleep(0.05)
    except BaseException as exc:
        proc.kill()
        err = proc.communicate(timeout=15)[1]
        if isinstance(exc, AssertionError):
            raise AssertionError(f"{exc}; its stderr:\n{err}") from None
        raise
    return proc, cert, key, https, turns


def test_sighup_reloads_certificate_for_proxy_and_turns(tmp_path: Path) -> None:
    proc, cert, key, https, turns = _start(tmp_path, workers=1)
    try:
        assert _peer_cn(https) == "first.example.com"
        assert _peer_cn(turns) == "first.example.com"

        # A connection opened before the reload keeps its session.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        held = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", https), timeout=5),
            server_hostname="edge.example.com",
        )

        _write_cert(cert, key, "second.example.com")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _peer_cn(https) != "second.example.com" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _peer_cn(https) == "second.example.com"
        assert _peer_cn(turns) == "second.example.com"
        held.sendall(b"GET /api/client/v2/status HTTP/1.1\r\nHost: edge.example.com\r\n\r\n")
        assert held.recv(100).startswith(b"HTTP/1.1 ")
        held.close()

        # A broken certificate is refused on reload; the old one stays in service.
        cert.write_text("not a certificate")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
        assert _peer_cn(https) == "second.example.com"

        # So is a configuration file that no longer parses (SIGHUP reads its [tls] again).
        (tmp_path / "confedge.toml").write_text("[tls\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
        assert _peer_cn(https) == "second.example.com"
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=15)[1]
    assert proc.returncode == 0, err
    assert "certificate not reloaded, the old one stays in service" in err
    assert "configuration not reloaded, the running one stays: " in err
    assert "Traceback" not in err, err


def test_bad_certificate_with_two_workers_is_one_clean_line(tmp_path: Path) -> None:
    """proxy.workers = 2 (and TURN over TLS): a refused reload is logged once, not once per
    worker process and part, and never as a traceback; a good one reaches every worker."""
    proc, cert, key, https, turns = _start(tmp_path, workers=2)
    try:
        _write_cert(cert, key, "second.example.com")
        proc.send_signal(signal.SIGHUP)
        # SO_REUSEPORT spreads connections over both workers: ten in a row see the new one.
        deadline = time.monotonic() + 10
        while {_peer_cn(https) for _ in range(10)} != {"second.example.com"}:
            assert time.monotonic() < deadline, "a worker kept the old certificate"
            time.sleep(0.1)

        cert.write_text("not a certificate")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert proc.poll() is None
        assert {_peer_cn(https) for _ in range(10)} == {"second.example.com"}
        assert _peer_cn(turns) == "second.example.com"
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=20)[1]
    assert proc.returncode == 0, err
    refusals = [line for line in err.splitlines() if "certificate not reloaded" in line]
    assert len(refusals) == 1, err
    assert (
        "proxy and turn: certificate not reloaded, the old one stays in service: tls.cert"
        in (refusals[0])
    )
    assert "Traceback" not in err, err


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_stop_when_the_main_process_is_killed(tmp_path: Path) -> None:
    """A killed main process (OOM killer, kill -9) must not leave workers serving on as
    orphans that nobody reloads or stops: they see their command pipe close and exit."""
    proc, _cert, _key, https, _turns = _start(tmp_path, workers=2)
    workers = [c for c in _children(proc.pid) if b"spawn_main" in Path(
        f"/proc/{c}/cmdline").read_bytes()]  # fmt: skip
    try:
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "orphaned workers kept running"
            time.sleep(0.1)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", https), timeout=1).close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=15)
        for w in workers:  # on failure: no orphan outlives the test (never a recycled pid)
            with contextlib.suppress(OSError):
                if _alive(w) and b"spawn_main" in Path(f"/proc/{w}/cmdline").read_bytes():
                    os.kill(w, signal.SIGKILL)
