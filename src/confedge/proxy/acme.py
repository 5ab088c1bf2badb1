"""ACME HTTP-01 challenges on the HTTP port (RFC 8555 §8.3), for certbot's webroot mode.

Why: an operator with a public name wants a certificate from Let's Encrypt (or any ACME CA)
renewed unattended, as nginx in front of certbot gives them. The CA validates HTTP-01 by
fetching `http://<name>/.well-known/acme-challenge/<token>` on port 80, which confedge
otherwise answers with a 301 to https. With `proxy.acme_webroot` set, `certbot certonly
--webroot -w <dir>` writes the key authorization to `<dir>/.well-known/acme-challenge/<token>`
and the HTTP listener (proxy/redirect.py) answers that path from the file; everything else on
port 80 is still redirected. A certbot deploy hook then runs `confedge cert install`
(docs/CERTIFICATES.md, "Let's Encrypt").

What is served, deliberately narrow since it is plain HTTP from the Internet: only a token of
base64url characters (RFC 8555 §8.3: "The token MUST NOT contain any characters outside the
base64url alphabet"), no other path under the prefix, no query; only a regular file, not
followed through a symbolic link at its own name, of at most MAX_BYTES (a key authorization is
the token, ".", and a 43-character thumbprint). Anything else is a 404, as a missing token is.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Final

__all__ = ["MAX_BYTES", "PREFIX", "read_challenge"]

PREFIX: Final = b"/.well-known/acme-challenge/"
MAX_BYTES: Final = 4096
_TOKEN: Final = re.compile(rb"[A-Za-z0-9_-]{1,255}")
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_challenge(webroot: str, target: bytes) -> bytes | None:
    """The file certbot left for the request target `target` (which starts with PREFIX), or
    None (answer 404): not a token, no such file, not a regular file, too large, unreadable."""
    token = target[len(PREFIX) :]
    if _TOKEN.fullmatch(token) is None:
        return None
    path = os.path.join(webroot, ".well-known", "acme-challenge", token.decode("ascii"))
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            return None
        data = os.read(fd, MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= MAX_BYTES else None
