"""The canonical request path (sans-I/O), defined once: for forwarding, allowlist, static mounts.

Theory of operation
-------------------
A reverse proxy is only as safe as the agreement between what it checks and what the node
behind it reads. Every spelling that one side reads as ".." (or as a separator) and the other
does not is a way past the proxy's checks: double encoding (``%252e``, which a back end that
decodes twice reads as "."), ``;`` path parameters (``/..;/``, which Tomcat-style servers strip
before resolving), overlong UTF-8 (``%c0%ae``, a "." for lenient decoders), Unicode
compatibility forms (``%ef%bc%8e``, the fullwidth dot, a "." after NFKC), and encoded controls
(``%0d%0a``, which end a line in logs and in careless back ends).

So there is exactly one reading of a path, :func:`canonical_path`, and a request whose path has
any other plausible reading is refused rather than guessed at:

1. Only visible ASCII may appear raw (RFC 9112 §3.2), never a backslash.
2. RFC 3986 §6.2.2.1: hex digits of percent-encodings are upper-cased; §6.2.2.2: encoded
   unreserved characters (``%41``, ``%2E``, ``%7E``) are decoded. Nothing else is decoded or
   re-encoded, so a node never sees a spelling the client did not send, only an equivalent one.
3. RFC 3986 §6.2.2.3 / §5.2.4: "." segments are removed and "//" is collapsed; a ".." segment
   is refused, not resolved (browsers resolve dot-segments before sending, so one on the wire
   is a probe).
4. Each segment that still holds a ``%`` or a ``;`` is decoded once (:func:`decode_segment`)
   and the result must be UTF-8 (Python's strict decoder refuses overlong forms and
   surrogates, RFC 3629 §3), and must hold no ``%`` (a second encoding layer), no ``/`` or
   ``\\`` (a separator in disguise) and no control character. Its name, the part before the
   first ``;`` (RFC 3986 §3.3 parameters), must not be "." or "..", neither as decoded nor
   after Unicode compatibility normalisation (NFKC, UAX #15), which must also not produce a
   separator or a ``%``.

The result is what the proxy forwards: the client's own bytes when they are already canonical
(the common case, returned as they are), otherwise the step 2-3 normalisation of them. The
allowlist, static mounts and the guard all read this same string.

Cost: the function runs for every request (it is compiled with mypyc). A path of plain ASCII
with no ``%``, ``;``, ``//`` or ``/.`` is accepted after one regular-expression match and four
substring searches; everything else takes the slow path below.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = ["BadPath", "canonical_path", "decode_segment"]

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
# Visible ASCII (RFC 9112 §3.2 targets have no spaces or controls) without "#", "?" and "\\"
# (a separator for some back ends: the classic traversal bypass). Browsers send characters
# such as "|" or "[" raw, so the set is wider than RFC 3986 pchar on purpose.
_PATH_CHARS: Final = re.compile(r'[!"$->@-\[\]-~]*')
_DOTS: Final = frozenset({".", ".."})
# C0 controls, DEL, C1 controls (U+0085 NEL ends a line too) and the Unicode line and paragraph
# separators: nothing a path needs, and each ends a line somewhere (a log, a header, a parser).
_CONTROLS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class BadPath(ValueError):
    """A path that no node may see; ``reason`` says why in words fit for a log and a 400 page.

    Reasons never quote the path itself (it is the attacker's text).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def canonical_path(path: str) -> str:
    """The canonical form of an origin-form path (no query string), or :class:`BadPath`.

    Idempotent: ``canonical_path(canonical_path(p)) == canonical_path(p)``, so a second proxy
    hop in front of or behind confedge changes nothing.
    """
    if not path.startswith("/"):
        raise BadPath("the path does not start with '/'")
    if _PATH_CHARS.fullmatch(path) is None:
        raise BadPath("invalid character in the path (space, control, '\\' or non-ASCII)")
    if "%" not in path and ";" not in path and "//" not in path and "/." not in path:
        return path  # the fast path: already canonical
    if "%" in path:
        path = _normalise_escapes(path)
    if "//" in path or "/." in path:
        path = _remove_dot_segments(path)
    if "%" in path or ";" in path:
        for seg in path.split("/"):
            if "%" in seg or ";" in seg:
                _check_segment(seg)
    return path


def decode_segment(segment: str) -> str:
    """One percent-decoding of one path segment, as UTF-8 (RFC 3986 §2.1, RFC 3629 §3).

    The single decoder of the proxy: the checks above and static mounts (which map segments
    to file names) read segments through it, so they cannot disagree about a byte.
    """
    if "%" not in segment:
        return segment
    pieces = segment.split("%")
    out = bytearray(pieces[0].encode("utf-8", "surrogatepass"))
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise BadPath("bad percent-encoding in the path")
        out.append(int(piece[:2], 16))
        out += piece[2:].encode("utf-8", "surrogatepass")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        # Overlong forms (%C0%AE for "."), lone continuation bytes, surrogates, Latin-1.
        raise BadPath("percent-encoded bytes in the path are not valid UTF-8") from None


def _normalise_escapes(path: str) -> str:
    """RFC 3986 §6.2.2.1 (upper-case hex) and §6.2.2.2 (decode unreserved characters)."""
    pieces = path.split("%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise BadPath("bad percent-encoding in the path")
        ch = chr(int(piece[:2], 16))
        if ch in _UNRESERVED:
            out.append(ch + piece[2:])
        else:
            out.append("%" + piece[:2].upper() + piece[2:])
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path: "." removed, ".." refused; "//" collapsed.

    Empty segments are collapsed too (nginx's merge_slashes): "//x" means "/x" to most back
    ends and an allowlist prefix must not be dodged by doubling a slash.
    """
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:]:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            raise BadPath("'..' segment in the path")
        out.append(seg)
    if not out:
        return "/"
    trailing = segments[-1] in ("", ".")
    return "/" + "/".join(out) + ("/" if trailing else "")


def _check_segment(seg: str) -> None:
    """Step 4 of the module docstring for one segment that holds a "%" or a ";"."""
    text = decode_segment(seg)
    if "%" in text:
        raise BadPath("double percent-encoding in the path (an encoded '%')")
    if "/" in text or "\\" in text:
        raise BadPath("encoded '/' or '\\' in the path")
    if _CONTROLS.search(text) is not None:
        raise BadPath("encoded control character in the path")
    if text.partition(";")[0] in _DOTS:
        raise BadPath("dot segment hidden behind a ';' parameter or an encoding")
    if not text.isascii():
        folded = unicodedata.normalize("NFKC", text)
        if "/" in folded or "\\" in folded or "%" in folded:
            raise BadPath("Unicode compatibility form of '/', '\\' or '%' in the path")
        if folded.partition(";")[0] in _DOTS:
            raise BadPath("Unicode compatibility form of a dot segment in the path")
