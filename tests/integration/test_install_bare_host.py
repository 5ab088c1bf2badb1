"""install.sh on a bare Debian host: a minimal root made by debootstrap, nothing else in it.

Why: the other install tests run on this machine, where .ci/run has already installed every
package, so they pass `--no-apt` and never see what a fresh host lacks. A container image or a
minimal server install has no python3 at all (install.sh stopped there before this test), no
compiler, no nftables. This test builds such a host (debootstrap's `minbase` variant of the
running Debian release, from the host's own Debian mirror), copies the checkout in, and walks
the operator's path inside it with chroot as root would on the real thing:

1. `./install.sh` with no options: it must bring the Debian packages itself (python3 included)
   and come out with every native part built (compiled proxy, libnghttp2, the C relay, eBPF);
2. `confedge setup --answers`, `confedge check`, `confedge install-service` (the system user
   is created by useradd inside the root);
3. the unit's ExecStart run as that user: HTTPS answers /health, the status page listens, TURN
   (on the native data plane) answers a STUN Binding request, and SIGTERM stops it cleanly;
4. `confedge firewall --apply` in a new network namespace (never this host's): the table is
   loaded by the nft that install.sh brought.

The root shares this host's network namespace (apt and pip reach their registries as the host
does; the service's ports are free ports on loopback). Mounts (proc, dev, sys) live in a private
mount namespace per command and vanish with it; the root is deleted at the end, after a check
that nothing is still mounted inside it.

Slow (debootstrap about 40 s, install.sh 3-5 minutes): `make test-slow` or `pytest -m slow`.
`CONFEDGE_BARE_HOST_SUITE=trixie` builds Debian 13 (Python 3.13) instead of the running release.
Skips, with the reason, where it cannot run: not root, not Debian, no debootstrap or unshare.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_support import https_get

from confedge.demo import DemoPorts
from ports import demo_port_base, spare_ports, tcp_listening

REPO = Path(__file__).resolve().parents[2]
DEBOOTSTRAP = shutil.which("debootstrap")
UNSHARE = shutil.which("unshare")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Environment passed into the root: how this machine reaches PyPI (an index, a proxy, a CA
# bundle for a TLS-inspecting egress); a bundle named by a variable is copied in.
PASSED_ENV = ("PIP_INDEX_URL", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "no_proxy", "NO_PROXY")  # fmt: skip
CA_ENV = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
CA_INSIDE = "/etc/host-ca-bundle.pem"  # (minbase has no /etc/ssl yet)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and chroot need root"),
    pytest.mark.skipif(DEBOOTSTRAP is None, reason="no debootstrap (apt-get install debootstrap)"),
    pytest.mark.skipif(UNSHARE is None, reason="no unshare (util-linux)"),
]


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    return {k: v.strip('"') for k, _, v in (ln.partition("=") for ln in text.splitlines()) if v}


def _mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 or one-line sources), else Debian's."""
    for path in [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"(?m)^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text):
            uri = m.group(1)
            if uri.startswith("http") and "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


class BareHost:
    """A debootstrapped root and commands run in it as its root user (chroot, private mounts)."""

    def __init__(self, root: Path, env: dict[str, str], suite: str) -> None:
        self.root = root
        self.env = env
        self.suite = suite  # the Debian release (codename) it was made from

    def argv(self, *command: str, net: bool = False) -> list[str]:
        # unshare without --fork execs the shell, which mounts and then execs chroot: the pid
        # the caller holds is the command's own (a signal to it reaches the service itself).
        inner = [
            "env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8",
            *(f"{k}={v}" for k, v in self.env.items()),
        ]  # fmt: skip
        if net:
            inner = ["unshare", "--net", *inner]
        script = (
            'R=$0; mount -t proc proc "$R/proc" && mount --rbind /dev "$R/dev" && '
            'mount -t sysfs sys "$R/sys" || exit 99; exec chroot "$R" "$@"'
        )
        assert UNSHARE is not None
        return [UNSHARE, "--mount", "--propagation", "private", "bash", "-c", script,
                str(self.root), *inner, *command]  # fmt: skip

    def run(self, *command: str, timeout: float = 120, net: bool = False) -> str:
        proc = subprocess.run(
            self.argv(*command, net=net), capture_output=True, text=True, timeout=timeout
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}:\n{out}"
        return out


def _copy_checkout(dest: Path) -> None:
    """The checkout's tracked files as they are in the working tree (what an operator has after
    `git clone`), without build products."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.split(b"\0")
    dest.mkdir(parents=True)
    tar_path = dest.parent / "checkout.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in filter(None, files):
            path = REPO / name.decode()
            if path.exists():
                tar.add(path, arcname=name.decode(), recursive=False)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="tar")
    tar_path.unlink()


def _mounted_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(prefix)]


@pytest.fixture
def bare_host(tmp_path: Path) -> Iterator[BareHost]:
    release = _os_release()
    if release.get("ID") != "debian" or not release.get("VERSION_CODENAME"):
        pytest.skip("builds a root of the running Debian release: this host is not Debian")
    # CONFEDGE_BARE_HOST_SUITE: another Debian release from the same mirror (trixie: Debian 13,
    # Python 3.13), where the host's debootstrap and keyring know it.
    suite = os.environ.get("CONFEDGE_BARE_HOST_SUITE") or release["VERSION_CODENAME"]
    root = tmp_path / "root"
    mirror = _mirror()
    made = subprocess.run(
        [DEBOOTSTRAP or "debootstrap", "--variant=minbase", suite, str(root), mirror],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    try:
        assert made.returncode == 0, f"debootstrap {suite} from {mirror}:\n{made.stdout[-3000:]}"
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
        for key in CA_ENV:
            bundle = os.environ.get(key)
            if bundle and Path(bundle).is_file():
                shutil.copy(bundle, root / CA_INSIDE.lstrip("/"))
                env[key] = CA_INSIDE
        _copy_checkout(root / "src" / "confedge")
        yield BareHost(root, env, suite)
    finally:
        left = _mounted_under(root) if root.exists() else []
        assert not left, f"still mounted inside the test root, not deleted: {left}"
        shutil.rmtree(root, ignore_errors=True)


def _stun_binding(port: int) -> bytes:
    """The message type of the answer to a STUN Binding request (RFC 8489 §5: 0x0001, no
    attributes, the magic cookie, a random transaction ID) sent over UDP; b"" if none came."""
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        for _ in range(5):
            sock.sendto(request, ("127.0.0.1", port))
            try:
                answer = sock.recv(2048)
            except TimeoutError:
                continue
            if answer[8:20] == request[8:20]:
                return answer[:2]
    return b""


@pytest.mark.timeout(1800)
def test_a_bare_debian_host_to_a_running_edge(bare_host: BareHost) -> None:
    host = bare_host
    # A minimal root really is bare: what install.sh must bring itself.
    assert not (host.root / "usr" / "bin" / "python3").exists()
    assert not (host.root / "usr" / "sbin" / "nft").exists()

    out = host.run("bash", "-c", "cd /src/confedge && ./install.sh", timeout=1500)
    assert "==> Debian packages: python3 " in out, out
    for line in (
        "proxy hot path: compiled (mypyc)",
        "HTTP/1.1 heads: C fast path",
        "HTTP/2 framing: libnghttp2",
        "TURN data plane: native (C relay threads)",
        "eBPF relay offload: built",
        "confedge setup ",
    ):
        assert line in out, out
    assert "warning" not in out.lower(), out
    assert os.readlink(host.root / "usr/local/bin/confedge") == "/opt/confedge/bin/confedge"
    # Built for the release's own Python (3.11 on Debian 12, 3.13 on Debian 13).
    python = host.run("python3", "--version").split()[1]
    assert f"(Python {python})" in host.run("confedge", "--version")
    print(f"bare host: {host.suite}, Python {python}")

    https, mgmt, turn, relay = spare_ports(4)
    (host.root / "root" / "answers.toml").write_text(
        f'[server]\ninternal_address = "127.0.0.1"\nhostname = "edge"\ndomain = "example.com"\n'
        f'[proxy]\nnodes = ["127.0.0.1:9"]\nhttps_port = {https}\nhttp_port = 0\n'
        f'[turn]\nport = {turn}\ntls_port = 0\nrelay_ports = "{relay}-{relay}"\n'
        f'username = "node"\npassword = "{os.urandom(12).hex()}"\nmedia_nodes = ["127.0.0.1"]\n'
        f"[management]\nport = {mgmt}\n"
    )
    conf = "/etc/confedge/confedge.toml"
    host.run("confedge", "setup", "--answers", "/root/answers.toml")
    host.run("confedge", "check")  # (the file setup wrote is every command's default)
    out = host.run("confedge", "install-service")
    assert "useradd --system" in out, out
    unit = (host.root / "etc/systemd/system/confedge.service").read_text()
    (exec_start,) = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    assert exec_start == f"ExecStart=/opt/confedge/bin/confedge run --config {conf}", unit
    assert "User=confedge" in unit

    # What systemd would start: the unit's command as its user, in /.
    service = subprocess.Popen(
        host.argv("setpriv", "--reuid=confedge", "--regid=confedge", "--init-groups",
                  *exec_start.removeprefix("ExecStart=").split()),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        tcp_listening(https, service, "the service")
        answer = https_get(https, "/health")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.partition(b"\r\n\r\n")[2].strip() == b"serving", answer
        tcp_listening(mgmt, service, "the service (status page, started last)")
        assert _stun_binding(turn) == b"\x01\x01", "TURN did not answer a Binding request"
    finally:
        service.terminate()
        log = service.communicate(timeout=60)[0]
    assert service.returncode == 0, log
    assert "hot path compiled (mypyc)" in log, log
    assert "data plane native" in log, log  # the C relay, loaded by the service user
    assert "generated a self-signed certificate for edge.example.com" in log, log
    made = host.root / "var/lib/confedge/tls/selfsigned.pem"
    assert made.stat().st_uid == int(host.run("id", "-u", "confedge").strip())

    # The firewall from the nft install.sh brought, in a network namespace of its own.
    out = host.run(
        "bash",
        "-c",
        f"confedge firewall --config {conf} --apply && nft list table inet confedge",
        net=True,
    )
    assert "table inet confedge loaded" in out and "set confedge_banned_v4" in out, out


@pytest.mark.timeout(1200)
def test_the_readme_demo_on_a_bare_debian_host(bare_host: BareHost) -> None:
    """The README's first command on the machine it names: Debian 12 with only `apt-get install
    python3-venv make` added. `make demo` makes the environment (interpreted: no compiler here)
    and starts the demo; the proxy answers through to a simulated node, the HTTP port
    redirects, the status page serves."""
    host = bare_host
    host.run(
        "bash", "-c",
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "--no-install-recommends python3-venv make >/dev/null",
        timeout=600,
    )  # fmt: skip
    base = demo_port_base()
    ports = DemoPorts.from_base(base)
    https, http, status = ports.https, ports.http, ports.status
    demo = subprocess.Popen(
        host.argv("make", "-C", "/src/confedge", "demo", f"DEMO_ARGS=--port-base {base}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # (make and the demo it starts: stopped together)
    )  # fmt: skip
    try:
        tcp_listening(status, demo, "make demo", timeout=600)
        answer = https_get(https, "/api/client/v2/status", "localhost")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert b'"status":"success"' in answer.replace(b" ", b""), answer[-300:]
        with socket.create_connection(("127.0.0.1", http), timeout=5) as s:
            s.sendall(b"GET /webapp/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 301 ") and b"Location: https://" in head, head
        with socket.create_connection(("127.0.0.1", status), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 "), head
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C, as the demo's banner says
        try:
            out = demo.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            out = demo.communicate()[0]
    assert "confedge demo is running on loopback" in out, out[-3000:]
    assert "hot path interpreted" in out, out[-3000:]
