"""`confedge setup` as an operator meets it: the wizard on a terminal (pexpect on a pty, so the
prompt_toolkit path), one-NIC and two-NIC answers, a bad address re-asked with its reason, a
generated secret shown once, a re-run that keeps every answer, and the written file run for real:
a proxied request reaches the node and a TURN allocation succeeds."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

from setup_support import (
    confedge,
    drive_wizard,
    https,
    on_loopback,
    recording_node,
    rest_credential,
    running,
    turn_allocate,
)

from confedge.stun.constants import MsgClass
from ports import free_port

# Every prompt in order, answered with Enter: the re-run that must change nothing.
ONE_NIC_PROMPTS = [
    "Network interfaces (1 or 2)",
    "Internal address [",
    "Host name [",
    "Domain [",
    "Proxy HTTPS signalling",
    "Conferencing node addresses",
    "Balancing (",
    "Content-Security-Policy when",
    "Enable the TURN server?",
    "TURN mode (",
    "TURN username",
    "TURN password [",
    "Media node addresses",
    "TURN over TLS on the HTTPS port",
    "Management networks (",
    "guess conference PINs?",
    "(maxretry) [",
    "(findtime) [",
    "(bantime) [",
]


def _ports_for_run(config: Path, state: Path) -> int:
    """Move the listeners to free loopback ports (keys the wizard does not ask): `--set`."""
    https_port, _, flags = on_loopback(
        state,
        **{
            "turn.tls_port": "0",
            "turn.relay_ports": "45200-45299",
            "turn.allowed_peers": "127.0.0.1",
        },
    )
    result = confedge("setup", "--config", str(config), *flags)
    assert result.returncode == 0, result.stderr
    return https_port


def test_one_nic_wizard_bad_address_generated_password_rerun_and_run(tmp_path: Path) -> None:
    config = tmp_path / "confedge.toml"
    with recording_node() as node:
        code, screen = drive_wizard(
            config,
            [
                ("Network interfaces (1 or 2)", "1"),
                ("Internal address [", "10.0.0.300"),
                ('! "10.0.0.300" is not an IP address (e.g. "10.0.0.5" or "2001:db8::5")', None),
                ("Internal address [", "127.0.0.1"),
                ("Host name [", "edge.example.com"),
                ('! "edge.example.com" has a dot; give the host name alone', None),
                ("Host name [", "edge"),
                ("Domain [", "example.com"),
                ("Proxy HTTPS signalling", ""),
                ("Conferencing node addresses", node.url),
                ("Balancing (", "2"),  # the second choice: ip-hash
                ("Content-Security-Policy when", ""),
                ("Enable the TURN server?", "yes"),
                ("TURN mode (", "restricted"),
                ("TURN username:", "turnuser"),
                ("TURN password [blank = generate]", ""),
                ("Media node addresses (comma-separated addresses or networks) [127.0.0.1]", ""),
                ("TURN over TLS on the HTTPS port", "no"),
                ("Management networks (", "10.0.0.0/24"),
                ("guess conference PINs?", "no"),
            ],
        )
        assert code == 0, screen
        # The host's own addresses are offered as numbered choices (read from the host).
        assert "127.0.0.1 (lo)" in screen
        data = tomllib.loads(config.read_text())
        password = data["turn"]["password"]
        assert len(password) >= 40
        # Shown once (on the summary, with the warning), never again after.
        assert screen.count(password) == 1
        assert "GENERATED, shown only now" in screen
        assert "WARNING: store the generated secret now" in screen
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert data["server"] == {
            "internal_address": "127.0.0.1",
            "hostname": "edge",
            "domain": "example.com",
        }
        assert data["proxy"]["nodes"] == [node.url]
        assert data["proxy"]["balance"] == "ip-hash"
        assert data["turn"]["media_nodes"] == ["127.0.0.1"]
        assert data["management"]["networks"] == ["10.0.0.0/24"]
        assert "configuration is valid (confedge check)" in screen
        assert "Next steps:" in screen and "confedge cert install" in screen
        check = confedge("check", "--config", str(config))
        assert check.returncode == 0, check.stderr

        # The re-run: Enter everywhere keeps every answer, and the file is not touched.
        before = config.read_bytes()
        code, screen = drive_wizard(
            config, [(p, "") for p in ONE_NIC_PROMPTS if "(maxretry)" not in p][:16]
        )
        assert code == 0, screen
        assert "No changes:" in screen
        assert config.read_bytes() == before
        assert password not in screen  # a kept secret is masked

        https_port = _ports_for_run(config, tmp_path / "state")
        with running(config, https_port):
            assert (
                https(https_port, "GET", "/api/client/v2/conferences/meet/conference_status")[0]
                == 200
            )
            assert any(p.endswith("/conference_status") for _, p, _ in node.seen)
            turn_port = tomllib.loads(config.read_text())["turn"]["port"]
            ok = turn_allocate(
                turn_port,
                source="127.0.0.1",
                username="turnuser",
                password=password,
                realm="example.com",
            )
            assert ok == (MsgClass.SUCCESS, 0)


SEEDED = """\
# Edge for the Oslo office. Ports moved for the lab (ask Kari before changing).
[server]
hostname = "edge"   # the name on the certificate
domain = "example.com"
internal_address = "127.0.0.1"
state_dir = "{state}"

[proxy]
https_port = {https}
http_port = 0
workers = 1
nodes = ["{node}"]

[turn]
port = {turn}
tls_port = 0
relay_ports = "45300-45399"
allowed_peers = ["127.0.0.1"]

[management]
enabled = false
"""


def test_two_nic_wizard_permissive_generated_secret_keeps_comments_and_runs(
    tmp_path: Path,
) -> None:
    config = tmp_path / "confedge.toml"
    https_port, turn_port = (
        free_port(45700, 45800, shuffle=True),
        free_port(45100, 45200, shuffle=True, udp=True),
    )
    with recording_node() as node:
        config.write_text(
            SEEDED.format(state=tmp_path / "state", https=https_port, node=node.url, turn=turn_port)
        )
        code, screen = drive_wizard(
            config,
            [
                ("Network interfaces (1 or 2) [1]", "2"),
                ("Internal address [127.0.0.1]", ""),
                ("External address [", "127.0.0.1"),
                ('! "127.0.0.1" is the internal address too', None),
                ("External address [", "127.0.0.999"),
                ('! "127.0.0.999" is not an IP address', None),
                ("External address [", "127.0.0.2"),
                ("Host name [edge]", ""),
                ("Domain [example.com]", ""),
                ("Proxy HTTPS signalling", ""),
                (
                    f"Conferencing node addresses (comma-separated; host, host:port or http(s)://host:port) [{node.url}]",
                    "",
                ),
                ("Balancing (", "least-conn"),
                ("Content-Security-Policy when", "no"),
                ("Enable the TURN server?", ""),
                ("TURN mode (", "permissive"),
                ("TURN shared secrets (comma-separated, first one current) [blank = generate]", ""),
                ("TURN over TLS on the HTTPS port", ""),
                ("Management networks (", ""),
                ("guess conference PINs?", "yes"),
                ("(maxretry) [10]", "x"),
                ('! "x" is not a whole number (digits only)', None),
                ("(maxretry) [10]", "5"),
                ("(findtime) [300]", ""),
                ("(bantime) [300]", "600"),
            ],
        )
        assert code == 0, screen
        text = config.read_text()
        # The operator's comments and the keys the wizard does not ask about stay as written.
        assert text.startswith("# Edge for the Oslo office. Ports moved for the lab")
        assert 'hostname = "edge"   # the name on the certificate' in text
        assert f"https_port = {https_port}\n" in text and 'relay_ports = "45300-45399"' in text
        data = tomllib.loads(text)
        assert data["server"]["external_address"] == "127.0.0.2"
        assert data["proxy"]["balance"] == "least-conn" and data["proxy"]["csp"] is False
        assert data["turn"]["mode"] == "permissive"
        (secret,) = data["turn"]["secrets"]
        assert screen.count(secret) == 1
        # Only what changed is written (findtime kept its default, so it is not added).
        assert data["guard"] == {"enabled": True, "maxretry": 5, "bantime": 600}
        assert (tmp_path / "confedge.toml.bak").read_text() == SEEDED.format(
            state=tmp_path / "state", https=https_port, node=node.url, turn=turn_port
        )

        # Re-run, changing one answer only: only that line changes.
        before = config.read_text()
        answers = [
            ("Network interfaces (1 or 2) [2]", ""),
            ("Internal address [127.0.0.1]", ""),
            ("External address [127.0.0.2]", ""),
            ("Host name [edge]", ""),
            ("Domain [example.com]", ""),
            ("Proxy HTTPS signalling", ""),
            ("Conferencing node addresses", ""),
            ("Balancing (round-robin, ip-hash, least-conn) [least-conn]", ""),
            ("Content-Security-Policy when a node sends none? (yes/no) [no]", ""),
            ("Enable the TURN server? (yes/no) [yes]", ""),
            ("TURN mode (restricted or permissive) [permissive]", ""),
            ("TURN shared secrets (comma-separated, first one current) [keep current]", ""),
            ("TURN over TLS on the HTTPS port", ""),
            ("Management networks (", ""),
            ("guess conference PINs? (yes/no) [yes]", ""),
            ("(maxretry) [5]", "7"),
            ("(findtime) [300]", ""),
            ("(bantime) [600]", ""),
        ]
        code, screen = drive_wizard(config, answers)
        assert code == 0, screen
        assert secret not in screen
        assert "* Guard: wrong PINs before a ban     7" in screen
        after = config.read_text()
        changed = [
            (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
        ]
        assert changed == [("maxretry = 5", "maxretry = 7")]

        with running(config, https_port):
            # HTTPS listens on both interfaces.
            assert https(https_port, "GET", "/api/client/v2/status")[0] == 200
            assert https(https_port, "GET", "/api/client/v2/status", host="127.0.0.2")[0] == 200
            username, password = rest_credential(secret)
            relayed: list[tuple[str, int]] = []
            ok = turn_allocate(
                turn_port,
                source="127.0.0.1",
                username=username,
                password=password,
                realm="example.com",
                relayed=relayed,
            )
            assert ok == (MsgClass.SUCCESS, 0)
            # Two interfaces: TURN listens on the internal address, relays on the external one.
            assert relayed[0][0] == "127.0.0.2" and 45300 <= relayed[0][1] <= 45399


def test_cancel_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "confedge.toml"
    config.write_text('[proxy]\nnodes = ["10.0.0.11"]\n[turn]\nenabled = false\n')
    before = config.read_bytes()
    code, screen = drive_wizard(
        config,
        [(p, "") for p in ONE_NIC_PROMPTS[:9]] + [(p, "") for p in ONE_NIC_PROMPTS[14:16]],
        confirm="n",
    )
    assert code == 1
    assert "Nothing written." in screen
    assert config.read_bytes() == before
    assert not (tmp_path / "confedge.toml.bak").exists()
