"""The generated firewall in a real kernel, in front of a real `confedge run` (issue 13).

Topology of the single-NIC test: namespace "edge" runs confedge (and a simulated node on its
loopback) on 10.213.0.1; namespace "net" is the Internet, with a non-node address 10.213.0.2
and a conferencing node's address 10.213.0.3 (listed in turn.media_nodes) on the same veth.
The two-NIC test gives edge an internal leg (nodes and management, 10.214.0.0/24) and an
external leg (browsers and media peers, 10.215.0.0/24) on two veth pairs. The last test loads
the iptables-restore form instead and checks its u32 STUN match in the kernel.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from host_netns import CLIENT, CONFEDGE, Netns, link, namespaces, notify_socket, wait_ready

EDGE, OTHER, NODE = "10.213.0.1", "10.213.0.2", "10.213.0.3"
NODESIM_PORT = 18001


def _config(tmp: Path, body: str) -> Path:
    path = tmp / "confedge.toml"
    path.write_text(body.replace("STATE", str(tmp / "state")))
    return path


def _start(edge: Netns, cfg: Path, tmp: Path) -> tuple[list[str], socket.socket]:
    """nodesim and `confedge run` inside edge; returns the sd_notify messages up to READY=1."""
    edge.spawn(
        CONFEDGE,
        "nodesim",
        "--listen",
        f"127.0.0.1:{NODESIM_PORT}",
        "--conference",
        "meet:1234",
        log=tmp / "nodesim.log",
    )
    sock = notify_socket(tmp / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify.sock"))
    log = tmp / "confedge.log"
    proc = edge.spawn(CONFEDGE, "run", "--config", str(cfg), log=log, env=env)
    return wait_ready(sock, proc, log), sock


SINGLE = f"""
[server]
hostname = "edge"
domain = "example.test"
internal_address = "{EDGE}"
state_dir = "STATE"

[proxy]
https_port = 443
http_port = 80
nodes = ["http://127.0.0.1:{NODESIM_PORT}"]
workers = 1

[turn]
mode = "restricted"
port = 3478
tls_port = 0
relay_ports = "49152-49160"
username = "turnuser"
password = "turnpass"
media_nodes = ["{NODE}/32"]

[guard]
enabled = true
firewall = true
store = "memory"
maxretry = 3
ignore = []

[management]
port = 9090
"""


def _wait_banned(edge: Netns, addr: str) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        banned = edge.banned()
        if addr in banned:
            return banned
        time.sleep(0.1)
    raise AssertionError(f"{addr} never reached the kernel ban set: {edge.banned()}")


def test_firewall_in_a_namespace_in_front_of_confedge(tmp_path: Path) -> None:
    with namespaces("edge", "net") as ns:
        edge, net = ns["edge"], ns["net"]
        link(edge, [f"{EDGE}/24"], net, [f"{OTHER}/24", f"{NODE}/24"])
        cfg = _config(tmp_path, SINGLE)
        assert "loaded" in edge.exec(CONFEDGE, "firewall", "--config", str(cfg), "--apply")
        assert "matches" in edge.exec(CONFEDGE, "firewall", "--config", str(cfg), "--check")
        _start(edge, cfg, tmp_path)

        # HTTPS and STUN Binding from anyone.
        assert net.client("https", EDGE, "443", "--bind", OTHER)["status"] == 200
        stun = net.client("stun", EDGE, "3478", "--bind", OTHER)
        assert stun["answer"] is True and stun["mapped"][0] == OTHER  # type: ignore[index]

        # TURN Allocate from a non-node: dropped by the kernel (no answer, the rule counts it).
        before = edge.rule_packets("turn: not from a media node")
        assert net.client("allocate", EDGE, "3478", "--bind", OTHER) == {"answer": False}
        assert edge.rule_packets("turn: not from a media node") > before
        # The same from the node's address is answered (and allocates with the credential).
        res = net.client(
            "allocate", EDGE, "3478", "--bind", NODE, "--user", "turnuser", "--password", "turnpass"
        )
        assert res["answer"] is True and res["error"] is None
        assert res["relayed"][0] == EDGE  # type: ignore[index]

        # Management: confedge listens on EDGE:9090, but the kernel drops outsiders (no answer).
        assert "9090" in edge.exec("ss", "-ltn", f"src {EDGE}")
        assert net.client("tcp", EDGE, "9090", "--bind", OTHER) == {"result": "timeout"}

        # Wrong PINs through the proxy to the simulated node: the guard bans OTHER, and the
        # kernel then refuses its TCP connections while NODE still gets through.
        for _ in range(3):
            res = net.client(
                "https",
                EDGE,
                "443",
                "--bind",
                OTHER,
                "--method",
                "POST",
                "--pin",
                "9999",
                "--path",
                "/api/client/v2/conferences/meet/request_token",
                "--body",
                '{"display_name": "guesser"}',
            )
            assert res["status"] == 403, res
        banned = _wait_banned(edge, OTHER)
        assert NODE not in banned
        dropped = edge.rule_packets("banned by the guard")
        assert net.client("tcp", EDGE, "443", "--bind", OTHER) == {"result": "timeout"}
        assert edge.rule_packets("banned by the guard") > dropped
        assert net.client("tcp", EDGE, "443", "--bind", NODE) == {"result": "connected"}

        # Bans are state, not configuration: --check still matches; --apply keeps them.
        assert "matches" in edge.exec(CONFEDGE, "firewall", "--config", str(cfg), "--check")
        out = edge.exec(CONFEDGE, "firewall", "--config", str(cfg), "--apply")
        assert "1 banned address(es) kept" in out
        assert OTHER in edge.banned()
        names = [n.name for n in ns.values()]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def test_check_reports_a_stale_ruleset(tmp_path: Path) -> None:
    """--check exits 1 with a diff when the configuration moved on (a new media node)."""
    with namespaces("edge") as ns:
        edge = ns["edge"]
        cfg = _config(tmp_path, SINGLE)
        edge.exec(CONFEDGE, "firewall", "--config", str(cfg), "--apply")
        cfg.write_text(cfg.read_text().replace(f'["{NODE}/32"]', f'["{NODE}/32", "10.9.0.0/16"]'))
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                edge.name,
                CONFEDGE,
                "firewall",
                "--config",
                str(cfg),
                "--check",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1
        diff = proc.stdout
        assert "-\t\telements = { 10.213.0.3 }" in diff
        assert "+\t\telements = { 10.9.0.0/16, 10.213.0.3 }" in diff


INSIDE_EDGE, INSIDE_NODE = "10.214.0.1", "10.214.0.2"
OUTSIDE_EDGE, OUTSIDE_PEER = "10.215.0.1", "10.215.0.2"

DUAL = f"""
[server]
hostname = "edge"
domain = "example.test"
internal_address = "{INSIDE_EDGE}"
external_address = "{OUTSIDE_EDGE}"
state_dir = "STATE"

[proxy]
https_port = 443
http_port = 80
nodes = ["http://127.0.0.1:{NODESIM_PORT}"]
workers = 1

[turn]
mode = "restricted"
port = 3478
tls_port = 0
relay_ports = "49152-49160"
username = "turnuser"
password = "turnpass"
media_nodes = ["10.214.0.0/24"]
allowed_peers = ["10.215.0.0/24"]

[management]
port = 9090
networks = ["10.214.0.0/24"]

[firewall]
outbound = "restricted"
"""


def test_two_interfaces(tmp_path: Path) -> None:
    with namespaces("edge", "in", "out") as ns:
        edge, inside, outside = ns["edge"], ns["in"], ns["out"]
        link(edge, [f"{INSIDE_EDGE}/24"], inside, [f"{INSIDE_NODE}/24"])
        link(edge, [f"{OUTSIDE_EDGE}/24"], outside, [f"{OUTSIDE_PEER}/24"])
        inside.exec("ip", "route", "add", "default", "via", INSIDE_EDGE)
        outside.exec("ip", "route", "add", "default", "via", OUTSIDE_EDGE)
        cfg = _config(tmp_path, DUAL)
        edge.exec(CONFEDGE, "firewall", "--config", str(cfg), "--apply")
        _start(edge, cfg, tmp_path)

        # TURN listens on the internal address only (UDP and TCP); HTTPS on both.
        udp = edge.exec("ss", "-lun")
        tcp = edge.exec("ss", "-ltn")
        assert f"{INSIDE_EDGE}:3478" in udp and f"{OUTSIDE_EDGE}:3478" not in udp
        assert f"{INSIDE_EDGE}:3478" in tcp and f"{OUTSIDE_EDGE}:3478" not in tcp
        assert f"{INSIDE_EDGE}:443" in tcp and f"{OUTSIDE_EDGE}:443" in tcp
        assert outside.client("https", OUTSIDE_EDGE, "443", "--bind", OUTSIDE_PEER)["status"] == 200

        # A node allocates on the internal address and is relayed on the external one; media
        # reaches a peer on the external side and its echo comes back.
        peer = outside.spawn(
            sys.executable,
            CLIENT,
            "echo-peer",
            "--listen",
            f"{OUTSIDE_PEER}:40000",
            "--seconds",
            "30",
            log=tmp_path / "peer.log",
        )
        deadline = time.monotonic() + 10
        while "listening" not in (tmp_path / "peer.log").read_text():
            assert peer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        res = inside.client(
            "allocate",
            INSIDE_EDGE,
            "3478",
            "--bind",
            INSIDE_NODE,
            "--user",
            "turnuser",
            "--password",
            "turnpass",
            "--peer",
            f"{OUTSIDE_PEER}:40000",
        )
        assert res["error"] is None, res
        assert res["relayed"][0] == OUTSIDE_EDGE  # type: ignore[index]
        assert res["echo"] is True
        sources = [
            json.loads(line)["from"][0]
            for line in (tmp_path / "peer.log").read_text().splitlines()
            if line.startswith('{"from"')
        ]
        assert sources and set(sources) == {OUTSIDE_EDGE}

        # Management answers on the internal side only.
        assert inside.client("tcp", INSIDE_EDGE, "9090", "--bind", INSIDE_NODE) == {
            "result": "connected"
        }
        assert "9090" not in edge.exec("ss", "-ltn", f"src {OUTSIDE_EDGE}")
        assert outside.client("tcp", OUTSIDE_EDGE, "9090", "--bind", OUTSIDE_PEER)["result"] in (
            "timeout",
        )
        # Even addressed to the internal address across the external leg: dropped.
        assert outside.client("tcp", INSIDE_EDGE, "9090", "--bind", OUTSIDE_PEER) == {
            "result": "timeout"
        }

        # firewall.outbound = "restricted": the relayed media above left from a relay port;
        # anything else the host starts towards the Internet is refused by the output chain.
        refused = edge.rule_packets("outbound: not media, nodes, DNS or NTP")
        assert edge.client("tcp", OUTSIDE_PEER, "8080", "--bind", OUTSIDE_EDGE) == {
            "result": "timeout"
        }
        assert edge.rule_packets("outbound: not media, nodes, DNS or NTP") > refused


def test_iptables_form_matches_stun_in_the_kernel(tmp_path: Path) -> None:
    """The iptables-restore form's u32 match, in a kernel: Binding passes, Allocate does not.

    A UDP echo server stands in for TURN on 3478, so an answer means "the kernel let it in"."""
    with namespaces("ipt", "iptnet") as ns:
        edge, net = ns["ipt"], ns["iptnet"]
        link(edge, [f"{EDGE}/24"], net, [f"{OTHER}/24", f"{NODE}/24"])
        cfg = _config(tmp_path, SINGLE)
        rules = tmp_path / "rules.v4"
        rules.write_text(
            edge.exec(CONFEDGE, "firewall", "--config", str(cfg), "--format", "iptables")
        )
        edge.exec("iptables-restore", str(rules))
        log = tmp_path / "echo.log"
        echo = edge.spawn(
            sys.executable,
            CLIENT,
            "echo-peer",
            "--listen",
            f"{EDGE}:3478",
            "--seconds",
            "30",
            log=log,
        )
        deadline = time.monotonic() + 10
        while "listening" not in log.read_text():
            assert echo.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert net.client("stun", EDGE, "3478", "--bind", OTHER)["answer"] is True
        assert net.client("allocate", EDGE, "3478", "--bind", OTHER) == {"answer": False}
        assert net.client("allocate", EDGE, "3478", "--bind", NODE)["answer"] is True
        counted = edge.exec("iptables", "-L", "INPUT", "-v", "-n", "-x")
        line = next(ln for ln in counted.splitlines() if "not from a media node" in ln)
        assert int(line.split()[0]) >= 1  # packets column of the drop rule
