"""Custom web-app content: files served by confedge itself under configured path prefixes.

Theory of operation
-------------------
An operator mounts a directory or a ``.zip`` (for example the branding package downloaded from the
management node) under a prefix such as ``/branding/`` (SPEC §2 "Custom web-app content"). The proxy
core asks :meth:`StaticSite.match` for each request path; when it answers True the core calls
:meth:`StaticSite.respond` and writes the returned :class:`StaticResponse` instead of forwarding.

``respond`` is pure decision logic over the file system: it never writes to a socket. It returns
the status, the complete header list (everything except ``Date``, ``Server`` and ``Connection``,
which belong to the connection) and a *body source*:

* ``body`` bytes (error pages, redirects, 304/416 and every HEAD answer: empty),
* a :class:`FileBody` (path, offset, length) that the core may ``sendfile`` or read in chunks,
* a :class:`ZipBody` (member of an open archive, offset, length), read in chunks.

:meth:`StaticResponse.iter_body` turns any of the three into bounded chunks, so a core that does
not want to special-case sendfile needs one loop. Chunks are bounded (256 KiB by default) so a
large file never sits in memory whole.

The path means what it means everywhere else in the proxy: ``respond`` serves only a path that
:func:`confedge.proxy.paths.canonical_path` leaves unchanged (the core hands it the canonical
target; anything else is answered 404), and decodes segments with the same
:func:`~confedge.proxy.paths.decode_segment` (one decode, UTF-8), so no spelling can name a
file here that the proxy's vetting and allowlist read as another path.

Why the path is re-checked although the core already normalised it: defence in depth. A static
mount reads the local file system, the one place where a traversal bug turns into a file
disclosure, so this module trusts nothing: each segment is percent-decoded on its own and refused
if it is empty, ``.``/``..``, hidden (starts with ``.``), or contains ``/``, ``\\`` or NUL; the
final path is resolved (symlinks followed) and must still lie inside the resolved root; zip member
names that are absolute or contain ``..`` are dropped from the index when the archive is opened.
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
import stat
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, Final

from confedge.config import StaticMount
from confedge.proxy.paths import BadPath, canonical_path, decode_segment
from confedge.proxy.request import canonical_length

__all__ = [
    "FileBody",
    "StaticResponse",
    "StaticSite",
    "ZipBody",
    "content_type_for",
]

CHUNK_SIZE: Final = 256 * 1024

# Types that must be right whatever /etc/mime.types says on the host: browsers refuse module
# scripts and wasm streaming compilation with the wrong type, and fonts need theirs for CORS.
_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
    ".pdf": "application/pdf",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".wav": "audio/wav",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
}
_DEFAULT_TYPE: Final = "application/octet-stream"


def content_type_for(name: str) -> str:
    """The Content-Type for a file name: the fixed table first, then the mimetypes module."""
    ext = os.path.splitext(name)[1].lower()
    known = _TYPES.get(ext)
    if known is not None:
        return known
    guessed, _ = mimetypes.guess_type(name, strict=False)
    if guessed is None:
        return _DEFAULT_TYPE
    if guessed.startswith("text/"):
        return guessed + "; charset=utf-8"
    return guessed


@dataclass(frozen=True, slots=True)
class FileBody:
    """Bytes ``offset`` .. ``offset+length`` of a regular file (suitable for ``sendfile``)."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ZipBody:
    """Bytes ``offset`` .. ``offset+length`` of the uncompressed content of a zip member."""

    archive: _ZipArchive
    name: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class StaticResponse:
    """What to answer. ``headers`` is complete except Date, Server and Connection.

    Exactly one body source is meaningful: ``source`` when it is not None, else ``body``.
    ``Content-Length`` in ``headers`` always equals the number of bytes the body source yields
    (for HEAD: the length a GET would have had, with an empty body).
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    source: FileBody | ZipBody | None = None

    @property
    def length(self) -> int:
        """Number of body bytes to send."""
        if self.source is not None:
            return self.source.length
        return len(self.body)

    def iter_body(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the body in chunks of at most ``chunk_size`` bytes.

        File reads are blocking but come from the page cache for a web app's few hundred
        kilobytes, which is what nginx does too without ``aio``; the caller drives the iterator
        with backpressure, so at most one chunk is in flight per connection.
        """
        src = self.source
        if src is None:
            if self.body:
                yield self.body
            return
        remaining = src.length
        if remaining <= 0:
            return
        stream: BinaryIO
        if isinstance(src, FileBody):
            stream = open(src.path, "rb")  # noqa: SIM115 - closed in finally, generator-scoped
        else:
            try:
                stream = src.archive.open_member(src.name)
            except KeyError:
                return  # the archive was replaced and the member is gone: a short body
        try:
            if src.offset:
                stream.seek(src.offset)
            while remaining > 0:
                chunk = stream.read(min(chunk_size, remaining))
                if not chunk:
                    # The file shrank after it was stat'ed: stop rather than send garbage; the
                    # core sees fewer bytes than Content-Length and must close the connection.
                    return
                remaining -= len(chunk)
                yield chunk
        finally:
            stream.close()


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the site knows about one file before choosing the status."""

    name: str  # for the content type
    size: int
    mtime: float  # seconds since the epoch, UTC
    etag: str
    body: FileBody | ZipBody  # covering the whole file; ranges narrow it


class _ZipArchive:
    """An opened zip with a safe name index; reopened when the file on disk changes.

    One ``ZipFile`` serves every request: members can be read concurrently (zipfile gives each
    open member its own position in the shared file). The archive is re-stat'ed at most once a
    second so an operator replacing the zip sees the new content without a restart.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._zip: zipfile.ZipFile | None = None
        self._files: dict[str, zipfile.ZipInfo] = {}
        self._dirs: set[str] = set()
        self._sig: tuple[int, int] = (-1, -1)
        self._checked = -1.0
        self.rejected: list[str] = []
        self._load()

    def _load(self) -> None:
        st = os.stat(self.path)
        sig = (st.st_mtime_ns, st.st_size)
        zf = zipfile.ZipFile(self.path)
        files: dict[str, zipfile.ZipInfo] = {}
        dirs: set[str] = {""}
        rejected: list[str] = []
        for info in zf.infolist():
            name = info.filename
            parts = name.rstrip("/").split("/")
            # Zip slip: absolute names, drive letters, backslashes, "." and ".." never map to a
            # URL. Such members are dropped (and listed for the operator), not served.
            if (
                not name
                or name.startswith("/")
                or "\\" in name
                or "\0" in name
                or (len(name) > 1 and name[1] == ":")
                or any(p in ("", ".", "..") for p in parts)
            ):
                rejected.append(name)
                continue
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            if name.endswith("/"):
                dirs.add("/".join(parts))
            else:
                files["/".join(parts)] = info
        old = self._zip
        self._zip, self._files, self._dirs, self._sig = zf, files, dirs, sig
        self.rejected = rejected
        if old is not None:
            old.close()

    def refresh(self, now: float) -> None:
        """Reopen the archive if it changed on disk (checked at most once a second)."""
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            return  # keep serving what was loaded; the operator may be mid-replace
        if (st.st_mtime_ns, st.st_size) != self._sig:
            try:
                with self._lock:
                    self._load()
            except (OSError, zipfile.BadZipFile):
                return

    def lookup(self, rel: str) -> zipfile.ZipInfo | None:
        return self._files.get(rel)

    def is_dir(self, rel: str) -> bool:
        return rel in self._dirs

    def open_member(self, name: str) -> BinaryIO:
        assert self._zip is not None
        with self._lock:
            return self._zip.open(name)  # type: ignore[return-value]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


@dataclass(slots=True)
class _Mount:
    prefix: str
    cache_control: str
    root: str  # resolved directory, or "" for a zip
    archive: _ZipArchive | None


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _parse_http_date(value: str) -> float | None:
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # (Overflow: a 20-digit year)
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _etag_matches(header: str, etag: str, *, weak: bool) -> bool:
    """RFC 9110 §13.1.2 If-None-Match uses weak comparison; §13.1.5 If-Range needs strong."""
    value = header.strip()
    if value == "*":
        return True
    ours = etag[2:] if etag.startswith("W/") else etag
    for raw in value.split(","):
        tag = raw.strip()
        if tag.startswith("W/"):
            if not weak:
                continue
            tag = tag[2:]
        if tag == ours:
            return True
    return False


_DIGITS: Final = frozenset("0123456789")
_HUGE: Final = 10**18  # past any file: what a longer position means here


def _position(digits: str) -> int:
    """A byte position of any length (RFC 9110 §14.1.2: no overflow): int() refuses strings of
    more than 4300 digits (a ValueError), and anything past 18 significant digits is past the
    end of every file anyway. The digits are ASCII (checked by the caller); the same rule as a
    Content-Length's (request.canonical_length)."""
    value = canonical_length(digits.encode("ascii"))
    return _HUGE if value is None else int(value)


def _parse_range(value: str, size: int) -> tuple[int, int] | bool | None:
    """RFC 9110 §14.1.2 byte-range-spec for one range.

    Returns (first, last) inclusive for a satisfiable single range, False when the range is
    syntactically valid but unsatisfiable (416), None when the header must be ignored (bad
    syntax, another unit, or several ranges: we answer those with the whole representation,
    which §14.2 allows).
    """
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip()
    if "," in spec:
        return None
    first_s, dash, last_s = spec.partition("-")
    if not dash:
        return None
    first_s, last_s = first_s.strip(), last_s.strip()
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    if (first_s and not _DIGITS.issuperset(first_s)) or (last_s and not _DIGITS.issuperset(last_s)):
        return None
    if not first_s:
        if not last_s:
            return None
        suffix = _position(last_s)  # suffix-range: the last N bytes
        if suffix == 0 or size == 0:
            return False
        return max(0, size - suffix), size - 1
    first = _position(first_s)
    last = _position(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        return False
    return first, min(last, size - 1)


_NOT_FOUND = b"404 Not Found\n"
_METHOD_NOT_ALLOWED = b"405 Method Not Allowed\n"


class StaticSite:
    """The static mounts of one proxy, longest prefix first.

    Construction opens zip archives and resolves directories, so configuration mistakes (a
    missing directory, a corrupt zip) surface at start-up as :class:`ValueError` naming the key,
    not as 404s later.
    """

    def __init__(self, mounts: Sequence[StaticMount]) -> None:
        self._mounts: list[_Mount] = []
        for i, m in enumerate(mounts):
            key = f"proxy.static[{i}].path"
            path = os.path.abspath(m.path)
            if os.path.isdir(path):
                self._mounts.append(_Mount(m.prefix, m.cache_control, os.path.realpath(path), None))
            elif os.path.isfile(path) and zipfile.is_zipfile(path):
                self._mounts.append(_Mount(m.prefix, m.cache_control, "", _ZipArchive(path)))
            elif os.path.isfile(path):
                raise ValueError(f'{key}: "{m.path}" is a file but not a zip archive')
            else:
                raise ValueError(f'{key}: "{m.path}" is neither a directory nor a .zip file')
        self._mounts.sort(key=lambda mt: len(mt.prefix), reverse=True)
        self._bare = {mt.prefix[:-1]: mt for mt in self._mounts}

    @property
    def rejected_members(self) -> dict[str, list[str]]:
        """Zip members dropped as unsafe, per mount prefix (for a start-up warning)."""
        return {
            m.prefix: m.archive.rejected for m in self._mounts if m.archive and m.archive.rejected
        }

    def close(self) -> None:
        for m in self._mounts:
            if m.archive is not None:
                m.archive.close()

    def match(self, path: str) -> bool:
        """True when ``path`` (no query string) belongs to a static mount, not to the nodes."""
        if path in self._bare:
            return True
        return any(path.startswith(m.prefix) for m in self._mounts)

    def respond(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        now: float | None = None,
    ) -> StaticResponse:
        """Answer a request for ``path`` (percent-encoded as received, query optional).

        ``headers`` maps lower-case header names to values. ``now`` (seconds since the epoch)
        is only used to throttle re-checks of zip archives; it defaults to the wall clock.
        """
        raw_path, _, query = path.partition("?")
        try:
            canonical = canonical_path(raw_path)
        except BadPath:
            canonical = ""
        if canonical != raw_path:
            # Requests from the core arrive canonical; anything else is a caller's mistake or
            # a probe, and is not guessed at (one reading of a path, paths.py).
            return self._plain(404, _NOT_FOUND)
        bare = self._bare.get(raw_path)
        if bare is not None:
            # "/branding" -> "/branding/": relative links in index.html need the slash.
            return self._redirect(raw_path + "/", query)
        mount = next((m for m in self._mounts if raw_path.startswith(m.prefix)), None)
        if mount is None:
            return self._plain(404, _NOT_FOUND)
        if method not in ("GET", "HEAD"):
            resp = self._plain(405, _METHOD_NOT_ALLOWED)
            resp.headers.append(("Allow", "GET, HEAD"))
            return resp
        rest = raw_path[len(mount.prefix) :]
        segments = self._segments(rest)
        if segments is None:
            return self._plain(404, _NOT_FOUND)
        if mount.archive is not None:
            mount.archive.refresh(datetime.now(UTC).timestamp() if now is None else now)
            entry, is_dir = self._zip_entry(mount.archive, segments)
        else:
            entry, is_dir = self._file_entry(mount.root, segments)
        if is_dir:
            return self._redirect(raw_path + "/", query)
        if entry is None:
            return self._plain(404, _NOT_FOUND)
        return self._serve(method, entry, mount, headers)

    # -- path handling ---------------------------------------------------------------------

    @staticmethod
    def _segments(rest: str) -> list[str] | None:
        """Decoded path segments below the prefix; None when any is unsafe.

        A trailing slash (or an empty rest) asks for the directory's index.html.
        """
        if rest == "" or rest.endswith("/"):
            rest += "index.html"
        out: list[str] = []
        for raw in rest.split("/"):
            try:
                seg = decode_segment(raw)
            except BadPath:
                return None
            if (
                not seg
                or seg.startswith(".")  # ".", "..", and hidden files such as .git or .htpasswd
                or "/" in seg
                or "\\" in seg
                or "\0" in seg
            ):
                return None
            out.append(seg)
        return out

    @staticmethod
    def _file_entry(root: str, segments: list[str]) -> tuple[_Entry | None, bool]:
        candidate = os.path.join(root, *segments)
        try:
            real = os.path.realpath(candidate, strict=True)
        except (OSError, ValueError):
            return None, False
        # Symlinks are followed, but the target must stay inside the mount's root.
        if real != root and not real.startswith(root + os.sep):
            return None, False
        try:
            st = os.stat(real)
        except OSError:
            return None, False
        if stat.S_ISDIR(st.st_mode):
            return None, True
        if not stat.S_ISREG(st.st_mode) or not os.access(real, os.R_OK):
            return None, False
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        body = FileBody(real, 0, st.st_size)
        return _Entry(segments[-1], st.st_size, st.st_mtime, etag, body), False

    @staticmethod
    def _zip_entry(archive: _ZipArchive, segments: list[str]) -> tuple[_Entry | None, bool]:
        rel = "/".join(segments)
        info = archive.lookup(rel)
        if info is None:
            return None, archive.is_dir(rel)
        # Zip times are local wall-clock without a zone; UTC is as good a reading as any and
        # it is stable, which is what Last-Modified comparisons need.
        mtime = datetime(*info.date_time, tzinfo=UTC).timestamp()
        etag = f'"z{info.CRC:08x}-{info.file_size:x}"'
        body = ZipBody(archive, info.filename, 0, info.file_size)
        return _Entry(segments[-1], info.file_size, mtime, etag, body), False

    # -- responses -------------------------------------------------------------------------

    @staticmethod
    def _plain(status: int, body: bytes) -> StaticResponse:
        return StaticResponse(
            status,
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("X-Content-Type-Options", "nosniff"),
            ],
            body,
        )

    @staticmethod
    def _redirect(location: str, query: str) -> StaticResponse:
        if query:
            location += "?" + query
        body = b"301 Moved Permanently\n"
        return StaticResponse(
            301,
            [
                ("Location", location),
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
            ],
            body,
        )

    @staticmethod
    def _serve(
        method: str, entry: _Entry, mount: _Mount, headers: Mapping[str, str]
    ) -> StaticResponse:
        last_modified = _http_date(entry.mtime)
        validators = [
            ("ETag", entry.etag),
            ("Last-Modified", last_modified),
            ("Cache-Control", mount.cache_control),
        ]
        # RFC 9110 §13.2.2: If-None-Match takes precedence; If-Modified-Since only without it.
        inm = headers.get("if-none-match")
        if inm is not None:
            if _etag_matches(inm, entry.etag, weak=True):
                return StaticResponse(304, validators)
        else:
            ims = headers.get("if-modified-since")
            if ims is not None:
                since = _parse_http_date(ims)
                # HTTP dates have whole seconds; compare at that resolution.
                if since is not None and int(entry.mtime) <= since:
                    return StaticResponse(304, validators)

        size = entry.size
        status = 200
        first, last = 0, size - 1
        rng = headers.get("range")
        if rng is not None and _if_range_ok(headers.get("if-range"), entry, last_modified):
            parsed = _parse_range(rng, size)
            if parsed is False:
                # RFC 9110 §15.5.17: 416 carries the current length.
                body = b"416 Range Not Satisfiable\n"
                return StaticResponse(
                    416,
                    [
                        ("Content-Range", f"bytes */{size}"),
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body))),
                        *validators,
                    ],
                    body,
                )
            if isinstance(parsed, tuple):
                status = 206
                first, last = parsed
        length = last - first + 1 if size else 0
        out = [
            ("Content-Type", content_type_for(entry.name)),
            ("Content-Length", str(length)),
            *validators,
            ("Accept-Ranges", "bytes"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if status == 206:
            # RFC 9110 §14.4: Content-Range on a single-part 206.
            out.append(("Content-Range", f"bytes {first}-{last}/{size}"))
        if method == "HEAD" or length == 0:
            return StaticResponse(status, out)
        src = entry.body
        if isinstance(src, FileBody):
            return StaticResponse(status, out, source=FileBody(src.path, first, length))
        return StaticResponse(status, out, source=ZipBody(src.archive, src.name, first, length))


def _if_range_ok(if_range: str | None, entry: _Entry, last_modified: str) -> bool:
    """RFC 9110 §13.1.5: honour Range only if If-Range (when present) still matches."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return _etag_matches(value, entry.etag, weak=False)
    return value == last_modified
