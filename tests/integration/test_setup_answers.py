"""`confedge setup --answers FILE`, `--set key=value` and `--dry-run`: every kind of bad value,
one test per key family, each with its exact message, exit code 2 and the old file untouched
(bytes); and the good paths (TOML and JSON answers, --dry-run, answers piped to the wizard)."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
from setup_support import confedge

OLD = """\
# The lab edge. Do not remove this comment.
[server]
hostname = "edge"
domain = "example.com"
internal_address = "10.0.0.5"   # eth0
state_dir = "/tmp/confedge-setup-test"

[proxy]
nodes = ["10.0.0.11", "10.0.0.12:8443"]

[turn]
username = "turnuser"
password = "old-password"
media_nodes = ["10.0.0.0/24"]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "confedge.toml"
    p.write_text(OLD)
    return p


def _refused(config: Path, *args: str, message: str) -> None:
    """The exact one-line message, exit 2, and the old file exactly as it was, no .bak."""
    result = confedge("setup", "--config", str(config), *args)
    assert result.returncode == 2, result.stdout
    assert result.stderr == f"confedge: {message}\n"
    assert config.read_text() == OLD
    assert not config.with_name(config.name + ".bak").exists()


def _sets(config: Path, cases: list[tuple[str, str]]) -> None:
    for setting, message in cases:
        _refused(config, "--set", setting, message=message)


def test_addresses(config: Path) -> None:
    _sets(
        config,
        [
            (
                "server.internal_address=10.0.0.300",
                'server.internal_address: "10.0.0.300" is not an IP address '
                '(e.g. "10.0.0.5" or "2001:db8::5")',
            ),
            (
                "server.internal_address=0.0.0.0",
                'server.internal_address: "0.0.0.0" is not one address; give the address this '
                "host has on that side",
            ),
            (
                "server.external_address=10.0.0.5",
                'server.external_address: "10.0.0.5" is the internal address too; give the '
                "other interface's address (or answer 1 interface)",
            ),
            (
                "server.hostname=edge.example.com",
                'server.hostname: "edge.example.com" has a dot; give the host name alone '
                '(e.g. "edge") and the rest as the domain',
            ),
            (
                "server.domain=exa mple.com",
                'server.domain: "exa mple.com" is not a DNS name (letters, digits, "-" and ".")',
            ),
        ],
    )


def test_ports(config: Path) -> None:
    _sets(
        config,
        [
            (
                "proxy.https_port=70000",
                "proxy.https_port: 70000 is not a port number within 0-65535",
            ),
            ("turn.port=34x", 'turn.port: "34x" is not a whole number (digits only)'),
            (
                "turn.relay_ports=50000-40000",
                'turn.relay_ports: "50000-40000" is not a port range within 1-65535 '
                '(e.g. "49152-65535")',
            ),
            # Two listeners on one port: the whole file is checked before anything is written.
            (
                "proxy.https_port=9090",
                "management.port: 9090 is also proxy.https_port; two listeners cannot share a port",
            ),
        ],
    )


def test_node_lists(config: Path) -> None:
    _sets(
        config,
        [
            (
                "proxy.nodes=10.0.0.11,ftp://10.0.0.12",
                'proxy.nodes: "ftp://10.0.0.12" is not a node address (expected host, '
                'host:port or http(s)://host:port, e.g. "10.0.0.11" or "http://10.0.0.13:8080")',
            ),
            ("proxy.nodes=", "proxy.nodes: [] is empty; list at least one conferencing node"),
            (
                "proxy.nodes=10.0.0.11:99999",
                'proxy.nodes: "10.0.0.11:99999" is not a node address (expected host, '
                'host:port or http(s)://host:port, e.g. "10.0.0.11" or "http://10.0.0.13:8080")',
            ),
            (
                "turn.media_nodes=none",
                "turn.media_nodes: [] is empty; list at least one media node address",
            ),
        ],
    )


def test_booleans(config: Path, tmp_path: Path) -> None:
    _sets(
        config,
        [
            (
                "proxy.csp=maybe",
                'proxy.csp: "maybe" is not yes or no (answer yes/no or true/false)',
            ),
            ("guard.enabled=", 'guard.enabled: "" is not yes or no (answer yes/no or true/false)'),
        ],
    )
    answers = tmp_path / "answers.toml"
    answers.write_text("[turn]\nenabled = 3\n")
    _refused(
        config,
        "--answers",
        str(answers),
        message="turn.enabled: 3 is not true or false (without quotes)",
    )


def test_mode(config: Path) -> None:
    _sets(
        config,
        [
            (
                "turn.mode=open",
                "turn.mode: \"open\" is not valid: input should be 'restricted' or 'permissive'",
            ),
            (
                "proxy.balance=fastest",
                "proxy.balance: \"fastest\" is not valid: input should be 'round-robin', "
                "'ip-hash' or 'least-conn'",
            ),
            # Permissive needs a secret: the whole file says which key is missing.
            (
                "turn.mode=permissive",
                "turn.secrets: [] is empty; permissive TURN needs at least one shared secret",
            ),
        ],
    )


def test_secrets(config: Path, tmp_path: Path) -> None:
    _sets(
        config,
        [
            (
                "turn.password=",
                'turn.password: "" is empty; type a password, or "generate" for a new one',
            ),
            ("turn.username=", 'turn.username: "" is empty; restricted TURN needs a username'),
            (
                "turn.secrets=,",
                'turn.secrets: [] is empty; type a secret, or "generate" for a new one',
            ),
        ],
    )
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"turn": {"mode": "permissive", "secrets": ["s1", ""]}}))
    _refused(
        config,
        "--answers",
        str(answers),
        message='turn.secrets: "" is an empty shared secret (anyone could mint credentials); '
        "remove it",
    )


def test_networks(config: Path) -> None:
    _sets(
        config,
        [
            (
                "management.networks=10.0.0.0/33",
                'management.networks: "10.0.0.0/33" is not an address or CIDR network '
                '(e.g. "10.0.0.11" or "10.0.0.0/24")',
            ),
            (
                "guard.ignore=127.0.0.1,office",
                'guard.ignore: "office" is not an address or CIDR network '
                '(e.g. "10.0.0.11" or "10.0.0.0/24")',
            ),
        ],
    )


def test_guard_thresholds(config: Path) -> None:
    _sets(
        config,
        [
            (
                "guard.maxretry=0",
                "guard.maxretry: 0 is not valid: input should be greater than or equal to 1",
            ),
            ("guard.maxretry=ten", 'guard.maxretry: "ten" is not a whole number (digits only)'),
            (
                "guard.findtime=-5",
                "guard.findtime: -5 is not valid: input should be greater than 0",
            ),
            ("guard.bantime=5m", 'guard.bantime: "5m" is not a number (e.g. 300 or 0.5)'),
        ],
    )


def test_keys_and_files(config: Path, tmp_path: Path) -> None:
    _sets(
        config,
        [
            (
                "proxy.balancing=ip-hash",
                "proxy.balancing: unknown key (check its spelling; see docs/CONFIGURATION.md)",
            ),
            (
                "balance=ip-hash",
                "balance: unknown key (check its spelling; see docs/CONFIGURATION.md)",
            ),
            (
                "proxy.static=/x",
                "proxy.static: is a list of tables; write it in the file as [[proxy.static]] entries",
            ),
        ],
    )
    _refused(
        config,
        "--set",
        "ip-hash",
        message='--set "ip-hash": expected KEY=VALUE (e.g. --set proxy.balance=ip-hash)',
    )
    bad = tmp_path / "answers.toml"
    bad.write_text("[proxy\n")
    result = confedge("setup", "--config", str(config), "--answers", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f"confedge: {bad}: not valid TOML: ")
    assert config.read_text() == OLD
    _refused(
        config,
        "--answers",
        str(tmp_path / "none.toml"),
        message=f"{tmp_path / 'none.toml'}: cannot read the answers file: No such file or directory",
    )


def test_answers_toml_and_json_agree_and_keep_the_rest(tmp_path: Path) -> None:
    toml_answers = tmp_path / "answers.toml"
    toml_answers.write_text(
        '[server]\nexternal_address = "203.0.113.5"\n[proxy]\nbalance = "ip-hash"\n'
        "[guard]\nenabled = true\nmaxretry = 5\n"
    )
    json_answers = tmp_path / "answers.json"
    json_answers.write_text(
        json.dumps(
            {
                "server.external_address": "203.0.113.5",
                "proxy": {"balance": "ip-hash"},
                "guard": {"enabled": "yes", "maxretry": "5"},
            }
        )
    )
    outputs = []
    for answers in (toml_answers, json_answers):
        config = tmp_path / f"{answers.suffix[1:]}.toml"
        config.write_text(OLD)
        result = confedge("setup", "--config", str(config), "--answers", str(answers))
        assert result.returncode == 0, result.stderr
        assert "configuration is valid (confedge check)" in result.stdout
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert config.with_name(config.name + ".bak").read_text() == OLD
        outputs.append(config.read_text())
    assert outputs[0] == outputs[1]
    text = outputs[0]
    assert text.startswith("# The lab edge. Do not remove this comment.\n")
    assert 'internal_address = "10.0.0.5"   # eth0\n' in text
    data = tomllib.loads(text)
    assert data["server"]["external_address"] == "203.0.113.5"
    assert data["proxy"] == {"nodes": ["10.0.0.11", "10.0.0.12:8443"], "balance": "ip-hash"}
    assert data["guard"] == {"enabled": True, "maxretry": 5}
    assert data["turn"]["password"] == "old-password"


def test_set_generate_and_dry_run(config: Path) -> None:
    result = confedge(
        "setup",
        "--config",
        str(config),
        "--dry-run",
        "--set",
        "turn.mode=permissive",
        "--set",
        "turn.secrets=generate",
        "--set",
        "proxy.nodes=10.0.0.21, 10.0.0.22",
    )
    assert result.returncode == 0, result.stderr
    assert config.read_text() == OLD  # a dry run writes nothing
    assert result.stdout.startswith(
        f"# {config}: dry run, nothing written; secrets shown as ****\n"
    )
    assert 'secrets = ["****"]' in result.stdout and 'password = "****"' in result.stdout
    assert 'nodes = ["10.0.0.21", "10.0.0.22"]' in result.stdout
    assert "# The lab edge. Do not remove this comment." in result.stdout

    result = confedge("setup", "--config", str(config), "--set", "turn.password=generate")
    assert result.returncode == 0, result.stderr
    password = tomllib.loads(config.read_text())["turn"]["password"]
    assert password != "old-password" and len(password) >= 40
    assert f"Generated turn.password: {password}\n" in result.stdout
    assert result.stdout.count(password) == 1


def test_wizard_reads_piped_answers(tmp_path: Path) -> None:
    """No terminal: the same questions as plain lines, answered from a pipe."""
    config = tmp_path / "confedge.toml"
    lines = [
        "1",
        "127.0.0.1",
        "edge",
        "example.com",
        "yes",
        "10.0.0.11, 10.0.0.12",
        "",
        "",
        "no",
        "none",
        "no",
        "y",
    ]
    result = confedge("setup", "--config", str(config), stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "] HTTPS reverse proxy" in result.stdout
    data = tomllib.loads(config.read_text())
    assert data["proxy"]["nodes"] == ["10.0.0.11", "10.0.0.12"]
    assert data["turn"] == {"enabled": False}
    assert data["management"]["networks"] == []


def test_unwritable_and_unreadable_files_are_one_line(tmp_path: Path) -> None:
    result = confedge(
        "setup", "--config", "/proc/no/such/confedge.toml",
        "--set", "proxy.nodes=10.0.0.11", "--set", "turn.enabled=no",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "confedge: /proc/no/such/confedge.toml: cannot write the configuration file: "
        "No such file or directory\n"
    )
    binary = tmp_path / "confedge.toml"
    binary.write_bytes(b"\xff\xfe[server]\n")
    result = confedge("setup", "--config", str(binary), "--set", "proxy.nodes=10.0.0.11")
    assert result.returncode == 2
    assert result.stderr == f"confedge: {binary}: the configuration file is not UTF-8 text\n"
    assert binary.read_bytes() == b"\xff\xfe[server]\n"
