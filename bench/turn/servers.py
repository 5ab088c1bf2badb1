"""Start the two TURN servers under comparable settings and read their CPU time and memory.

Comparability choices (see docs/BENCHMARKS.md): both listen on UDP 127.0.0.1 only, relay on
127.0.0.1 from port ranges of the same size, use one long-term user, allow loopback peers, send
no SOFTWARE attribute, and log to a file. coturn gets no TLS/DTLS/CLI and a fixed number of
relay threads (`--relay-threads`, default 2 for this 2-core host). confedge runs its TURN service
alone (no proxy, no guard).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import stunmini as sm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

USERNAME = "bench"
PASSWORD = "bench-password-0123"
REALM = "bench.test"


@dataclass(frozen=True)
class ServerSpec:
    """A server's listener port candidates (first free one wins) and its relay port range."""

    name: str
    port: int
    relay_lo: int
    relay_hi: int
    port_tries: int = 100


def pick_port(spec: ServerSpec) -> ServerSpec:
    """The first port from spec.port on where both UDP and TCP bind on 127.0.0.1.

    Why: on a shared host other programs' outgoing TCP connections take ephemeral ports
    (32768-60999 by default) that can land on a fixed listener port, and a server that
    listens on UDP and TCP needs the number free on both.
    """
    for port in range(spec.port, spec.port + spec.port_tries):
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t,
            ):
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
        except OSError:
            continue
        return dataclasses.replace(spec, port=port)
    raise RuntimeError(
        f"no free UDP+TCP port in {spec.port}-{spec.port + spec.port_tries - 1} for {spec.name}"
    )


def free_udp_ports(ports: range, count: int) -> list[int]:
    """The first `count` ports of `ports` free for UDP on 127.0.0.1 now (peer sinks and the
    like: never a fixed number another run or a demo may hold)."""
    free: list[int] = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        free.append(port)
        if len(free) == count:
            return free
    raise SystemExit(f"fewer than {count} free UDP ports in {ports.start}-{ports.stop - 1}")


def tree_pids(*roots: int) -> list[int]:
    """The given processes and every live descendant of theirs."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out = list(roots)
    i = 0
    while i < len(out):
        out.extend(children.get(out[i], []))
        i += 1
    return out


def stat_ticks(path: Path) -> tuple[int, int]:
    """(utime, stime) in clock ticks from a proc(5) stat file (a process's or a thread's);
    (0, 0) when it is gone."""
    try:
        stat = path.read_text()
    except OSError:
        return 0, 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def cpu_times_of(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) summed over `pids` in seconds, from /proc/<pid>/stat (all threads)."""
    user = system = 0
    for pid in pids:
        u, s = stat_ticks(Path(f"/proc/{pid}/stat"))
        user += u
        system += s
    return user / CLK_TCK, system / CLK_TCK


class Server:
    """One running TURN server process (and its descendants)."""

    def __init__(self, spec: ServerSpec, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.spec = spec
        self.proc = proc
        self.log = log

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.spec.port)

    def pids(self) -> list[int]:
        """The server process and every descendant (a multi-process server counts whole)."""
        return tree_pids(self.proc.pid)

    def cpu_times(self) -> tuple[float, float]:
        """(utime, stime) of the process tree in seconds, from /proc/<pid>/stat (all threads)."""
        return cpu_times_of(self.pids())

    def cpu_seconds(self) -> float:
        """utime+stime of the process tree."""
        return sum(self.cpu_times())

    def thread_cpu(self) -> dict[int, float]:
        """utime+stime of each thread of the process tree, by thread id, seconds."""
        out: dict[int, float] = {}
        for pid in self.pids():
            for task in Path(f"/proc/{pid}/task").glob("*"):
                out[int(task.name)] = sum(stat_ticks(task / "stat")) / CLK_TCK
        return out

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                statm = Path(f"/proc/{pid}/statm").read_text().split()
            except OSError:
                continue
            total += int(statm[1]) * PAGE
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_ready(server: Server, timeout: float = 15.0) -> None:
    """Poll with STUN Binding requests until the server answers (or fail with its log)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                break
            _, msg = sm.build_request(sm.BINDING, [])
            try:
                s.sendto(msg, server.address)
                s.recv(2048)
                return
            except OSError:
                continue
    server.stop()
    tail = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
    raise RuntimeError(f"{server.spec.name} did not answer STUN on {server.address}:\n{tail}")


def start_coturn(spec: ServerSpec, workdir: Path, relay_threads: int) -> Server:
    spec = pick_port(spec)
    log = workdir / "coturn.log"
    cmd = [
        "turnserver",
        "-n",  # no configuration file
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        f"--listening-port={spec.port}",
        f"--min-port={spec.relay_lo}",
        f"--max-port={spec.relay_hi}",
        "--lt-cred-mech",
        f"--user={USERNAME}:{PASSWORD}",
        f"--realm={REALM}",
        "--allow-loopback-peers",
        f"--relay-threads={relay_threads}",
        "--no-software-attribute",
        "--user-quota=0",
        "--total-quota=0",
        f"--log-file={log}",
        "--simple-log",
        f"--pidfile={workdir / 'coturn.pid'}",
        "--no-stdout-log",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
    server = Server(spec, proc, log)
    _wait_ready(server)
    return server


def confedge_config(
    spec: ServerSpec, workdir: Path, threads: int = 0, offload: str = "off", multiplex: int = 0
) -> Path:
    """The benchmark's confedge.toml; CONFEDGE_BENCH_TURN_EXTRA (TOML lines) is appended to its
    [turn] section, e.g. 'bandwidth_per_allocation = "10G"' to measure the bucket's cost."""
    path = workdir / "confedge.toml"
    path.write_text(
        f"""\
[server]
hostname = "bench"
domain = "{REALM}"
internal_address = "127.0.0.1"
state_dir = "{workdir / "state"}"

[proxy]
enabled = false

[turn]
enabled = true
mode = "restricted"
port = {spec.port}
tls_port = 0
relay_ports = "{spec.relay_lo}-{spec.relay_hi}"
username = "{USERNAME}"
password = "{PASSWORD}"
media_nodes = ["127.0.0.0/8"]
allowed_peers = ["127.0.0.0/8"]
max_allocations = 10000
# The 401 budget per source address (an anti-reflection limit coturn does not have) would
# otherwise cap the allocation-rate test, whose clients all come from 127.0.0.1.
unauth_budget = 1000000
dataplane_threads = {threads}  # native data plane: 0 = one per core
offload = "{offload}"  # "ebpf": the kernel offload variant (attached to lo, removed at stop)
relay_multiplex = {multiplex}  # shared relay sockets per relay address; 0 = a port each
{os.environ.get("CONFEDGE_BENCH_TURN_EXTRA", "")}

[guard]
enabled = false

[management]
enabled = false
"""
    )
    (workdir / "state").mkdir(exist_ok=True)
    return path


def confedge_command(config: Path) -> list[str]:
    """`python -m confedge.turn --config FILE` if the package provides it, else our launcher."""
    if (REPO / "src/confedge/turn/__main__.py").exists():
        return [sys.executable, "-m", "confedge.turn", "--config", str(config)]
    return [sys.executable, str(HERE / "confedge_turn.py"), str(config)]


def start_confedge(
    spec: ServerSpec,
    workdir: Path,
    dataplane: str | None = None,
    threads: int = 0,
    offload: str = "off",
    multiplex: int = 0,
) -> Server:
    """`dataplane`: turn.dataplane for this run ("auto", "native", "python"); None keeps what
    CONFEDGE_DATAPLANE says (or the configuration's "auto"). `threads`: its relay threads.
    `offload`: turn.offload ("ebpf" for the kernel-offload variant). `multiplex`:
    turn.relay_multiplex (shared relay sockets)."""
    spec = pick_port(spec)
    config = confedge_config(spec, workdir, threads, offload, multiplex)
    log = workdir / "confedge.log"
    # A PYTHONPATH already set comes first: PYTHONPATH=build/native runs the compiled build
    # (`make native`: mypyc control plane + C data plane), as a wheel install would.
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths.append(str(REPO / "src"))  # the server runs in its work directory: absolute paths
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    if dataplane is not None:
        env["CONFEDGE_DATAPLANE"] = dataplane
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            confedge_command(config), stdout=fh, stderr=subprocess.STDOUT, cwd=workdir, env=env
        )
    server = Server(spec, proc, log)
    _wait_ready(server)
    return server
