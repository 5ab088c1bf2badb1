"""install.sh: from a checkout to a `confedge` command, as an operator runs it on a bare host.

Why: the operator's first step (docs/SETUP.md, "Install") used to be a venv and a pip command
that left `confedge` off the PATH, so the next command the docs give failed. The installer is
run here for real: a virtual environment made with the host's python3, confedge built from this
checkout by pip (the pure build, `--pure`, to keep the suite short; the compiled build is the
same script with a compiler, checked by hand as docs/SETUP.md says), the link, the version lines,
the next steps, an upgrade in place; and each refusal before anything is installed.
`--no-apt` everywhere: .ci/run has installed the packages, and a test must not change the host.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_support import https_get

from ports import free_port, tcp_listening

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "install.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("python3") is None, reason="install.sh uses the host's python3"
)


def _install(
    *args: str, env: dict[str, str] | None = None, timeout: float = 240
) -> tuple[int, str]:
    proc = subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd="/",  # it finds the checkout from its own path, not the working directory
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(600)
def test_install_links_the_command_and_upgrades_in_place(tmp_path: Path) -> None:
    prefix, bindir = tmp_path / "opt" / "confedge", tmp_path / "bin"
    rc, out = _install(f"--prefix={prefix}", "--bindir", str(bindir), "--no-apt", "--pure")
    assert rc == 0, out
    link = bindir / "confedge"
    assert link.is_symlink() and os.readlink(link) == str(prefix / "bin" / "confedge")
    assert "==> confedge 0.1.0" in out
    # What the pure build lacks is said at once, with the reason (not at the first start).
    assert "proxy hot path: interpreted" in out
    assert "TURN data plane: Python: the extension confedge.turn._native is not built" in out
    assert "HTTP/1.1 heads: httptools alone: the extension confedge.proxy._h1native" in out
    assert "confedge setup" in out and "confedge install-service" in out
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # tmp_path is under root's private directory: no service user could run this
        # environment's interpreter, and the installer says so.
        assert "warning: an unprivileged user cannot run" in out, out
    # The linked command works from anywhere, with nothing else on the PATH.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("confedge 0.1.0"), version
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[server]\nstate_dir = "{tmp_path}/state"\n[proxy]\nnodes = ["10.0.0.11"]\n'
        "[turn]\nenabled = false\n"
    )
    check = subprocess.run(
        [str(link), "check", "--config", str(conf)], capture_output=True, text=True, env=env
    )
    assert check.returncode == 0, check.stderr
    assert "configuration is valid" in check.stdout
    # Again: an upgrade of the same environment, the link kept.
    rc, out = _install(f"--prefix={prefix}", f"--bindir={bindir}", "--no-apt", "--pure")
    assert rc == 0, out
    assert f"==> upgrading confedge in {prefix}" in out
    assert "(was 0.1.0)" in out
    assert link.is_symlink()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frobnicate"], "unknown option: --frobnicate"),
        (["--prefix"], "--prefix needs a directory"),
        (["--prefix=opt/confedge"], "--prefix must be an absolute path"),
        (["--prefix=/"], "--prefix must not be /"),
        (["--bindir=bin"], "--bindir must be an absolute path"),
    ],
)
def test_bad_options_are_refused_with_the_reason(
    args: list[str], message: str, tmp_path: Path
) -> None:
    rc, out = _install(*args)  # each is refused before any package is looked at
    assert rc == 2, out
    assert message in out


def test_help_lists_the_options() -> None:
    rc, out = _install("--help")
    assert rc == 0
    for option in ("--prefix", "--bindir", "--no-apt", "--pure", "--no-offload"):
        assert option in out


def test_an_old_python_is_refused_before_anything_is_installed(tmp_path: Path) -> None:
    fake = tmp_path / "python3.9"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$2" in *platform*) echo 3.9.2;; *) exit 1;; esac\n'  # -c '...version_info...'
    )
    fake.chmod(0o755)
    prefix = tmp_path / "opt"
    rc, out = _install(f"--prefix={prefix}", f"--bindir={tmp_path}/bin", env={"PYTHON": str(fake)})
    assert rc == 2, out
    assert "confedge needs Python 3.11 or newer" in out and "3.9.2" in out
    assert not prefix.exists()


def test_a_foreign_confedge_command_is_not_replaced(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "confedge").write_text("#!/bin/sh\necho another installation\n")
    prefix = tmp_path / "opt"
    rc, out = _install(f"--prefix={prefix}", f"--bindir={bindir}", "--no-apt", "--pure")
    assert rc == 2, out
    assert "exists and is not a link made by this script" in out
    assert not prefix.exists()  # refused before the virtual environment was made
    assert (bindir / "confedge").read_text().endswith("another installation\n")


def test_a_prefix_holding_something_else_is_not_used(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    prefix.mkdir()
    (prefix / "data.txt").write_text("keep me\n")
    rc, out = _install(f"--prefix={prefix}", f"--bindir={tmp_path}/bin", "--no-apt", "--pure")
    assert rc == 2, out
    assert "is not a confedge environment" in out
    assert (prefix / "data.txt").read_text() == "keep me\n"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_compiled_build_from_a_fresh_environment(tmp_path: Path) -> None:
    """The default install (a compiler there): the proxy must come out compiled. A fresh
    environment holds none of confedge's dependencies, so mypyc sees only the build
    requirements (tests/unit/test_build_requires.py checks them without building)."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    prefix, bindir = tmp_path / "opt", tmp_path / "bin"
    rc, out = _install(f"--prefix={prefix}", f"--bindir={bindir}", "--no-apt", timeout=880)
    assert rc == 0, out
    assert "proxy hot path: compiled (mypyc)" in out, out
    assert "TURN data plane: native (C relay threads)" in out, out
    assert "HTTP/1.1 heads: C fast path for ordinary heads" in out, out
    assert "the proxy was not compiled" not in out


ANALYZE = shutil.which("systemd-analyze")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: what a service user can run (not a pyenv in /root)
SETPRIV = shutil.which("setpriv")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can traverse (tmp_path is under a 0700 directory of root's), for
    what the service user must read; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="confedge-install-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="install-service and running as its user need root")
@pytest.mark.skipif(ANALYZE is None or SETPRIV is None, reason="systemd-analyze and setpriv")
def test_from_install_to_a_service_that_serves_as_its_user(public_dir: Path) -> None:
    """The operator's path end to end on this host: install.sh run by a root whose umask is 077,
    `confedge setup --answers`, `confedge install-service` (its unit passes systemd-analyze
    verify), then the unit's own ExecStart run as the unit's user (what systemd would start):
    it serves HTTPS and stops cleanly. Catches what only the service user meets: an
    environment it cannot read, a state directory it cannot write, a command that is not there."""
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"no {SYSTEM_PYTHON}")
    prefix, bindir = public_dir / "opt", public_dir / "bin"
    proc = subprocess.run(
        ["bash", "-c", 'umask 077 && exec bash "$0" "$@"', str(INSTALL),
         f"--prefix={prefix}", f"--bindir={bindir}", "--no-apt", "--pure"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": SYSTEM_PYTHON},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in proc.stdout + proc.stderr
    confedge = str(bindir / "confedge")
    port = free_port(31000, 31500, shuffle=True)
    mgmt = free_port(31500, 31999, shuffle=True)
    answers = public_dir / "answers.toml"
    answers.write_text(
        f'[server]\ninternal_address = "127.0.0.1"\nhostname = "edge"\ndomain = "example.com"\n'
        f'state_dir = "{public_dir}/state"\n[proxy]\nnodes = ["127.0.0.1:9"]\n'
        f"https_port = {port}\nhttp_port = 0\nworkers = 2\n[turn]\nenabled = false\n"
        f"[management]\nport = {mgmt}\n"
    )
    conf = public_dir / "etc" / "confedge.toml"
    conf.parent.mkdir()
    conf.parent.chmod(0o755)
    setup = subprocess.run(
        [confedge, "setup", "--answers", str(answers), "--config", str(conf)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert f"confedge install-service --config {conf}" in " ".join(setup.stdout.split())
    units = public_dir / "units"
    installed = subprocess.run(
        [confedge, "install-service", "--config", str(conf), "--user", "nobody",
         "--unit-dir", str(units)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    unit = units / "confedge.service"
    assert ANALYZE is not None and SETPRIV is not None
    verify = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    (exec_start,) = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
    command = exec_start.removeprefix("ExecStart=").split()
    # The installation's own command (beside its interpreter), whatever else is on the PATH.
    assert command[0] == str(prefix / "bin" / "confedge"), exec_start
    as_nobody = [SETPRIV, "--reuid=nobody", "--regid=nogroup", "--init-groups"]
    # From a directory the user cannot enter (sudo -u from root's home): one clear line.
    private = public_dir / "private"
    private.mkdir(mode=0o700)
    refused = subprocess.run(
        [*as_nobody, *command], capture_output=True, text=True, timeout=60, cwd=private
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{private} is not accessible to this user" in refused.stderr, refused.stderr
    service = subprocess.Popen(
        [*as_nobody, *command],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd="/",  # systemd's working directory for a unit that names none
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        tcp_listening(port, service, "the service", timeout=30)
        answer = https_get(port, "/health")
        assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        # The self-signed certificate was made by the service user in its state directory.
        made = list((public_dir / "state").rglob("*.pem"))
        assert made and all(p.stat().st_uid == pwd.getpwnam("nobody").pw_uid for p in made)
        # Started as a whole (the status page comes last) before it is stopped, so that what
        # is checked is the running service's stop (a stop during the start is
        # test_qa_config_cli.py::test_a_stop_while_starting_stops_cleanly).
        left = max(0.1, deadline - time.monotonic())
        tcp_listening(mgmt, service, "the service (status page)", timeout=left)
    finally:
        service.terminate()
        out = service.communicate(timeout=30)[0]
    assert service.returncode == 0, out
