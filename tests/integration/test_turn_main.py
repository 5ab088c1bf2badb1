"""`python -m confedge.turn --config FILE`: the standalone entry the benchmarks use."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from confedge.stun import Attr, MessageBuilder, Method, MsgClass, decode_xor_address, parse_message


def test_standalone_entry_point(tmp_path: Path) -> None:
    cfg = tmp_path / "confedge.toml"
    cfg.write_text(
        """
[server]
domain = "example.test"
internal_address = "127.0.0.1"
state_dir = "/tmp"

[proxy]
enabled = false

[turn]
port = 0
tls_port = 0  # the default 5349 is a fixed port: parallel runs collide
relay_ports = "24000-24999"
username = "turnuser"
password = "turnpass"
media_nodes = ["127.0.0.1"]
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "confedge.turn", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["host"] == "127.0.0.1" and info["port"] > 0
        assert info["username"] == "turnuser" and info["realm"] == "example.test"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.bind(("127.0.0.1", 0))
            tid = bytes(range(12))
            s.sendto(
                MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build(),
                ("127.0.0.1", info["port"]),
            )
            resp = parse_message(s.recv(2048))
            assert resp.msg_class == MsgClass.SUCCESS
            mapped = decode_xor_address(resp.get(Attr.XOR_MAPPED_ADDRESS) or b"", tid)
            assert mapped == s.getsockname()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert '"stats"' in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[turn]\nrelay_port = "1-2"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "confedge.turn", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "turn.relay_port" in proc.stderr
