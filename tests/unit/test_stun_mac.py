"""stun/mac.py: HMAC with cached key pads gives exactly hmac.digest's bytes (RFC 2104)."""

from __future__ import annotations

import hmac
import os

import pytest

from confedge.stun import mac


@pytest.mark.parametrize("digest", ["sha1", "sha256"])
@pytest.mark.parametrize("key_len", [0, 1, 16, 32, 63, 64, 65, 200])
def test_same_bytes_as_hmac_digest(digest: str, key_len: int) -> None:
    key = os.urandom(key_len)
    for size in (0, 1, 55, 56, 64, 100, 1500):
        msg = os.urandom(size)
        assert mac.hmac_digest(key, msg, digest) == hmac.digest(key, msg, digest)
        # The second call takes the cached pads; still the same.
        assert mac.hmac_digest(key, msg, digest) == hmac.digest(key, msg, digest)


def test_cache_is_bounded_and_stays_correct() -> None:
    keys = [os.urandom(16) for _ in range(mac.CACHE + 5)]
    for key in keys:
        assert mac.hmac_digest(key, b"m", "sha1") == hmac.digest(key, b"m", "sha1")
    assert len(mac._pads) <= mac.CACHE
    assert mac.hmac_digest(keys[0], b"m", "sha1") == hmac.digest(keys[0], b"m", "sha1")
