"""Client side of the namespace tests: run inside a namespace with `ip netns exec NS python ...`.

Every command binds the source address it is given (the "Internet" namespace holds a non-node
and a node address on one veth) and prints one JSON line, so the test reads a result, never
a traceback. Timeouts are short and bounded: "no answer" is what a kernel drop looks like.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import time

from confedge.stun import (
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    decode_error_code,
    decode_xor_address,
    encode_requested_transport,
    encode_text,
    encode_xor_address,
    long_term_key,
    new_transaction_id,
    parse_message,
)

TIMEOUT = 2.0


def _out(**kw: object) -> int:
    print(json.dumps(kw), flush=True)
    return 0


def _udp(bind: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.settimeout(TIMEOUT)
    return s


def _ask(s: socket.socket, server: tuple[str, int], wire: bytes, tid: bytes) -> Message | None:
    """Send a request, return the answer with the same transaction id, or None after TIMEOUT."""
    s.sendto(wire, server)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            data, _ = s.recvfrom(2048)
        except TimeoutError:
            return None
        msg = parse_message(data)
        if msg.transaction_id == tid:
            return msg
    return None


def cmd_stun(a: argparse.Namespace) -> int:
    s = _udp(a.bind)
    tid = new_transaction_id()
    wire = MessageBuilder(Method.BINDING, MsgClass.REQUEST, tid).build(fingerprint=True)
    msg = _ask(s, (a.host, a.port), wire, tid)
    if msg is None:
        return _out(answer=False)
    mapped = msg.get(Attr.XOR_MAPPED_ADDRESS)
    return _out(answer=True, mapped=list(decode_xor_address(mapped, tid)) if mapped else None)


def _allocate(s: socket.socket, a: argparse.Namespace) -> tuple[dict[str, object], bytes]:
    server = (a.host, a.port)
    tid = new_transaction_id()
    wire = (
        MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, tid)
        .add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
        .build()
    )
    first = _ask(s, server, wire, tid)
    if first is None:
        return {"answer": False}, b""
    if first.msg_class != MsgClass.ERROR:
        return {"answer": True, "error": None}, b""
    code, _ = decode_error_code(first.get(Attr.ERROR_CODE) or b"\0\0\0\0")
    realm, nonce = first.get(Attr.REALM), first.get(Attr.NONCE)
    if code != 401 or realm is None or nonce is None or not a.user:
        return {"answer": True, "error": code}, b""
    key = long_term_key(a.user, realm.decode(), a.password)
    tid = new_transaction_id()
    wire = (
        MessageBuilder(Method.ALLOCATE, MsgClass.REQUEST, tid)
        .add(Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
        .add(Attr.USERNAME, encode_text(a.user))
        .add(Attr.REALM, realm)
        .add(Attr.NONCE, nonce)
        .build(key=key)
    )
    msg = _ask(s, server, wire, tid)
    if msg is None:
        return {"answer": False, "after_401": True}, b""
    if msg.msg_class == MsgClass.ERROR:
        err = decode_error_code(msg.get(Attr.ERROR_CODE) or b"\0\0\0\0")[0]
        return {"answer": True, "error": err}, b""
    relayed = decode_xor_address(msg.get(Attr.XOR_RELAYED_ADDRESS) or b"", tid)
    result: dict[str, object] = {"answer": True, "error": None, "relayed": list(relayed)}
    if a.peer:
        result["echo"] = _relay_once(s, server, a, key, realm, nonce)
    return result, key


def _relay_once(
    s: socket.socket,
    server: tuple[str, int],
    a: argparse.Namespace,
    key: bytes,
    realm: bytes,
    nonce: bytes,
) -> bool:
    """CreatePermission for the peer, one Send indication, and wait for its echo as Data."""
    host, port = a.peer.rsplit(":", 1)
    tid = new_transaction_id()
    wire = (
        MessageBuilder(Method.CREATE_PERMISSION, MsgClass.REQUEST, tid)
        .add(Attr.XOR_PEER_ADDRESS, encode_xor_address(host, 0, tid))
        .add(Attr.USERNAME, encode_text(a.user))
        .add(Attr.REALM, realm)
        .add(Attr.NONCE, nonce)
        .build(key=key)
    )
    msg = _ask(s, server, wire, tid)
    if msg is None or msg.msg_class != MsgClass.SUCCESS:
        return False
    payload = b"confedge-netns-media"
    for _ in range(3):  # UDP: a few tries, each bounded by TIMEOUT
        tid = new_transaction_id()
        wire = (
            MessageBuilder(Method.SEND, MsgClass.INDICATION, tid)
            .add(Attr.XOR_PEER_ADDRESS, encode_xor_address(host, int(port), tid))
            .add(Attr.DATA, payload)
            .build()
        )
        s.sendto(wire, server)
        try:
            data, _ = s.recvfrom(2048)
        except TimeoutError:
            continue
        msg = parse_message(data)
        if msg.method == Method.DATA and msg.get(Attr.DATA) == payload:
            return True
    return False


def cmd_allocate(a: argparse.Namespace) -> int:
    result, _ = _allocate(_udp(a.bind), a)
    return _out(**result)


def cmd_echo_peer(a: argparse.Namespace) -> int:
    """A media peer on the Internet side: echo each datagram, record who sent it."""
    host, port = a.listen.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    s.settimeout(0.5)
    print(json.dumps({"listening": True}), flush=True)
    deadline = time.monotonic() + a.seconds
    while time.monotonic() < deadline:
        try:
            data, src = s.recvfrom(2048)
        except TimeoutError:
            continue
        print(json.dumps({"from": list(src)}), flush=True)
        s.sendto(data, src)
    return 0


def cmd_https(a: argparse.Namespace) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(
        a.host, a.port, timeout=TIMEOUT, context=ctx, source_address=(a.bind, 0)
    )
    try:
        headers = {"pin": a.pin} if a.pin else {}
        body = a.body.encode() if a.body else None
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(a.method, a.path, body=body, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        return _out(status=None, error=type(exc).__name__)
    return _out(status=resp.status, body=body[:200].decode(errors="replace"))


def cmd_tcp(a: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((a.bind, 0))
    s.settimeout(TIMEOUT)
    try:
        s.connect((a.host, a.port))
    except TimeoutError:
        return _out(result="timeout")
    except ConnectionRefusedError:
        return _out(result="refused")
    except OSError as exc:
        return _out(result=type(exc).__name__)
    # Connected; a listener that refuses the source at accept closes at once (management).
    s.settimeout(0.5)
    try:
        closed = s.recv(1) == b""
    except TimeoutError:
        closed = False
    except OSError:
        closed = True
    return _out(result="closed" if closed else "connected")


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("stun", "allocate", "https", "tcp"):
        sp = sub.add_parser(name)
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        sp.add_argument("--bind", required=True)
        if name == "allocate":
            sp.add_argument("--user", default="")
            sp.add_argument("--password", default="")
            sp.add_argument("--peer", default="")
        if name == "https":
            sp.add_argument("--path", default="/api/client/v2/status")
            sp.add_argument("--method", default="GET")
            sp.add_argument("--pin", default="")
            sp.add_argument("--body", default="")
    sp = sub.add_parser("echo-peer")
    sp.add_argument("--listen", required=True)
    sp.add_argument("--seconds", type=float, default=30)
    a = p.parse_args()
    cmds = {
        "stun": cmd_stun,
        "allocate": cmd_allocate,
        "https": cmd_https,
        "tcp": cmd_tcp,
        "echo-peer": cmd_echo_peer,
    }
    return cmds[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
