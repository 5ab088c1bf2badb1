"""A TLS ClientHello reader, to see what a client offers before any handshake (tests only).

Why it exists: sharing the HTTPS port with TURN over TLS hinges on what a `turns:` client puts in
its ClientHello. RFC 7443 §4 wants ALPN ``stun.turn``; browsers do not send it (measured with
this module against Chromium: tests/e2e/test_turns_on_https_port.py). confedge itself never
parses a ClientHello (OpenSSL does, and tells the proxy which ALPN protocol it selected);
this reader is the measuring instrument, written defensively because the bytes it reads are
whatever a client sent.

Format (RFC 8446 §5.1 records, §4.1.2 ClientHello, §4.2 extensions; RFC 5246 §7.4.1.2 for
TLS 1.2): records of type 22 (handshake) carry the handshake message, which may be split over
several records; the ClientHello body is legacy_version(2) random(32) session_id<0..32>
cipher_suites<2..2^16-2> compression_methods<1..2^8-1> extensions<0..2^16-1>. ALPN (RFC 7301
§3.1, type 16) is a list of length-prefixed names; SNI (RFC 6066 §3, type 0) a list of
(name_type, HostName); supported_versions (RFC 8446 §4.2.1, type 43) a list of uint16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ClientHello", "ClientHelloError", "NeedMore", "parse_client_hello"]

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
# A ClientHello larger than this is refused (real ones are a few hundred bytes to ~2 KB with
# post-quantum key shares); it bounds what a reader waits for.
MAX_HELLO = 64 * 1024


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello (the message says where)."""


class NeedMore(ClientHelloError):
    """The bytes so far are a valid prefix; more are needed to finish the ClientHello."""


@dataclass(frozen=True)
class ClientHello:
    legacy_version: int
    sni: str | None
    alpn: tuple[str, ...]
    supported_versions: tuple[int, ...]
    extensions: tuple[int, ...] = field(default=())  # extension types, in the order sent


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, name: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ClientHelloError(f"{self.what}: {name} runs past the end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, name: str) -> int:
        return int.from_bytes(self.take(n, name), "big")

    def vector(self, len_bytes: int, name: str) -> bytes:
        return self.take(self.uint(len_bytes, f"{name} length"), name)

    def done(self) -> bool:
        return self.pos >= len(self.data)


def _handshake_bytes(data: bytes) -> bytes:
    """The handshake message joined from the leading handshake records (RFC 8446 §5.1)."""
    out = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            raise NeedMore("record header incomplete")
        ctype = data[pos]
        if ctype != RECORD_HANDSHAKE:
            raise ClientHelloError(f"record type {ctype} is not handshake (22)")
        if data[pos + 1] != 3:
            raise ClientHelloError(f"record version {data[pos + 1]}.{data[pos + 2]} is not TLS")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 256:
            raise ClientHelloError(f"record length {length} out of range")
        if len(data) - pos - 5 < length:
            raise NeedMore("record incomplete")
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4:
            need = 4 + int.from_bytes(out[1:4], "big")
            if need > MAX_HELLO:
                raise ClientHelloError(f"handshake message of {need} bytes is too large")
            if len(out) >= need:
                return bytes(out[:need])


def parse_client_hello(data: bytes) -> ClientHello:
    """Parse the ClientHello at the start of a TLS connection's bytes.

    Raises NeedMore for a valid but incomplete prefix, ClientHelloError for anything else; never
    any other exception, whatever the input.
    """
    msg = _handshake_bytes(data)
    if msg[0] != HANDSHAKE_CLIENT_HELLO:
        raise ClientHelloError(f"handshake type {msg[0]} is not ClientHello (1)")
    r = _Reader(msg[4:], "ClientHello")
    legacy_version = r.uint(2, "legacy_version")
    r.take(32, "random")
    session_id = r.vector(1, "session_id")
    if len(session_id) > 32:
        raise ClientHelloError("ClientHello: session_id longer than 32 bytes")
    suites = r.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise ClientHelloError("ClientHello: cipher_suites empty or of odd length")
    if not r.vector(1, "compression_methods"):
        raise ClientHelloError("ClientHello: no compression method")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    types: list[int] = []
    if not r.done():
        exts = _Reader(r.vector(2, "extensions"), "extensions")
        if not r.done():
            raise ClientHelloError("ClientHello: bytes after the extensions")
        while not exts.done():
            etype = exts.uint(2, "extension type")
            body = exts.vector(2, f"extension {etype}")
            if etype in types:
                raise ClientHelloError(f"extension {etype} sent twice")  # RFC 8446 §4.2
            types.append(etype)
            if etype == EXT_ALPN:
                alpn = _alpn(body)
            elif etype == EXT_SERVER_NAME:
                sni = _sni(body)
            elif etype == EXT_SUPPORTED_VERSIONS:
                versions = _versions(body)
    return ClientHello(legacy_version, sni, alpn, versions, tuple(types))


def _alpn(body: bytes) -> tuple[str, ...]:
    r = _Reader(body, "ALPN")
    names = _Reader(r.vector(2, "protocol_name_list"), "ALPN")
    if not r.done():
        raise ClientHelloError("ALPN: bytes after the list")
    out: list[str] = []
    while not names.done():
        name = names.vector(1, "protocol name")
        if not name:
            raise ClientHelloError("ALPN: empty protocol name")  # RFC 7301 §3.1
        out.append(name.decode("latin-1"))
    if not out:
        raise ClientHelloError("ALPN: empty list")
    return tuple(out)


def _sni(body: bytes) -> str | None:
    r = _Reader(body, "server_name")
    names = _Reader(r.vector(2, "server_name_list"), "server_name")
    host: str | None = None
    while not names.done():
        kind = names.uint(1, "name_type")
        value = names.vector(2, "HostName")
        if kind == 0 and host is None:
            host = value.decode("ascii", errors="replace")
    return host


def _versions(body: bytes) -> tuple[int, ...]:
    r = _Reader(body, "supported_versions")
    raw = r.vector(1, "versions")
    if len(raw) % 2:
        raise ClientHelloError("supported_versions: odd length")
    return tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))
