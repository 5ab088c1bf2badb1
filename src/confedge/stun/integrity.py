"""Message integrity, keys and fingerprint (RFC 8489 §9.2, §14.4-§14.7; RFC 5389 §15.4).

Theory of operation
-------------------
MESSAGE-INTEGRITY is HMAC-SHA1 (MESSAGE-INTEGRITY-SHA256: HMAC-SHA256, possibly truncated to
16..32 bytes) over the message from the header up to, not including, the integrity attribute,
*with the header's length field rewritten* to end right after the integrity attribute (§14.5,
§14.6). So a MESSAGE-INTEGRITY followed by FINGERPRINT is checked against a header whose length
is 8 bytes shorter than the one on the wire. :func:`check_integrity` rebuilds exactly that prefix
from ``Message.raw`` and the offset :func:`parse_message` recorded, then compares in constant time
(``hmac.compare_digest``), so that response timing says nothing about how many bytes matched.

Long-term credential keys (RFC 8489 §9.2.2, RFC 5389 §15.4)::

    MD5:     key = MD5(username ":" prep(realm) ":" prep(password))
    SHA-256: key = SHA-256(username ":" prep(realm) ":" prep(password))

RFC 8489 names the OpaqueString profile (RFC 8265) for prep; RFC 5389 named SASLprep. For every
string real deployments use they agree, but the RFC 5769 §2.4 test vector ("The\\u00adM\\u00aatr
\\u2168" -> "TheMatrIX") is only satisfied by SASLprep: OpaqueString would refuse the soft hyphen
(default-ignorable code points are disallowed in PRECIS) and keep "ª" and "Ⅸ" (it normalises with
NFC, not NFKC). RFC 8489 Appendix B.1 prints the same "TheMatrIX", so SASLprep it is. The
username is used as received (both RFCs' vectors leave it unprocessed).

A realm SASLprep refuses is used as is (it is the operator's domain, never attacker input).

USERHASH (RFC 8489 §14.4): SHA-256(username ":" realm), letting clients hide the username.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib

from .constants import FINGERPRINT_XOR
from .mac import hmac_digest
from .message import Message
from .saslprep import saslprep

__all__ = [
    "check_fingerprint",
    "check_integrity",
    "long_term_key",
    "long_term_key_sha256",
    "short_term_key",
    "userhash",
]

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _prep_realm(realm: str) -> str:
    try:
        return saslprep(realm)
    except ValueError:
        return realm


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """16-byte MD5 key of the long-term credential mechanism. Raises ValueError when the
    password contains characters SASLprep prohibits (check configured passwords at load time)."""
    text = f"{username}:{_prep_realm(realm)}:{saslprep(password)}"
    return hashlib.md5(text.encode(), usedforsecurity=False).digest()


def long_term_key_sha256(username: str, realm: str, password: str) -> bytes:
    """32-byte key for PASSWORD-ALGORITHM SHA-256 (RFC 8489 §9.2.2, §18.5)."""
    text = f"{username}:{_prep_realm(realm)}:{saslprep(password)}"
    return hashlib.sha256(text.encode()).digest()


def short_term_key(password: str) -> bytes:
    """Short-term credential key (RFC 8489 §9.1.1): the prepared password itself."""
    return saslprep(password).encode()


def userhash(username: str, realm: str) -> bytes:
    """USERHASH value: SHA-256(username ":" realm) (RFC 8489 §14.4)."""
    return hashlib.sha256(f"{username}:{_prep_realm(realm)}".encode()).digest()


def _covered(raw: bytes, offset: int, attr_len: int) -> bytes:
    """Header with the length rewritten to end after the attribute at ``offset`` (whose value
    is ``attr_len`` bytes), plus the attributes before it."""
    return raw[:2] + _U16.pack(offset - 20 + 4 + attr_len) + raw[4:offset]


def check_integrity(msg: Message, key: bytes) -> bool:
    """Verify MESSAGE-INTEGRITY-SHA256 when present, else MESSAGE-INTEGRITY, with ``key``.

    False when neither is present or ``msg`` was not parsed (``raw`` empty). RFC 8489 §9.2.4:
    when both are present the SHA-256 one is what a server that supports it checks.
    """
    raw = msg.raw
    off = msg.integrity_sha256_offset
    if off >= 0 and raw:
        alen = raw[off + 2] << 8 | raw[off + 3]
        mac = hmac_digest(key, _covered(raw, off, alen), "sha256")[:alen]
        return hmac.compare_digest(mac, raw[off + 4 : off + 4 + alen])
    off = msg.integrity_offset
    if off >= 0 and raw:
        mac = hmac_digest(key, _covered(raw, off, 20), "sha1")
        return hmac.compare_digest(mac, raw[off + 4 : off + 24])
    return False


def check_fingerprint(msg: Message) -> bool:
    """True only when FINGERPRINT is present and valid (RFC 8489 §14.7). :func:`parse_message`
    already rejects a bad one; this lets a server *require* one (e.g. ICE, RFC 8445 §7.2.2)."""
    off = msg.fingerprint_offset
    raw = msg.raw
    if off < 0 or len(raw) < off + 8:
        return False
    expected: int = _U32.unpack_from(raw, off + 4)[0]
    return (zlib.crc32(raw[:off]) ^ FINGERPRINT_XOR) == expected
