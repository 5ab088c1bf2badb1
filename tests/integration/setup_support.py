"""What the setup tests share: the real `confedge` console script, a wizard driven on a pty, a
recording conferencing node, `confedge run` on loopback, and a blocking TURN client.

Everything is sync and subprocess-based, as an operator meets it: the wizard reads a terminal,
the service is a process, the node and the TURN client are sockets.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pexpect
from cryptography import x509
from cryptography.x509.oid import NameOID

from confedge.stun import decode_xor_address
from confedge.stun.attributes import (
    decode_error_code,
    encode_requested_transport,
    encode_xor_address,
)
from confedge.stun.constants import Attr, Method, MsgClass
from confedge.stun.integrity import long_term_key
from confedge.stun.message import MessageBuilder, new_transaction_id, parse_message

CONFEDGE = str(Path(sys.executable).parent / "confedge")
GOOD_PIN = "1234"


def confedge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The console script, as an operator runs it."""
    return subprocess.run(
        [CONFEDGE, *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def on_loopback(state: Path, **more: str) -> tuple[int, int, list[str]]:
    """`--set` flags that move the listeners to free loopback ports (keys the wizard does not
    ask); returns (HTTPS port, TURN port, flags)."""
    from ports import free_port

    https_port, turn_port = (
        free_port(45700, 45800, shuffle=True),
        free_port(45100, 45200, shuffle=True, udp=True),
    )
    settings = {
        "server.state_dir": str(state),
        "proxy.https_port": str(https_port),
        "proxy.http_port": "0",
        "proxy.workers": "1",
        "turn.port": str(turn_port),
        "management.enabled": "false",
        **more,
    }
    flags = [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    return https_port, turn_port, flags


def drive_wizard(
    config: Path, answers: list[tuple[str, str]], *, confirm: str = "y", timeout: float = 20
) -> tuple[int, str]:
    """Run `confedge setup` on a pty; answer each (text expected, line to send) in order.

    Returns (exit code, transcript without terminal escapes). An expected text that is a
    reason (a re-ask) is answered by the next pair, so a list can say "expect the reason, then
    the question again".
    """
    child = pexpect.spawn(
        CONFEDGE,
        ["setup", "--config", str(config)],
        encoding="utf-8",
        timeout=timeout,
        dimensions=(60, 200),
        # A pty is not a terminal emulator: nothing answers prompt_toolkit's cursor-position
        # request, which it would wait for (about a second per prompt), so it is not asked.
        env={
            "PATH": "/usr/bin:/bin",
            "TERM": "xterm",
            "HOME": str(config.parent),
            "PROMPT_TOOLKIT_NO_CPR": "1",
        },
    )
    log: list[str] = []
    try:
        for expected, line in answers:
            child.expect_exact(expected)
            log.append(child.before + child.after)
            if line is not None:
                child.sendline(line)
        child.expect_exact("? [Y/n]:")
        log.append(child.before + child.after)
        child.sendline(confirm)
        child.expect(pexpect.EOF)
        log.append(child.before)
    finally:
        child.close()
    text = "".join(log)
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")
    return int(child.exitstatus if child.exitstatus is not None else -1), text


class _NodeHandler(BaseHTTPRequestHandler):
    server: RecordingNode

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.seen.append(("GET", self.path, self.headers.get("X-Real-IP", "")))
        self._answer(200, {"status": "success", "result": "ok"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.seen.append(("POST", self.path, self.headers.get("X-Real-IP", "")))
        if self.path.endswith("/request_token"):
            if self.headers.get("pin") == GOOD_PIN:
                self._answer(200, {"status": "success", "result": {"token": "t"}})
            else:
                self._answer(403, {"status": "success", "result": "Invalid PIN"})
            return
        self._answer(200, {"status": "success", "result": True})


class RecordingNode(ThreadingHTTPServer):
    """A conferencing node on 127.0.0.1 (plain HTTP) that records what reached it and answers
    request_token with the real node's 'Invalid PIN' for any PIN but GOOD_PIN."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _NodeHandler)
        self.seen: list[tuple[str, str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@contextlib.contextmanager
def recording_node() -> Iterator[RecordingNode]:
    node = RecordingNode()
    try:
        yield node
    finally:
        node.close()


def _wait_tcp(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"confedge run exited: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} never opened")


def _wait_stun(port: int, proc: subprocess.Popen[str]) -> None:
    """Until the TURN server answers a STUN Binding request on UDP `port`."""
    deadline = time.monotonic() + 20
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError("confedge run exited")
            s.sendto(
                MessageBuilder(Method.BINDING, MsgClass.REQUEST, new_transaction_id()).build(),
                ("127.0.0.1", port),
            )
            try:
                s.recv(2048)
                return
            except OSError:
                continue
    raise AssertionError(f"TURN port {port} never answered")


@contextlib.contextmanager
def running(config: Path, https_port: int) -> Iterator[subprocess.Popen[str]]:
    """`confedge run --config FILE`, until its HTTPS port (and TURN, when the file enables it)
    answers; stopped with SIGTERM."""
    proc = subprocess.Popen(
        [CONFEDGE, "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_tcp(https_port, proc)
        turn = tomllib.loads(config.read_text()).get("turn", {})
        if turn.get("enabled", True):
            _wait_stun(turn.get("port", 3478), proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def https(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], str]:
    """One request through the proxy: (status, headers lower-cased, served certificate's CN)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None, headers=headers or {})
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
        resp = conn.getresponse()
        resp.read()
        assert der is not None
        cn = (
            x509.load_der_x509_certificate(der)
            .subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
            .value
        )
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, str(cn)
    finally:
        conn.close()


def rest_credential(secret: str, user: str = "browser") -> tuple[str, str]:
    """The TURN REST API's time-limited credential (username expiry:user, HMAC-SHA1 password)."""
    username = f"{int(time.time()) + 600}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


class TurnClient:
    """A blocking TURN client over UDP from one source address: Allocate, then CreatePermission
    with the same long-term credential (the nonce learnt from the first 401 is reused)."""

    def __init__(self, port: int, source: str, username: str, password: str, realm: str) -> None:
        self.server = ("127.0.0.1", port)
        self.username, self.realm = username, realm
        self.key = long_term_key(username, realm, password)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(2)
        self.sock.bind((source, 0))
        self.nonce: bytes | None = None
        self.relayed: tuple[str, int] | None = None

    def close(self) -> None:
        self.sock.close()

    def _ask(self, method: int, attrs: Callable[[bytes], list[tuple[int, bytes]]]) -> Any:
        tid = new_transaction_id()
        b = MessageBuilder(method, MsgClass.REQUEST, tid)
        for t, v in attrs(tid):
            b.add(t, v)
        if self.nonce is None:
            self.sock.sendto(b.build(fingerprint=True), self.server)
        else:
            b.add(Attr.USERNAME, self.username.encode())
            b.add(Attr.REALM, self.realm.encode())
            b.add(Attr.NONCE, self.nonce)
            self.sock.sendto(b.build(key=self.key, fingerprint=True), self.server)
        try:
            return parse_message(self.sock.recv(2048))
        except TimeoutError:
            return None

    def _result(self, answer: Any) -> tuple[int, int] | None:
        if answer is None:
            return None
        err = answer.get(Attr.ERROR_CODE)
        return answer.msg_class, decode_error_code(err)[0] if err is not None else 0

    def allocate(self) -> tuple[int, int] | None:
        """(message class, error code or 0), or None when the server stays silent."""

        def attrs(tid: bytes) -> list[tuple[int, bytes]]:
            return [(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))]

        answer = self._ask(Method.ALLOCATE, attrs)
        if answer is not None and answer.get(Attr.NONCE) is not None and self.nonce is None:
            self.nonce = answer.get(Attr.NONCE)
            answer = self._ask(Method.ALLOCATE, attrs)
        if answer is not None and answer.get(Attr.XOR_RELAYED_ADDRESS) is not None:
            self.relayed = decode_xor_address(
                answer.get(Attr.XOR_RELAYED_ADDRESS), answer.transaction_id
            )
        return self._result(answer)

    def permit(self, peer: str) -> tuple[int, int] | None:
        """CreatePermission for `peer` (after a successful allocate)."""

        def attrs(tid: bytes) -> list[tuple[int, bytes]]:
            return [(Attr.XOR_PEER_ADDRESS, encode_xor_address(peer, 9, tid))]

        return self._result(self._ask(Method.CREATE_PERMISSION, attrs))


def turn_allocate(
    port: int,
    *,
    source: str,
    username: str,
    password: str,
    realm: str,
    relayed: list[tuple[str, int]] | None = None,
) -> tuple[int, int] | None:
    """One authenticated UDP Allocate from `source`: (message class, error code or 0), or None
    when the server stays silent. A success's relayed address is appended to `relayed`."""
    client = TurnClient(port, source, username, password, realm)
    try:
        result = client.allocate()
        if relayed is not None and client.relayed is not None:
            relayed.append(client.relayed)
        return result
    finally:
        client.close()
