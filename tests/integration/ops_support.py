"""What the drain and reload tests share: `confedge run` as a process in front of a stand-in
node, bounded keep-alive load, an SSE stream, TURN allocations relaying, and /metrics read
with prometheus_client's own text parser."""

from __future__ import annotations

import array
import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from confedge.stun import Attr, Method, decode_xor_address
from confedge.stun.attributes import encode_u32
from confedge.turn.testing import UdpTurnClient, response_code
from ports import spare_ports

HOST = "edge.example.com"


@dataclass
class Edge:
    """One `confedge run` process and where it listens."""

    proc: subprocess.Popen[str]
    config: Path
    state: Path
    https: int
    turn: int
    admin: int
    log: Path

    def confedge(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "confedge", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.log.read_text()


def edge_config(tmp: Path, *, nodes: list[str], extra: str = "", workers: int = 1) -> str:
    https, turn, admin, relay = spare_ports(4)
    return f"""
[server]
hostname = "edge"
domain = "example.com"
state_dir = "{tmp / "state"}"
[proxy]
https_port = {https}
http_port = 0
workers = {workers}
nodes = {json.dumps(nodes)}
health_interval = 0.5
{extra}
[turn]
port = {turn}
tls_port = 0
relay_ports = "{relay}-{relay + 40}"
username = "turnuser"
password = "turnpass"
media_nodes = ["127.0.0.0/8"]
allowed_peers = ["127.0.0.1/32"]
[management]
port = {admin}
"""


def start_edge(tmp: Path, text: str) -> Edge:
    """Write `text` as the configuration and start `confedge run`; returns once the pid file
    exists (everything listens)."""
    cfg = tmp / "confedge.toml"
    cfg.write_text(text)
    state = tmp / "state"
    log = tmp / "confedge.log"
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "confedge", "run", "--config", str(cfg)],
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 30
    while not (state / "confedge.pid").exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)

    def port(key: str, section: str) -> int:
        block = text.split(f"[{section}]", 1)[1]
        return int(block.split(f"\n{key} = ", 1)[1].split("\n", 1)[0])

    return Edge(
        proc, cfg, state, port("https_port", "proxy"), port("port", "turn"),
        port("port", "management"), log,
    )  # fmt: skip


def tls_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def https_get(port: int, path: str, host: str = "edge.example.com") -> bytes:
    """The whole answer (head and body, until the server closes) to one GET over TLS on
    127.0.0.1:`port`, with `host` as SNI and Host, the certificate not checked."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        tls_client().wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    return answer


def write_cert(cert_path: Path, key_path: Path, cn: str) -> None:
    """A self-signed certificate for `cn` (and edge.example.com) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(cn), x509.DNSName("edge.example.com")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def peer_cn(port: int) -> str:
    """The common name of the certificate a TLS listener serves."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        tls_client().wrap_socket(raw, server_hostname="edge.example.com") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def accepting_pid(https: int, client_port: int) -> int:
    """The process that holds the server side of a connection (`ss -p`): which proxy worker
    the kernel's SO_REUSEPORT choice gave it to."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{https} and dport = :{client_port} )"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return int(out.split("pid=", 1)[1].split(",", 1)[0])


def served_cn(https: int) -> tuple[int, str]:
    """One TLS handshake: (the proxy worker that served it, its certificate's common name)."""
    with (
        socket.create_connection(("127.0.0.1", https), timeout=5) as raw,
        tls_client().wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        pid = accepting_pid(https, tls.getsockname()[1])
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return pid, str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def worker_pids(pid: int) -> list[int]:
    """The proxy worker processes of `confedge run` `pid` (multiprocessing's spawned children)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def _pipes(pid: int, mode: int) -> dict[str, str]:
    """Process `pid`'s pipe descriptors open in `mode` (os.O_RDONLY, os.O_WRONLY): pipe ->
    its /proc path."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags = next(ln for ln in info.splitlines() if ln.startswith("flags:")).split()[1]
        if link.startswith("pipe:") and int(flags, 8) & os.O_ACCMODE == mode:
            out[link] = f"/proc/{pid}/fd/{fd}"
    return out


def bytes_sent(main: int, worker: int) -> int:
    """Bytes the main process has written to a worker's command pipe that the worker has not
    read yet: FIONREAD on a second descriptor of each pipe the worker reads and the main
    process writes, opened through /proc; nothing is read. Tells a test that the main process
    has sent something to a stopped worker."""
    total = 0
    written = _pipes(main, os.O_WRONLY)
    for pipe, path in _pipes(worker, os.O_RDONLY).items():
        if pipe not in written:
            continue  # the event loop's own wake-up pipes, ...
        own = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            count = array.array("i", [0])
            fcntl.ioctl(own, termios.FIONREAD, count)
            total += count[0]
        finally:
            os.close(own)
    return total


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def get(
    port: int, path: str, *, method: str = "GET", extra: str = "", source: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh TLS connection from `source` (a loopback address)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls_client(), local_addr=(source, 0)
    )
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n{extra}\r\n".encode()
        )
        return await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def admin_raw(port: int, path: str, source: str = "127.0.0.1") -> bytes:
    """The management listener's whole answer (b"" when it refused the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
    return data


def admin_get(port: int, path: str) -> bytes:
    head, _, body = admin_raw(port, path).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def metrics(port: int) -> dict[str, list[Any]]:
    """/metrics through prometheus_client's parser: family name -> its samples."""
    text = admin_get(port, "/metrics").decode()
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


def status(port: int) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(admin_get(port, "/status.json"))
    return out


@dataclass
class Load:
    """Keep-alive requests at a bounded rate over a few connections; every answer checked.

    Each connection keeps a fixed schedule (`interval` = connections / rate, the next request
    due one interval after the previous one was due, so a late answer is caught up, not lost)
    and the rate is measured over the time the schedule ran: from the first request sent after
    every connection's TLS handshake to the last answer, not over handshakes or the wind-down.
    """

    port: int
    rate: float = 200.0
    connections: int = 4
    path: str = "/api/client/v2/conferences/meet/info"
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    running: bool = True
    # When each answer arrived, when the schedule started, and how late the latest request
    # was sent behind its due time (a server or generator that cannot keep up shows here).
    answered: list[float] = field(default_factory=list)
    started: float | None = None
    late: float = 0.0

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        conns = await asyncio.gather(
            *(
                asyncio.open_connection("127.0.0.1", self.port, ssl=tls_client())
                for _ in range(self.connections)
            )
        )
        # Every connection starts its schedule at once, spread evenly over one interval.
        interval = self.connections / self.rate
        self.started = start = loop.time()
        end = start + seconds
        await asyncio.gather(
            *(self._one(r, w, start + i * interval / self.connections, end, interval)
              for i, (r, w) in enumerate(conns))
        )  # fmt: skip

    def measured(self) -> float:
        """Answers per second from the schedule's start to the last answer."""
        if self.started is None or not self.answered:
            return 0.0
        span = self.answered[-1] - self.started
        return len(self.answered) / span if span > 0 else 0.0

    async def _one(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        due: float,
        end: float,
        interval: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(max(0.0, due - loop.time()))
            while self.running and due < end:
                self.late = max(self.late, loop.time() - due)
                writer.write(f"GET {self.path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                try:
                    st, _, _ = await asyncio.wait_for(read_response(reader), 10)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                    return
                if st == 200:
                    self.ok += 1
                    self.answered.append(loop.time())
                else:
                    self.failed.append(f"status {st}")
                due += interval  # a fixed schedule: never drifts by the answer's latency
                await asyncio.sleep(max(0.0, due - loop.time()))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def sse(port: int, n: int, interval: float) -> list[bytes]:
    """Read an SSE stream of `n` events through the proxy; the events received."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_client())
    events: list[bytes] = []
    try:
        writer.write(
            f"GET /sse?n={n}&interval={interval} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                break
            events.append(await reader.readexactly(size))
            await reader.readexactly(2)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return events


class Relay:
    """A TURN allocation on the edge with a permission for a peer on loopback; `check()`
    sends a datagram from the peer to the relayed address and waits for it at the client."""

    def __init__(
        self,
        turn_port: int,
        username: str = "turnuser",
        password: str = "turnpass",
        source: str = "127.0.0.1",
    ) -> None:
        self.client = UdpTurnClient(
            ("127.0.0.1", turn_port), username, password, "example.com", local=(source, 0)
        )
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.relayed: tuple[str, int] | None = None
        self.seq = 0

    async def open(self, peer: str = "127.0.0.1") -> int:
        msg = await self.client.allocate()
        assert msg is not None
        code = response_code(msg)
        if code != 200:
            return code
        value = msg.get(Attr.XOR_RELAYED_ADDRESS)
        assert value is not None
        self.relayed = decode_xor_address(value, msg.transaction_id)
        return await self.client.create_permission(peer)

    async def check(self) -> bool:
        """Peer -> relay -> client: True when the datagram arrived within a second."""
        assert self.relayed is not None
        loop = asyncio.get_running_loop()
        self.seq += 1
        payload = f"relay-check-{id(self)}-{self.seq}".encode()
        self.peer.sendto(payload, self.relayed)
        end = loop.time() + 1.0
        while (left := end - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.client.sock, 65535), left)
            except TimeoutError:
                return False
            if payload in data:
                return True
        return False

    async def refresh(self, lifetime: int) -> int:
        msg = await self.client.request(Method.REFRESH, [(Attr.LIFETIME, encode_u32(lifetime))])
        return 0 if msg is None else response_code(msg)

    def close(self) -> None:
        self.client.close()
        self.peer.close()
