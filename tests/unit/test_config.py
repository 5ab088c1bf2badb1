"""Configuration: SPEC §8 keys, defaults, and errors that name key, value and expectation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from confedge.cli import main
from confedge.config import ConfigError, NodeAddress, load_config, parse_config, to_toml

MINIMAL = {
    "proxy": {"nodes": ["10.0.0.11"]},
    "turn": {"username": "turnuser", "password": "secret"},
}


def errors(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_defaults_follow_spec() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.proxy.https_port == 443 and cfg.proxy.http_port == 80
    assert cfg.turn.port == 3478 and cfg.turn.relay_port_range == (49152, 65535)
    assert cfg.turn.mode == "restricted"
    assert cfg.guard.enabled is False
    assert (cfg.guard.maxretry, cfg.guard.findtime, cfg.guard.bantime) == (10, 300, 300)
    assert cfg.server.internal_address == "127.0.0.1"
    assert cfg.server.relay_address == "127.0.0.1"
    assert cfg.management.port == 9090


def test_relay_ports_error_names_key_value_and_expectation() -> None:
    data = {**MINIMAL, "turn": {**MINIMAL["turn"], "relay_ports": "70000-80000"}}
    assert errors(data) == [
        'turn.relay_ports: "70000-80000" is not a port range within 1-65535 (e.g. "49152-65535")'
    ]


def test_unknown_key_is_an_error() -> None:
    data = {**MINIMAL, "turn": {**MINIMAL["turn"], "relay_port": "1-2"}}
    (problem,) = errors(data)
    assert problem.startswith("turn.relay_port: unknown key")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"proxy": {"https_port": 99999, "nodes": ["a"]}, "turn": {"enabled": False}},
            "proxy.https_port: 99999",
        ),
        (
            {"proxy": {"https_port": "443", "nodes": ["a"]}, "turn": {"enabled": False}},
            'proxy.https_port: "443" is not a port number',
        ),
        (
            {
                "server": {"internal_address": "10.0.0.300"},
                "proxy": {"enabled": False},
                "turn": {"enabled": False},
            },
            'server.internal_address: "10.0.0.300"',
        ),
        (
            {"proxy": {"nodes": ["ftp://x"]}, "turn": {"enabled": False}},
            'proxy.nodes[0]: "ftp://x" is not a node address',
        ),
        (
            {"proxy": {"balance": "random", "nodes": ["a"]}, "turn": {"enabled": False}},
            'proxy.balance: "random"',
        ),
        (
            {
                "proxy": {"enabled": False},
                "turn": {"media_nodes": ["10.0.0.0/33"], "username": "u", "password": "p"},
            },
            'turn.media_nodes[0]: "10.0.0.0/33"',
        ),
        (
            {
                "proxy": {"enabled": False},
                "guard": {"store": "mysql://x"},
                "turn": {"enabled": False},
            },
            'guard.store: "mysql://x"',
        ),
        (
            {"proxy": {"health_path": "health", "nodes": ["a"]}, "turn": {"enabled": False}},
            'proxy.health_path: "health" is not an absolute path',
        ),
        (
            {"proxy": {"drain_grace": -1, "nodes": ["a"]}, "turn": {"enabled": False}},
            "proxy.drain_grace: ",
        ),
    ],
)
def test_bad_values(data: dict[str, object], expected: str) -> None:
    problems = errors(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_enabled_parts_need_their_keys() -> None:
    problems = errors({})
    assert any(p.startswith("proxy.nodes: [] is empty") for p in problems)
    assert any(p.startswith('turn.username: "" is empty') for p in problems)
    assert any(p.startswith('turn.password: "" is empty') for p in problems)
    problems = errors({"proxy": {"enabled": False}, "turn": {"mode": "permissive"}})
    assert problems == [
        "turn.secrets: [] is empty; permissive TURN needs at least one shared secret"
    ]


def test_quota_defaults_know_the_mode() -> None:
    restricted = parse_config(MINIMAL)
    assert restricted.turn.effective_user_quota == restricted.turn.max_allocations
    permissive = parse_config(
        {"proxy": {"enabled": False}, "turn": {"mode": "permissive", "secrets": ["s"]}}
    )
    assert permissive.turn.effective_user_quota == 10


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("10.0.0.11", "https://10.0.0.11:443"),
        ("10.0.0.12:8443", "https://10.0.0.12:8443"),
        ("http://10.0.0.13:8080", "http://10.0.0.13:8080"),
        ("http://node", "http://node:80"),
        ("[2001:db8::1]:8443", "https://[2001:db8::1]:8443"),
        ("2001:db8::1", "https://[2001:db8::1]:443"),
    ],
)
def test_node_addresses(text: str, url: str) -> None:
    assert NodeAddress.parse(text).url == url


@pytest.mark.parametrize(
    "text", ["bad host!", "node one", "10.0.0.300", "-node", "node-.example", "a..b", "fd00::zz"]
)
def test_node_hosts_must_be_ip_addresses_or_host_names(text: str) -> None:
    """A node's host is sent as it is (Host header, upstream connection): anything that is not
    an IP address or a host name is refused when the configuration is read, naming it."""
    (problem,) = errors({**MINIMAL, "proxy": {**MINIMAL["proxy"], "nodes": [text]}})
    assert problem.startswith("proxy.nodes") and f'"{text}" is not a node address' in problem
    assert NodeAddress.parse("node_1.internal.").host == "node_1.internal."


def test_masked_hides_secrets() -> None:
    cfg = parse_config(
        {
            "proxy": {"enabled": False},
            "turn": {"username": "u", "password": "hunter2", "secrets": ["s1", "s2"]},
        }
    )
    dumped = json.dumps(cfg.masked())
    assert "hunter2" not in dumped and "s1" not in dumped
    assert "hunter2" not in repr(cfg)


def test_check_prints_effective_config_that_parses_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[proxy]\nnodes = ["10.0.0.11"]\n[[proxy.static]]\nprefix = "/b/"\npath = "/srv/b"\n[turn]\nusername = "u"\npassword = "hunter2"\n'
    )
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and 'password = "****"' in out
    again = tmp_path / "again.toml"
    again.write_text(out.replace('"****"', '"x"'))
    assert load_config(again).proxy.static[0].prefix == "/b/"
    assert to_toml(parse_config(MINIMAL).masked()).startswith("[server]")


def test_check_errors_are_one_line_each_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[turn]\nrelay_ports = "70000-80000"\nusername = "u"\npassword = "p"\n[proxy]\nenabled = false\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "confedge", "check", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == 'confedge: turn.relay_ports: "70000-80000" is not a port range within 1-65535 (e.g. "49152-65535")'
    )
    assert "Traceback" not in proc.stderr


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[turn\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_every_key_is_documented() -> None:
    from confedge.config import Config, StaticMount, field_types

    doc = (Path(__file__).parents[2] / "docs" / "CONFIGURATION.md").read_text()
    for section, model in field_types(Config).items():
        assert f"## [{section}]" in doc
        for key in model.__struct_fields__:
            assert f"| `{key}` |" in doc, (
                f"{section}.{key} is not documented in docs/CONFIGURATION.md"
            )
    for key in StaticMount.__struct_fields__:
        assert f"| `{key}` |" in doc
    from confedge.config import ProxyPool

    for key in ProxyPool.__struct_fields__:
        assert f"| `{key}` |" in doc


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confedge", *args], capture_output=True, text=True, timeout=60
    )


def test_check_reads_the_certificate_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[proxy]\nenabled = false\n[turn]\nenabled = false\n[tls]\ncert = "{cert}"\n')
    proc = _run_cli("check", "--config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("confedge: ") and str(cert) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_with_an_uncreatable_state_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nstate_dir = "{blocker}/sub"\n[proxy]\nenabled = false\n[turn]\nenabled = false\n'
    )
    proc = _run_cli("run", "--config", str(path))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f'confedge: server.state_dir: "{blocker}/sub": {blocker} is a file, not a directory'
        )
    )
    assert "Traceback" not in proc.stderr


def test_run_with_a_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(
            f'[server]\nstate_dir = "{tmp_path}/state"\n[proxy]\nenabled = false\n[management]\nenabled = false\n'
            f'[turn]\nport = {port}\ntls_port = 0\nusername = "u"\npassword = "p"\nmedia_nodes = ["127.0.0.1"]\n'
        )
        proc = _run_cli("run", "--config", str(path))
    assert proc.returncode == 1
    assert f"turn.port: cannot listen for TURN/STUN (udp) on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_drain_and_health_keys() -> None:
    cfg = parse_config(
        {**MINIMAL, "proxy": {**MINIMAL["proxy"], "drain_grace": 5, "health_path": "/lb"}}
    )
    assert (cfg.proxy.drain_grace, cfg.proxy.drain_timeout, cfg.proxy.health_path) == (
        5.0,
        3600.0,
        "/lb",
    )


def test_http2_keys() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.proxy.http2 is True and cfg.proxy.http2_max_streams == 100
    off = parse_config({**MINIMAL, "proxy": {**MINIMAL["proxy"], "http2": False}})
    assert off.proxy.http2 is False
    (problem,) = errors({**MINIMAL, "proxy": {**MINIMAL["proxy"], "http2_max_streams": 0}})
    assert problem.startswith("proxy.http2_max_streams: 0")
    (problem,) = errors({**MINIMAL, "proxy": {**MINIMAL["proxy"], "http2": "yes"}})
    assert problem.startswith("proxy.http2:")


def test_dataplane_coalesce_us_default_and_bounds() -> None:
    """turn.dataplane_coalesce_us: 100 µs unless set; 0 turns it off; over 1000 is refused
    with the key named (a longer pause would be audible latency, not coalescing)."""

    def turn(**extra: object) -> dict[str, object]:
        return {**MINIMAL, "turn": {"username": "turnuser", "password": "secret", **extra}}

    assert parse_config(MINIMAL).turn.dataplane_coalesce_us == 100
    assert parse_config(turn(dataplane_coalesce_us=0)).turn.dataplane_coalesce_us == 0
    (problem,) = errors(turn(dataplane_coalesce_us=5000))
    assert "turn.dataplane_coalesce_us" in problem and "1000" in problem


def test_dataplane_fold_pps_default_and_bounds() -> None:
    """turn.dataplane_fold_pps: 150,000 unless set; 0 turns folding off; negative is refused
    with the key named."""
    turn = {**MINIMAL, "turn": {"username": "turnuser", "password": "secret"}}
    assert parse_config(MINIMAL).turn.dataplane_fold_pps == 150_000
    off = {**turn, "turn": {**turn["turn"], "dataplane_fold_pps": 0}}  # type: ignore[dict-item]
    assert parse_config(off).turn.dataplane_fold_pps == 0
    bad = {**turn, "turn": {**turn["turn"], "dataplane_fold_pps": -1}}  # type: ignore[dict-item]
    (problem,) = errors(bad)
    assert problem.startswith("turn.dataplane_fold_pps")


def test_config_and_turn_server_import_no_pydantic() -> None:
    """Every process imports the configuration (the TURN server alone, each proxy worker):
    pydantic's import and schema building cost about 12 MiB of resident memory in each, so the
    configuration is msgspec structs and pydantic is never imported at run time."""
    code = (
        "import sys, confedge.config, confedge.turn.service\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_defaults_are_valid_and_already_normalised() -> None:
    """Defaults are not validated when a key is left out (as pydantic's validate_default did),
    so each one must already be what validating it gives (e.g. a float key's default a float,
    which `confedge config` would otherwise print as 300 instead of 300.0)."""
    from confedge.config import (
        Config,
        ProxyPool,
        StaticMount,
        TLSCertificate,
        field_types,
        parse_section,
        to_builtins,
    )

    for section in field_types(Config).values():
        defaults = section()
        assert parse_section(section, to_builtins(defaults)) == defaults
        for key, value in to_builtins(defaults).items():
            again = to_builtins(parse_section(section, {key: value}))[key]
            assert type(again) is type(value), f"{section.__name__}.{key}"
    assert parse_section(StaticMount, {"prefix": "/a/", "path": "/x"}).cache_control
    assert parse_section(ProxyPool, {"prefix": "/a/", "nodes": ["n"]}).balance is None
    assert parse_section(TLSCertificate, {"cert": "c.pem"}).key == ""


def test_values_from_tomlkit_become_plain_types() -> None:
    """The setup wizard edits files with tomlkit, whose values are str/int/float/list
    subclasses: the configuration holds the plain types (as with `tomllib`), which pickle to
    proxy workers as themselves and compare as usual."""
    import tomlkit

    doc = tomlkit.parse(
        '[proxy]\nnodes = ["10.0.0.1"]\nhttps_port = 8443\nheader_timeout = 2.5\n'
        'balance = "ip-hash"\n[turn]\nusername = "u"\npassword = "p"\nmode = "restricted"\n'
    )
    cfg = parse_config({name: dict(section) for name, section in doc.items()})
    values = [cfg.proxy.https_port, cfg.proxy.header_timeout, cfg.proxy.nodes[0], cfg.turn.mode]
    assert [type(v) for v in values] == [int, float, str, str]
    assert type(cfg.proxy.nodes) is list and cfg.proxy.balance == "ip-hash"
