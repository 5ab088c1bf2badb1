"""Adversarial QA of `confedge check` and `confedge run` as a careless operator uses them:
broken files and semantically bad values give one line per problem naming the key, exit code 2
for the file, 1 for what only start-up can find -- never a traceback.

Subprocesses (the real console entry), loopback ports from the QA range 37000-37999.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ports import spare_port

CONFEDGE = [sys.executable, "-m", "confedge"]


def _confedge(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CONFEDGE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip()]


BROKEN: list[tuple[str, bytes, list[str]]] = [
    ("empty", b"", ["proxy.nodes: [] is empty", "turn.username", "turn.password"]),
    ("not-toml", b'[server]\nhostname = "a\n', ["not valid TOML", "line 2"]),
    ("duplicate-key", b'[server]\nhostname = "a"\nhostname = "b"\n', ["not valid TOML"]),
    ("duplicate-table", b"[server]\n[server]\n", ["not valid TOML"]),
    ("non-utf8", b'[server]\nhostname = "\xff\xfe"\n', ["not UTF-8"]),
    ("unknown-nested", b"[server.extra]\nx = 1\n", ["server.extra: unknown key"]),
    (
        "sections-not-tables",
        b'server = 5\nturn = [1, 2]\nproxy = "x"\n',
        ["server: 5 is not a table", 'proxy: "x" is not a table', "turn: [1, 2] is not a table"],
    ),
    (
        "wrong-types",
        b'[server]\nhostname = 5\n[proxy]\nenabled = "yes"\nhttps_port = "443"\nnodes = "10.0.0.1"\n'
        b'[turn]\nport = 70000\nrelay_ports = 5\nsecrets = "x"\nmode = "open"\n'
        b"[guard]\nbantime = inf\nmaxretry = 0\n",
        [
            "server.hostname: 5 is not text",
            'proxy.enabled: "yes" is not true or false',
            'proxy.https_port: "443" is not a port number',
            'proxy.nodes: "10.0.0.1" is not a list',
            "turn.port: 70000 is not a port number",
            "turn.relay_ports: 5 is not text",
            'turn.secrets: "x" is not a list',
            'turn.mode: "open" is not valid',
            "guard.bantime: inf is not a finite number",
            "guard.maxretry: 0 is not valid",
        ],
    ),
    (
        "every-bad-node",
        b'[proxy]\nnodes = ["10.0.0.1:99999", "ftp://x", "ok.example"]\n[turn]\nenabled = false\n',
        ['proxy.nodes[0]: "10.0.0.1:99999"', 'proxy.nodes[1]: "ftp://x"'],
    ),
    (
        "static-missing-keys",
        b'[proxy]\nnodes = ["n"]\n[[proxy.static]]\nprefix = "/x/"\n[turn]\nenabled = false\n',
        ["proxy.static[0].path: missing"],
    ),
    (
        "semantic",
        b'[server]\ninternal_address = "0.0.0.0"\nstate_dir = ""\n'
        b'[proxy]\nnodes = ["n"]\nhttps_port = 37401\nhttp_port = 37401\n'
        b'[turn]\nusername = "u"\npassword = "p\\u0007"\nport = 37401\n'
        b'relay_address_v6 = "10.0.0.1"\n',
        [
            'server.state_dir: "" is empty',
            "turn.password: not usable for TURN",
            'turn.relay_address_v6: "10.0.0.1" is not an IPv6 address',
        ],
    ),
    (
        "host-names",
        b'[server]\nhostname = "EDGE-"\ndomain = "example..com"\n'
        b"[proxy]\nenabled = false\n[turn]\nenabled = false\n",
        [
            'server.hostname: "EDGE-" is not a DNS name: the label "EDGE-" ends with "-"',
            'server.domain: "example..com" is not a DNS name: an empty label',
        ],
    ),
    (
        "host-name-lengths",
        b'[server]\nhostname = "' + b"a" * 64 + b'"\ndomain = "-corp.example.com"\n'
        b"[proxy]\nenabled = false\n[turn]\nenabled = false\n",
        [
            'server.hostname: "' + "a" * 64 + '" is not a DNS name: a label of 64 characters',
            'server.domain: "-corp.example.com" is not a DNS name: the label "-corp" starts with',
        ],
    ),
    (
        "fqdn-too-long",
        b'[server]\ndomain = "' + b".".join([b"d" * 62] * 4) + b'"\n'
        b"[proxy]\nenabled = false\n[turn]\nenabled = false\n",
        ["server.domain: server.hostname and server.domain make a name of 256 characters"],
    ),
    (
        "redis-without-host",
        b'[proxy]\nenabled = false\n[turn]\nenabled = false\n[guard]\nstore = "redis://"\n'
        b'[cluster]\nstore = "rediss://:hunter2@/0"\n',
        [
            'guard.store: "redis://" names no Redis host (it would mean localhost:6379 by '
            'default); write the host, e.g. "redis://127.0.0.1:6379/0"',
            'cluster.store: "rediss://:****@/0" names no Redis host',
        ],
    ),
    (
        "semantic-model",
        b'[server]\ninternal_address = "0.0.0.0"\n'
        b'[proxy]\nnodes = ["n"]\nhttps_port = 37401\nhttp_port = 37401\n'
        b'[turn]\nusername = "u"\npassword = "p"\nport = 37401\n',
        [
            'server.internal_address: "0.0.0.0" cannot be a TURN relay address',
            "proxy.http_port: 37401 is also proxy.https_port",
            "turn.port: 37401 is also proxy.https_port",
        ],
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_check_and_run_refuse_broken_files(
    tmp_path: Path, name: str, content: bytes, expected: list[str]
) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_bytes(content)
    for command in ("check", "run"):
        res = _confedge(command, "--config", str(path))
        assert res.returncode == 2, (command, res.stderr)
        lines = _lines(res.stderr)
        assert all(line.startswith("confedge: ") for line in lines), lines
        for want in expected:
            assert sum(want in line for line in lines) == 1, (want, lines)
        assert "\\u0007" not in res.stderr and "p\x07" not in res.stderr  # no secret echoed
        assert "hunter2" not in res.stderr


def test_host_names_and_redis_urls_that_stay_valid(tmp_path: Path) -> None:
    # What the stricter host name and Redis URL rules must keep accepting.
    path = tmp_path / "ok.toml"
    path.write_text(
        '[server]\nhostname = "Edge-1"\ndomain = "xn--bcher-kva.example.co.uk"\n'
        '[proxy]\nenabled = false\n[turn]\nenabled = false\n[guard]\nstore = "redis://db"\n'
        '[cluster]\nstore = "rediss://:pw@[2001:db8::9]:6380/1"\n'
    )
    res = _confedge("check", "--config", str(path))
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stdout


def test_bom_is_accepted(tmp_path: Path) -> None:
    """Notepad writes a byte-order mark; tomllib alone said "Invalid statement (line 1)"."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[proxy]\nenabled = false\n[turn]\nenabled = false\n")
    res = _confedge("check", "--config", str(path))
    assert res.returncode == 0, res.stderr


def test_directory_and_missing_file(tmp_path: Path) -> None:
    for target, why in ((tmp_path, "Is a directory"), (tmp_path / "nope.toml", "No such file")):
        res = _confedge("check", "--config", str(target))
        assert res.returncode == 2
        (line,) = _lines(res.stderr)
        assert str(target) in line and why in line


# -- what only start-up can tell ---------------------------------------------------------------


def _run_config(tmp_path: Path, extra: str = "", turn: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f"""
[server]
state_dir = "{tmp_path / "state"}"
{extra}
[proxy]
enabled = false
[turn]
port = 0
tls_port = 0
relay_ports = "37900-37909"
username = "u"
password = "p"
media_nodes = ["127.0.0.1"]
{turn}
[management]
enabled = false
"""
    )
    return path


def _start_failure(path: Path) -> str:
    res = _confedge("run", "--config", str(path))
    assert res.returncode == 1, res.stderr
    failures = [line for line in _lines(res.stderr) if line.startswith("confedge: ")]
    assert len(failures) == 1, res.stderr
    return failures[0]


def test_run_port_in_use_names_the_port_and_part(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        path = _run_config(tmp_path)
        path.write_text(path.read_text().replace("port = 0\n", f"port = {port}\n", 1))
        line = _start_failure(path)
    assert f"turn.port: cannot listen for TURN/STUN (udp) on 127.0.0.1:{port}" in line
    assert "already in use" in line


def test_run_external_address_not_on_this_host(tmp_path: Path) -> None:
    line = _start_failure(_run_config(tmp_path, extra='external_address = "192.0.2.55"'))
    assert "server.external_address: cannot bind TURN relay sockets on 192.0.2.55" in line


def test_run_certificate_problems_are_one_line(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    for content, want in (
        (b"", "the file is empty"),
        (b"0\x82\x01\x00binary", "DER"),
        (b"-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n", "cannot be read"),
    ):
        cert.write_bytes(content)
        path = _run_config(tmp_path, turn="")
        text = path.read_text().replace("tls_port = 0", f"tls_port = {spare_port()}")
        path.write_text(text + f'\n[tls]\ncert = "{cert}"\n')
        line = _start_failure(path)
        assert f"tls.cert ({cert})" in line and want in line, line


@contextlib.contextmanager
def _running(path: Path) -> Iterator[str]:
    """`confedge run` on `path` until TURN says it listens: what it logged by then (no
    traceback, checked); stopped when the block ends."""
    proc = subprocess.Popen(
        [*CONFEDGE, "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # until TURN reports it is listening
            seen.append(line)
            if "TURN listening" in line or "Traceback" in line:
                break
        text = "".join(seen)
        assert "TURN listening" in text and "Traceback" not in text, text
        yield text
    finally:
        proc.terminate()
        proc.wait(10)


def test_run_with_a_damaged_guard_database_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "guard.sqlite3").write_bytes(b"this is not a database" * 100)
    path = _run_config(tmp_path)
    path.write_text(path.read_text() + '\n[guard]\nenabled = true\nstore = "sqlite"\n')
    with _running(path) as text:
        assert "guard database" in text and "damaged" in text
    assert list(state.glob("guard.sqlite3.damaged-*"))


@pytest.mark.parametrize("workers", [1, 2])
def test_run_access_log_that_cannot_be_opened_is_one_line(tmp_path: Path, workers: int) -> None:
    # A directory as proxy.access_log: in process (1 worker) it was a ValueError traceback, in
    # worker processes a RuntimeError traceback from the parent.
    path = tmp_path / "run.toml"
    path.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[proxy]\nnodes = ["127.0.0.1:9"]\nhttps_port = 0\nhttp_port = 0\nworkers = {workers}\n'
        f'access_log = "{tmp_path}"\n[turn]\nenabled = false\n[management]\nenabled = false\n'
    )
    line = _start_failure(path)
    assert line.startswith("confedge: cannot start: ")
    assert f'proxy.access_log: cannot open "{tmp_path}" for appending: Is a directory' in line


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    # mkdir said "[Errno 17] File exists" (or "Not a directory" for a path below the file).
    (tmp_path / "state").write_text("not a directory")
    for state_dir, want in (
        (
            tmp_path / "state",
            f'server.state_dir: "{tmp_path / "state"}" is a file, not a directory',
        ),
        (
            tmp_path / "state" / "sub",
            f'server.state_dir: "{tmp_path / "state" / "sub"}": {tmp_path / "state"} is a file, '
            "not a directory",
        ),
    ):
        path = _run_config(tmp_path, extra="")
        path.write_text(path.read_text().replace(str(tmp_path / "state"), str(state_dir)))
        for command in ("check", "run"):
            res = _confedge(command, "--config", str(path))
            assert res.returncode == 2, (command, res.stderr)
            (line,) = _lines(res.stderr)
            assert line.startswith(f"confedge: {want}; set state_dir to a directory"), line
    assert (tmp_path / "state").read_text() == "not a directory"


MEDIA_NODES_WARNING = (
    "turn.media_nodes is empty in restricted mode: only STUN Binding will be answered; list the "
    "conferencing nodes' addresses to let them allocate"
)


def test_restricted_turn_without_media_nodes_warns_in_check_as_in_run(tmp_path: Path) -> None:
    # `check` said nothing and only `run` logged the warning.
    path = _run_config(tmp_path)
    path.write_text(path.read_text().replace('media_nodes = ["127.0.0.1"]\n', ""))
    res = _confedge("check", "--config", str(path))
    assert res.returncode == 0, res.stderr
    assert f"# warning: {MEDIA_NODES_WARNING}\n" in res.stdout
    res = _confedge("check", "--json", "--config", str(path))
    assert res.returncode == 0 and res.stdout.startswith("{"), res.stderr
    assert res.stderr == f"confedge: warning: {MEDIA_NODES_WARNING}\n"
    with _running(path) as text:
        assert f"WARNING confedge.turn: {MEDIA_NODES_WARNING}\n" in text, text
    # With media nodes: no warning.
    path = _run_config(tmp_path)
    res = _confedge("check", "--config", str(path))
    assert res.returncode == 0 and "warning" not in res.stdout, res.stdout


def test_setup_next_steps_without_media_nodes(tmp_path: Path) -> None:
    # The next steps said "UDP+TCP 3478 (TURN) from the media nodes ()".
    path = tmp_path / "s.toml"
    path.write_text(
        f'[server]\ninternal_address = "10.0.0.5"\nstate_dir = "{tmp_path / "state"}"\n'
        '[proxy]\nnodes = ["10.0.0.11"]\n[turn]\nusername = "u"\npassword = "p"\n'
    )
    res = subprocess.run(
        [*CONFEDGE, "setup", "--config", str(path), "--set", "proxy.nodes=10.0.0.12"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert f"warning: {MEDIA_NODES_WARNING}\n" in res.stdout
    flat = " ".join(res.stdout.split())  # the next steps are wrapped
    assert "(TURN) from anyone for STUN only: no media node is configured (set " in flat
    assert "turn.media_nodes)" in flat and "()" not in flat


def test_setup_next_steps_give_the_certbot_commands_as_one_pastes_them(tmp_path: Path) -> None:
    """With proxy.acme_webroot, the certificate step is the exact certbot command, unfolded and
    quoted for the shell (a configuration path with a space and a quote survives)."""
    conf = tmp_path / "conf dir" / "it's.toml"
    conf.parent.mkdir()
    conf.write_text(
        f'[server]\ninternal_address = "10.0.0.5"\nhostname = "edge"\ndomain = "example.com"\n'
        f'state_dir = "{tmp_path / "state"}"\n[proxy]\nnodes = ["10.0.0.11"]\n'
        "[turn]\nenabled = false\n"
    )
    res = subprocess.run(
        [*CONFEDGE, "setup", "--config", str(conf), "--set",
         "proxy.acme_webroot=/var/lib/confedge/acme web"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("mkdir -p "))
    mkdir, certbot, hook = (ln.strip() for ln in lines[start : start + 3])
    assert shlex.split(mkdir) == ["mkdir", "-p", "/var/lib/confedge/acme web"]
    assert certbot.endswith("\\")
    argv = shlex.split(certbot[:-1] + hook)
    assert argv[:8] == [
        "certbot", "certonly", "--webroot", "--webroot-path", "/var/lib/confedge/acme web",
        "--domain", "edge.example.com", "--deploy-hook",
    ]  # fmt: skip
    # What certbot's hook shell runs, with the variable it sets.
    assert shlex.split(argv[8].replace("$RENEWED_LINEAGE", "/etc/letsencrypt/live/x")) == [
        "confedge", "cert", "install", "--config", str(conf),
        "--cert", "/etc/letsencrypt/live/x/fullchain.pem",
        "--key", "/etc/letsencrypt/live/x/privkey.pem",
    ]  # fmt: skip
    assert "TCP 80 (redirect to HTTPS, ACME challenges) from anywhere" in " ".join(
        res.stdout.split()
    )


def test_a_stop_while_starting_stops_cleanly(tmp_path: Path) -> None:
    """SIGTERM (`systemctl stop` during the start) while the proxy workers are still being
    started: remembered, then everything is stopped in order and the exit status is 0 (was:
    the default action, killed half-started, exit -15, its pid file left behind)."""
    https = spare_port()
    path = tmp_path / "stop.toml"
    path.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n[proxy]\nnodes = ["127.0.0.1:9"]\n'
        f"https_port = {https}\nhttp_port = 0\nworkers = 2\n[turn]\nenabled = false\n"
        "[management]\nenabled = false\n"
    )
    proc = subprocess.Popen(
        [*CONFEDGE, "run", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # the first part started; the workers are being spawned
            seen.append(line)
            if "guard started" in line or "Traceback" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(seen) + rest
    assert proc.returncode == 0, text
    assert "SIGTERM received while starting, stopping" in text, text
    assert "proxy stopped" in text and "Traceback" not in text, text
    assert not (tmp_path / "state" / "confedge.pid").exists()
