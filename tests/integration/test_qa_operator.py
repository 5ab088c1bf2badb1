"""Adversarial QA of the operator's path on a new host: `confedge setup`, `import-reference`,
`install-service` and `check` given what a new operator gives them (a closed standard input,
damaged or hand-edited reference files, a duplicated node, `--user root`, relative or
specifier-laden paths). Each ends with one line naming the problem and the fix, an exit
status, no traceback, and no file written or changed.

Subprocesses (the real entry, `python -m confedge`); nothing listens, nothing is installed
(install-service only with --dry-run), every path is under tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pexpect
import pytest

CONFEDGE = [sys.executable, "-m", "confedge"]
ANALYZE = shutil.which("systemd-analyze")
VALID = '[proxy]\nnodes = ["10.0.0.11"]\n[turn]\nusername = "u"\npassword = "p"\n'


def _confedge(
    *args: str, closed_stdin: bool = False, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [*CONFEDGE, *args]
    if closed_stdin:  # `confedge ... <&-`: Python starts with sys.stdin = None
        argv = ["sh", "-c", 'exec "$@" <&-', "sh", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# --- standard input closed


def test_every_command_works_with_standard_input_closed(tmp_path: Path) -> None:
    # Every command builds the parser, which imports the wizard; it used to read
    # sys.stdin.readline at import and crashed with AttributeError when stdin was closed.
    config = tmp_path / "c.toml"
    config.write_text(VALID)
    assert _confedge("check", "--config", str(config), closed_stdin=True).returncode == 0
    new = tmp_path / "new.toml"
    proc = _confedge("setup", "--config", str(new), closed_stdin=True)
    assert proc.returncode == 2 and not new.exists()
    assert "standard input is closed" in proc.stderr and "--answers FILE or --set" in proc.stderr
    proc = _confedge(
        "setup", "--config", str(new), "--set", "proxy.nodes=10.0.0.11", "--set",
        "turn.enabled=no", closed_stdin=True,
    )  # fmt: skip
    assert proc.returncode == 0 and new.exists()


# --- the wizard on a terminal


def _wizard(config: Path) -> pexpect.spawn:
    """`confedge setup --config CONFIG` on a pseudo-terminal, as a person at a shell runs it."""
    return pexpect.spawn(
        CONFEDGE[0],
        [*CONFEDGE[1:], "setup", "--config", str(config)],
        env={**os.environ, "TERM": "xterm"},
        encoding="utf-8",
        timeout=20,
        dimensions=(40, 200),
    )


def test_wizard_reasks_a_duplicated_node_and_ctrl_d_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    child = _wizard(config)
    try:
        for expect, send in (
            (r"Network interfaces \(1 or 2\) \[", "1"),
            (r"Internal address \[", "127.0.0.1"),
            (r"Host name \[", "edge"),
            (r"Domain \[", "example.com"),
            (r"signalling to conferencing nodes\? \(yes/no\) \[", ""),
            (r"http\(s\)://host:port\) \[", "10.0.0.11, https://10.0.0.11:443"),
        ):
            child.expect(expect)
            child.sendline(send)
        child.expect(r"is the same node as")
        child.expect(r"http\(s\)://host:port\) \[")  # asked again
        child.sendline("10.0.0.11, 10.0.0.12")
        child.expect(r"Balancing \(")
        child.sendcontrol("d")
        child.expect("Cancelled: nothing written")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1 and not config.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


# --- duplicated nodes


def test_a_node_listed_twice_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[proxy]\nnodes = ["10.0.0.11", "node.example", "https://10.0.0.11:443", "NODE.example."]\n'
        '[[proxy.pools]]\nprefix = "/s/"\nnodes = ["10.0.0.21", "10.0.0.21"]\n'
        "[turn]\nenabled = false\n"
    )
    proc = _confedge("check", "--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        'confedge: proxy.nodes: "https://10.0.0.11:443" (item 2) is the same node as '
        '"10.0.0.11" (item 0); list each node once',
        'confedge: proxy.pools[0].nodes: "10.0.0.21" (item 1) is the same node as "10.0.0.21" '
        "(item 0); list each node once",
    ]
    # The same node on another port or scheme is another node.
    config.write_text(
        '[proxy]\nnodes = ["10.0.0.11", "10.0.0.11:8443", "http://10.0.0.11"]\n'
        "[turn]\nenabled = false\n"
    )
    assert _confedge("check", "--config", str(config)).returncode == 0
    # setup refuses it too, and leaves the file as it was.
    before = config.read_bytes()
    proc = _confedge("setup", "--config", str(config), "--set", "proxy.nodes=10.0.0.1,10.0.0.1")
    assert proc.returncode == 2 and "is the same node as" in proc.stderr
    assert config.read_bytes() == before


# --- import-reference on damaged or hand-edited copies

ANSWERS = ".reverseproxy-config.json"
HOSTILE: list[tuple[str, str, str, str]] = [
    ("answers-a-list", ANSWERS, "[1, 2]", "not the wizard's saved answers (expected a JSON object)"),
    ("networks-a-list", ANSWERS, '{"networks": ["eth0"], "internal": "eth0"}', "networks: [\"eth0\"] is not an object"),
    ("nic-a-string", ANSWERS, '{"networks": {"eth0": "x"}, "internal": "eth0"}', "no ipaddress for the internal interface"),
    ("nic-name-a-list", ANSWERS, '{"networks": {}, "internal": [1]}', "confedge: proxy.nodes: [] is empty"),
    ("turnserver-a-string", ANSWERS, '{"turnserver": "yes"}', 'turnserver: "yes" is not an object'),
    ("nodes-a-string", ANSWERS, '{"conferencenodes": "10.0.0.1"}', 'conferencenodes: "10.0.0.1" is not a list of addresses'),
    ("flag-garbage", ANSWERS, '{"enablefail2ban": "maybe"}', 'enablefail2ban: "maybe" is not true or false'),
    ("jail-maxretry", "jail.local", "[pexiprp]\nmaxretry = ten\n", "maxretry = ten: not a whole number above 0"),
    ("jail-enabled", "jail.local", "[pexiprp]\nenabled = maybe\n", "enabled = maybe: not true or false"),
    ("jail-duration", "jail.local", "[pexiprp]\nfindtime = 1e400\n", "findtime = 1e400: not understood"),
    ("peer-range-versions", "turnserver.conf", "denied-peer-ip=10.0.0.1-::1\n", "not of the same IP version"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "file", "content", "expected"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_import_reference_damaged_files_are_listed_not_a_traceback(
    tmp_path: Path, name: str, file: str, content: str, expected: str
) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / file).write_text(content)
    config = tmp_path / "c.toml"
    proc = _confedge("import-reference", str(ref), "--config", str(config), "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # nothing usable: the check fails
    assert expected in proc.stdout + proc.stderr
    assert not config.exists()


def test_import_reference_reads_saved_yes_no_as_written(tmp_path: Path) -> None:
    # "false" as text is no, not Python's truth of a non-empty string.
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / ANSWERS).write_text(
        json.dumps(
            {
                "conferencenodes": ["10.0.0.11"],
                "enablefail2ban": "false",
                "enablecsp": 0,
                "turnserver": {"enabled": "no"},
            }
        )
    )
    (ref / "jail.local").write_text("[pexiprp]\nfindtime = 1h 30m\nbantime = 1mo\n")
    config = tmp_path / "c.toml"
    proc = _confedge(
        "import-reference", str(ref), "--config", str(config), "--set",
        f"server.state_dir={tmp_path / 'state'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = tomllib.loads(config.read_text())
    assert data["guard"]["enabled"] is False and data["proxy"]["csp"] is False
    assert data["turn"]["enabled"] is False
    # fail2ban's "1mo" is a month (it was read as 60 s), "1h 30m" a sum (it was refused).
    assert data["guard"]["findtime"] == 5400 and data["guard"]["bantime"] == 2629746


def test_import_reference_over_a_damaged_configuration_changes_nothing(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / ANSWERS).write_text('{"conferencenodes": ["10.0.0.11"]}')
    config = tmp_path / "c.toml"
    config.write_bytes(b"[[[ not toml\n")
    proc = _confedge("import-reference", str(ref), "--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"confedge: {config}: not valid TOML: Empty table name at line 1 col 2",
        f"confedge: {config}: fix or move that file first; nothing written",
    ]
    assert config.read_bytes() == b"[[[ not toml\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "ref"]


# --- install-service: every path in tmp_path (the log directory too, through
# proxy.access_log), so that even a regression that installs creates nothing outside it.


def _service_config(tmp_path: Path, state_dir: str) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nstate_dir = "{state_dir}"\n[proxy]\nnodes = ["10.0.0.11"]\n'
        f'access_log = "{tmp_path / "log" / "access.log"}"\n'
        '[turn]\nusername = "u"\npassword = "p"\n'
    )
    return config


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("root", "--user root: the service must not run as root"),
        ("bad user;x", '--user "bad user;x": not a valid user name'),
    ],
)
def test_install_service_refuses_root_and_bad_user_names(
    tmp_path: Path, user: str, expected: str
) -> None:
    config = _service_config(tmp_path, str(tmp_path / "state"))
    for extra in (["--dry-run"], []):
        proc = _confedge(
            "install-service", "--config", str(config), "--user", user,
            "--unit-dir", str(tmp_path / "units"), *extra,
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith(f"confedge: {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_install_service_refuses_a_relative_state_dir(tmp_path: Path) -> None:
    config = _service_config(tmp_path, "state")
    proc = _confedge(
        "install-service", "--config", str(config), "--user", "nobody",
        "--unit-dir", str(tmp_path / "units"), "--dry-run", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert 'server.state_dir: "state" is a relative path' in proc.stderr
    assert "give an absolute path" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_install_service_refuses_a_state_dir_that_is_a_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    config = _service_config(tmp_path, str(state))
    proc = _confedge(
        "install-service", "--config", str(config), "--user", "nobody",
        "--unit-dir", str(tmp_path / "units"), "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f'confedge: server.state_dir: "{state}" is a file, not a directory; set state_dir to a '
        'directory (e.g. "/var/lib/confedge") or move the file away\n'
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "state"]


def test_install_service_escapes_specifiers_and_warns_of_private_tmp(tmp_path: Path) -> None:
    # "%n" in a path is systemd's unit-name specifier: written as is, the service would be
    # started with another --config. Under /tmp, PrivateTmp= hides the files from it.
    odd = tmp_path / "a b%n$X"
    odd.mkdir()
    config = odd / "c.toml"
    config.write_text(f'[server]\nstate_dir = "{odd / "state"}"\n{VALID}')
    proc = _confedge(
        "install-service", "--config", str(config), "--user", "nobody",
        "--unit-dir", str(tmp_path / "units"), "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0
    unit = proc.stdout[proc.stdout.index("# confedge systemd unit") :]
    escaped = str(odd).replace("%", "%%")
    assert f"run --config '{escaped.replace('$', '$$')}/c.toml'\n" in unit
    assert f"ReadWritePaths='{escaped}/state'" in unit
    if str(tmp_path).startswith("/tmp/"):
        assert "is under /tmp: PrivateTmp=yes" in proc.stderr
    if ANALYZE:
        path = tmp_path / "confedge.service"
        path.write_text(unit)
        verify = subprocess.run(
            [ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert verify.returncode == 0 and "specifier" not in verify.stderr, verify.stderr


def test_wizard_killed_by_a_closing_terminal_leaves_nothing(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(VALID)
    before = config.read_bytes()
    child = _wizard(config)
    child.expect(r"Network interfaces \(1 or 2\) \[")
    child.kill(signal.SIGHUP)  # what the terminal sends when its window closes
    child.expect(pexpect.EOF)
    child.close(force=True)
    assert child.signalstatus == signal.SIGHUP
    assert config.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


# --- firewall: the operator's own SSH


@pytest.mark.parametrize(
    ("firewall", "session", "expected"),
    [
        ("", "192.0.2.7 50000 10.0.0.5 2222", "firewall.ssh_port = 22, but this session came in on 2222"),
        ("ssh_port = 0", "192.0.2.7 50000 10.0.0.5 22", "firewall.ssh_port = 0 closes SSH"),
        ('ssh_networks = ["10.0.8.0/24"]', "192.0.2.7 50000 10.0.0.5 22", "does not include 192.0.2.7"),
        ('ssh_networks = ["10.0.8.0/24"]', "10.0.8.7 50000 10.0.0.5 22", None),
        ("", "2001:db8::7 50000 2001:db8::5 22", None),
    ],
)  # fmt: skip
def test_firewall_warns_when_it_would_drop_the_next_ssh_login_like_this_one(
    tmp_path: Path, firewall: str, session: str, expected: str | None
) -> None:
    # The table's policy is drop; the session that applies it survives (established), so a
    # wrong SSH port or network shows only at the next login, unless it is said now.
    config = tmp_path / "c.toml"
    config.write_text(f"{VALID}[firewall]\n{firewall}\n")
    proc = subprocess.run(
        [*CONFEDGE, "firewall", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SSH_CONNECTION": session},
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    last = proc.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    if expected is None:
        assert "warning" not in proc.stdout
    else:
        assert last.startswith("# warning: ") and expected in last
        assert "a new SSH login like it will be dropped" in last


# --- a configuration that is a symbolic link


def test_setup_and_cert_install_write_through_a_linked_configuration(tmp_path: Path) -> None:
    # /etc/confedge/confedge.toml -> a file kept in a repository: the change must land in the
    # real file; replacing the link with a new file left the target as it was.
    real = tmp_path / "repo" / "confedge.toml"
    real.parent.mkdir()
    real.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n{VALID}')
    link = tmp_path / "confedge.toml"
    link.symlink_to(real)
    proc = _confedge("setup", "--config", str(link), "--set", "proxy.balance=ip-hash")
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and 'balance = "ip-hash"' in real.read_text()
    assert (real.parent / "confedge.toml.bak").exists()
    assert _confedge("cert", "--config", str(link), "self-signed").returncode == 0
    generated = tmp_path / "state" / "tls" / "selfsigned.pem"
    proc = _confedge("cert", "--config", str(link), "install", "--cert", str(generated))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink()
    assert tomllib.loads(real.read_text())["tls"]["cert"] == str(
        tmp_path / "state" / "tls" / "server.pem"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confedge.toml", "repo", "state"]
