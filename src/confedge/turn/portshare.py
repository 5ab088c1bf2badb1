"""TURN over TLS on the HTTPS port (``turn.tls_on_https``): the sans-I/O decisions.

Theory of operation
-------------------
Browsers behind strict firewalls reach TURN only on TCP 443, where the web app lives too
(SPEC §3). The proxy's HTTPS listener terminates TLS for both and decides per connection, once:

1. ALPN (RFC 7443 §4): the listener offers ``stun.turn`` before ``http/1.1``; a client that
   offers ``stun.turn`` gets it and is TURN from the first byte. OpenSSL parses the
   ClientHello and selects; nothing here reads handshake bytes.
2. Otherwise the first application bytes after the handshake decide (:func:`classify`): a STUN
   message starts with the bits 00 and carries the magic cookie at bytes 4..8 (RFC 8489 §5);
   ChannelData starts with the bits 01 (RFC 8656 §12); an HTTP request line starts with a method
   token and a space (RFC 9112 §3). This is the path browsers take: Chromium's ``turns:`` client
   sends no ALPN extension at all (measured, docs/TURN.md), so ALPN alone would never route it.

HTTP methods are letters, and the first byte of ``GET /`` (0x47) is also a possible first byte
of ChannelData. The bytes after it separate them: a method is a token followed by a space within
the first 16 bytes; ChannelData goes on with the channel number's low byte and a 16-bit length
whose high byte is 0x00 for any packet under 256 bytes, which is no token character. A new
connection cannot legitimately carry ChannelData anyway (a channel belongs to an allocation made
on that very connection), so TURN closes such a connection at once; what matters is that no
HTTP request is ever taken for TURN, and that an HTTP request costs one call to decide.

The connection is then served by the TURN service: handed over in process (proxy.workers = 1),
or relayed over a local stream from a worker process, which tells TURN the client's real
address in a PROXY protocol v2 header (:func:`encode_proxy_v2`, :func:`decode_proxy_v2`;
haproxy's proxy-protocol.txt §2.2), so that the allocation's 5-tuple, the 401 budget and the
guard see the client, not the worker.
"""

from __future__ import annotations

import ipaddress
import socket

from confedge.stun.constants import MAGIC_COOKIE_BYTES as _COOKIE

__all__ = [
    "ALPN_STUN_TURN",
    "FIRST_HTTP",
    "FIRST_MORE",
    "FIRST_TURN",
    "PROXY_V2_SIGNATURE",
    "ProxyHeaderError",
    "classify",
    "decode_proxy_v2",
    "encode_proxy_v2",
]

ALPN_STUN_TURN = "stun.turn"  # RFC 7443 §6 (IANA ALPN registry)

FIRST_HTTP = 0  # serve as HTTP (also anything that is neither: the HTTP parser refuses it)
FIRST_TURN = 1  # a STUN message or ChannelData: hand to TURN
FIRST_MORE = 2  # not decidable yet: wait for more bytes

# RFC 9110 §5.6.2 tchar: the characters of a method token.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# The longest method token looked for (OPTIONS and CONNECT are 7); beyond it the bytes are
# served as HTTP, whose parser refuses an unknown method.
_TOKEN_SCAN = 16


def classify(data: bytes | memoryview) -> int:
    """FIRST_HTTP, FIRST_TURN or FIRST_MORE for a connection's first application bytes.

    Never needs more than 16 bytes; any input, however short or hostile, gets an answer.
    """
    n = len(data)
    if n == 0:
        return FIRST_MORE
    b0 = data[0]
    if b0 < 0x40:
        # RFC 8489 §5: the most significant two bits of every STUN message are zeroes, and the
        # magic cookie follows the type and length fields.
        if n < 8:
            return FIRST_MORE
        return FIRST_TURN if bytes(data[4:8]) == _COOKIE else FIRST_HTTP
    if b0 < 0x80:
        # 0b01: ChannelData (RFC 8656 §12), unless it reads as "METHOD " (RFC 9112 §3).
        if b0 not in _TCHAR:
            return FIRST_TURN
        for i in range(1, min(n, _TOKEN_SCAN)):
            c = data[i]
            if c == 0x20:
                return FIRST_HTTP
            if c not in _TCHAR:
                return FIRST_TURN
        return FIRST_MORE if n < _TOKEN_SCAN else FIRST_HTTP
    return FIRST_HTTP


# -- PROXY protocol v2 (haproxy proxy-protocol.txt §2.2), the subset a local relay needs -------

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_VERSION_PROXY = 0x21  # version 2, command PROXY
_VERSION_LOCAL = 0x20  # version 2, command LOCAL (no address: health checks)
_INET_STREAM = 0x11
_INET6_STREAM = 0x21
_HEADER = 16
# Address blocks are 12 (IPv4) or 36 (IPv6) bytes plus optional TLVs; more is refused (the
# sender is confedge's own worker, which sends no TLVs).
_MAX_ADDRESS_BLOCK = 216


class ProxyHeaderError(ValueError):
    """Bytes that are not a PROXY protocol v2 header of a TCP connection."""


def _family_bytes(ip: str) -> tuple[int, bytes]:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # a scope id never crosses the relay
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.version, addr.packed


def encode_proxy_v2(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The header announcing a TCP connection from `src` to `dst` (addresses as text)."""
    family, src_ip = _family_bytes(src[0])
    dst_family, dst_ip = _family_bytes(dst[0])
    if dst_family != family:  # the listener's own address is informational only
        dst_ip = bytes(len(src_ip))
    ports = src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    block = src_ip + dst_ip + ports
    fam = _INET_STREAM if family == 4 else _INET6_STREAM
    return PROXY_V2_SIGNATURE + bytes([_VERSION_PROXY, fam]) + len(block).to_bytes(2, "big") + block


def decode_proxy_v2(data: bytes) -> tuple[tuple[str, int] | None, int] | None:
    """(source address or None for LOCAL, bytes consumed), or None while incomplete.

    Raises ProxyHeaderError for anything else; never any other exception.
    """
    if len(data) < _HEADER:
        if not PROXY_V2_SIGNATURE.startswith(bytes(data[: len(PROXY_V2_SIGNATURE)])):
            raise ProxyHeaderError("no PROXY protocol v2 signature")
        return None
    if data[:12] != PROXY_V2_SIGNATURE:
        raise ProxyHeaderError("no PROXY protocol v2 signature")
    ver_cmd, fam = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if length > _MAX_ADDRESS_BLOCK:
        raise ProxyHeaderError(f"address block of {length} bytes is too long")
    if len(data) < _HEADER + length:
        return None
    block = data[_HEADER : _HEADER + length]
    if ver_cmd == _VERSION_LOCAL:
        return None, _HEADER + length
    if ver_cmd != _VERSION_PROXY:
        raise ProxyHeaderError(f"version/command byte {ver_cmd:#04x} is not v2 PROXY or LOCAL")
    if fam == _INET_STREAM and length >= 12:
        ip = socket.inet_ntop(socket.AF_INET, block[0:4])
        port = int.from_bytes(block[8:10], "big")
    elif fam == _INET6_STREAM and length >= 36:
        ip = socket.inet_ntop(socket.AF_INET6, block[0:16])
        port = int.from_bytes(block[32:34], "big")
    else:
        raise ProxyHeaderError(f"family/transport byte {fam:#04x} (length {length}) is not TCP")
    return (ip, port), _HEADER + length
