"""The `confedge` command as a new operator meets it: help on everything, and operator commands
that answer with one plain line while their audit record goes to STATE_DIR/audit.log."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from confedge.cli import build_parser
from confedge.nodesim.cli import build_parser as nodesim_parser

CONFEDGE = [sys.executable, "-m", "confedge"]


def _walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    """Every (command path, action) of a parser tree, subcommands included."""
    out: list[tuple[str, argparse.Action]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((f"{path} {name}", argparse.Action([name], name, help=helps.get(name))))
                out += _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            out.append((path, action))
    return out


def test_every_subcommand_and_option_has_help() -> None:
    actions = _walk(build_parser(), "confedge") + _walk(nodesim_parser(), "confedge nodesim")
    missing = [
        f"{where}: {a.option_strings or a.dest}"
        for where, a in actions
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert missing == []
    names = {where for where, _ in actions}
    assert {"confedge bans add", "confedge cert install", "confedge demo"} <= names


def _help(*argv: str) -> str:
    res = subprocess.run([*CONFEDGE, *argv, "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_bans_help_lists_its_actions_and_add_shows_the_duration() -> None:
    text = _help("bans")
    for action in ("list", "add", "remove", "clear"):
        assert f"\n    {action} " in text, text
    add = _help("bans", "add")
    assert "--time DURATION" in add and "90s/10m/2h/1d" in add
    assert "source" in add and "--reason REASON" in add
    cert = _help("cert")
    for action in ("show", "install", "self-signed"):
        assert f"\n    {action} " in cert, cert
    assert "--port-base N" in _help("demo")


def _write_config(tmp_path: Path, more: str) -> Path:
    """edge.example.com, proxy and TURN off (nothing listens), plus `more`."""
    path = tmp_path / "confedge.toml"
    path.write_text(
        f"""
[server]
hostname = "edge"
domain = "example.com"
state_dir = "{tmp_path / "state"}"
[proxy]
enabled = false
[turn]
enabled = false
{more}"""
    )
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return _write_config(tmp_path, '[guard]\nenabled = true\nstore = "sqlite"\nbantime = 300\n')


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CONFEDGE, *argv], capture_output=True, text=True, timeout=30)


def test_operator_commands_print_one_line_and_audit_to_the_state_dir(config: Path) -> None:
    audit = config.parent / "state" / "audit.log"
    res = _run("bans", "--config", str(config), "add", "192.0.2.7", "--time", "10m")
    assert (res.returncode, res.stdout, res.stderr) == (
        0,
        "banned 192.0.2.7 for 10m00s (offence 1)\n",
        "",
    )
    assert "ban source=192.0.2.7 seconds=600" in audit.read_text()
    assert "by=operator" in audit.read_text()
    # --config after the action works too (as it did before bans had its own parser tree).
    res = _run("bans", "remove", "192.0.2.7", "--config", str(config))
    assert (res.returncode, res.stdout, res.stderr) == (0, "lifted the ban of 192.0.2.7\n", "")
    assert "unban source=192.0.2.7 by=manual" in audit.read_text()
    res = _run("cert", "self-signed", "-c", str(config))
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("generated a self-signed certificate for edge.example.com in ")
    assert res.stdout.count("\n") == 1
    assert "self-signed certificate generated subject=CN=edge.example.com" in audit.read_text()
    assert audit.stat().st_mode & 0o777 == 0o600
    # Asked for, the log lines show up on the terminal as before.
    res = _run("bans", "--config", str(config), "--log-level", "info", "clear")
    assert res.stdout == "cleared 0 active ban(s)\n"
    assert "confedge.guard.audit: unban all by=manual" in res.stderr


# Every command that reads the configuration, without --config: each reads the same default.
_READERS = [
    ("check",),
    ("run",),
    ("reload",),
    ("drain",),
    ("bans", "list"),
    ("cert", "show"),
    ("cluster", "list"),
    ("firewall",),
    ("install-service", "--dry-run"),
]


def test_without_config_every_command_reads_the_file_setup_writes(tmp_path: Path) -> None:
    """After `confedge setup` (which writes /etc/confedge/confedge.toml), `confedge check`,
    `reload`, `drain`, `bans list` ... need no option, as `nginx -t` needs none; before it,
    each says which file it looked for and how to get one. (CONFEDGE_CONFIG stands for the
    default here, so that this host's /etc is never read.)"""
    default = tmp_path / "etc" / "confedge.toml"
    env = {**os.environ, "CONFEDGE_CONFIG": str(default), "COLUMNS": "1000"}  # (--help unwrapped)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CONFEDGE, *argv], capture_output=True, text=True, env=env, timeout=60
        )

    for argv in _READERS:
        res = run(*argv)
        assert res.returncode == 2, (argv, res.stderr)
        assert res.stderr == (
            f"confedge: {default}: cannot read the configuration file: No such file or "
            "directory (the default file: `confedge setup` writes it; or give --config FILE)\n"
        ), argv
        assert f"(default: {default}; CONFEDGE_CONFIG changes it)" in " ".join(
            run(*argv[:1], "--help").stdout.split()
        ), argv
    default.parent.mkdir()
    written = run(
        "setup", "--set", "proxy.nodes=10.0.0.11", "--set", f"server.state_dir={tmp_path / 'state'}",
        "--set", "turn.username=u", "--set", "turn.password=p",
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert default.exists()
    checked = run("check")
    assert checked.returncode == 0, checked.stderr
    assert "10.0.0.11" in checked.stdout
    listed = run("bans", "list")
    assert listed.returncode == 0, listed.stderr
    # Every command that only reads works on the default file too (`cert show` once failed
    # here with a traceback: it read args.config, which only --config set).
    for argv in (("cert", "show"), ("firewall",), ("install-service", "--dry-run")):
        res = run(*argv)
        assert res.returncode == 0, (argv, res.stderr)
        assert "Traceback" not in res.stderr, argv
    alone = run("cluster", "list")  # the file has no cluster.store: it says so
    assert alone.returncode == 1 and "cluster.store is empty" in alone.stderr, alone.stderr
    assert str(default) in run("install-service", "--dry-run").stdout
    # An explicit --config still wins over the default.
    other = run("check", "--config", str(tmp_path / "other.toml"))
    assert other.returncode == 2 and "other.toml: cannot read" in other.stderr
    assert "the default file" not in other.stderr


def test_cert_show_names_which_certificate_each_sni_name_gets(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from test_cert_install import _cert, _key_pem

    def pair(name: str, *names: str) -> tuple[Path, Path]:
        k = ec.generate_private_key(ec.SECP256R1())
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        cert.write_bytes(_cert(names[0], k, names[0], k, ca=False, names=names))
        key.write_bytes(_key_pem(k))
        return cert, key

    default = pair("default", "edge.example.com", "meet.example.com")
    video = pair("video", "*.video.example.org", "meet.example.com")
    path = _write_config(
        tmp_path,
        f'[tls]\ncert = "{default[0]}"\nkey = "{default[1]}"\n'
        f'[[tls.certificates]]\ncert = "{video[0]}"\nkey = "{video[1]}"\n',
    )
    res = _run("cert", "show", "--config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert f"default (tls.cert): {default[0]} (key {default[1]})" in out
    assert f"tls.certificates[0]: {video[0]} (key {video[1]})" in out
    assert "names:    *.video.example.org, meet.example.com" in out
    assert "issuer:   CN=edge.example.com  (self-signed)" in out
    assert "(89 days left)" in out or "(90 days left)" in out
    sni = out[out.index("SNI (server name -> certificate):") :].splitlines()
    assert sni[1:] == [
        "  edge.example.com -> default (tls.cert)",
        "  meet.example.com -> default (tls.cert)",
        "  *.video.example.org -> tls.certificates[0]",
        "  any other name, or none -> default (tls.cert)",
        "warning: tls.certificates[0].cert "
        f"({video[0]}): meet.example.com is already served by "
        "the default certificate (tls.cert); the earlier certificate wins",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as `sudo confedge cert ...` runs")
def test_certificate_written_as_root_belongs_to_the_service_user(config: Path) -> None:
    """Run with sudo, `confedge cert` must leave the key readable by the service, whose user
    owns server.state_dir (systemd StateDirectory=), or the reload would refuse it."""
    state = config.parent / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)  # nobody: stands for the service user
    config.chmod(0o640)
    res = _run("cert", "self-signed", "--config", str(config))
    assert res.returncode == 0, res.stderr
    for path in (state / "tls", state / "tls" / "selfsigned.pem"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), path
    assert (state / "tls" / "selfsigned.pem").stat().st_mode & 0o777 == 0o600


def test_demo_port_base_out_of_range_is_a_usage_error() -> None:
    for base, why in (
        ("64437", "64437 is not within 1024-64436 (the demo uses ports N to N+1099)"),
        ("80", "80 is not within 1024-64436"),
        ("x", "'x' is not a port number"),
    ):
        res = _run("demo", "--port-base", base)
        assert res.returncode == 2 and res.stdout == ""
        assert f"confedge demo: error: argument --port-base: {why}" in res.stderr


@pytest.mark.parametrize("json_out", [False, True])
def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(
    tmp_path: Path, json_out: bool
) -> None:
    """`confedge check --config F | head -1`: once the reader has gone, writing raises
    BrokenPipeError; the command must end quietly (exit 1) rather than print a traceback over
    the operator's screen."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[proxy]\nenabled = false\n[turn]\nenabled = false\n")
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write, as after `head -1` has its line
    argv = ["check", "--config", str(cfg)] + (["--json"] if json_out else [])
    try:
        res = subprocess.run([*CONFEDGE, *argv], stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert res.returncode == 1
    assert res.stderr == ""
