"""HMAC with the key's pads hashed once per key (RFC 2104 §2), for the few keys a server uses.

Why: every Allocate costs two HMACs (the request's MESSAGE-INTEGRITY and the response's;
its nonce is a keyed BLAKE2s, turn/auth.py).  ``hmac.digest`` with OpenSSL 3 looks the digest
up by name and builds a fresh HMAC context on every call: about 3-4 µs each on the benchmark
host (docs/BENCHMARKS.md).  The keys are few and long-lived (the long-term key of a user,
RFC 8489 §9.2.2; a REST username's, cached), so
the two hash states after absorbing ``key XOR ipad`` and ``key XOR opad`` are computed once and
copied per message: the same bytes as ``hmac.digest``, in about a quarter of the time.

RFC 2104 §2: ``H(K XOR opad, H(K XOR ipad, text))``, with K zero-padded to the block size
(64 bytes for SHA-1 and SHA-256), or first hashed when it is longer than a block.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["hmac_digest"]

_BLOCK = 64  # SHA-1 and SHA-256 block size, bytes
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
CACHE = 1024  # (key, digest) pairs kept; cleared when full (made-up keys only empty it)

_pads: dict[tuple[bytes, str], tuple[Any, Any]] = {}


def _keyed(key: bytes, digest: str) -> tuple[Any, Any]:
    block = hashlib.new(digest, key).digest() if len(key) > _BLOCK else key
    block = block.ljust(_BLOCK, b"\x00")
    inner = hashlib.new(digest, block.translate(_IPAD))
    outer = hashlib.new(digest, block.translate(_OPAD))
    if len(_pads) >= CACHE:
        _pads.clear()
    _pads[(key, digest)] = pair = (inner, outer)
    return pair


def hmac_digest(key: bytes, msg: bytes, digest: str) -> bytes:
    """``hmac.digest(key, msg, digest)`` for ``digest`` "sha1" or "sha256"."""
    pair = _pads.get((key, digest))
    if pair is None:
        pair = _keyed(key, digest)
    inner = pair[0].copy()
    inner.update(msg)
    outer = pair[1].copy()
    outer.update(inner.digest())
    result: bytes = outer.digest()
    return result
