"""The access log, byte for byte in the reference's nginx format (SPEC §2 "Access log").

Why exact: operators run fail2ban, log shippers and grep recipes written against the reference's
nginx ``log_format``::

    $remote_addr - $remote_user [$time_local]  "$request" $status $body_bytes_sent
    "$http_referer" "$http_user_agent" "$upstream_addr" "$upstream_status" "$upstream_response_time"

(one line; note the two spaces after ``]``). The reference's fail2ban filter anchors on exactly
that shape (see docs/ACCESSLOG.md), so the line must match nginx's output including its escaping
(``ngx_http_log_escape``: ``"``, ``\\``, control bytes and bytes >= 0x7F become ``\\xHH`` with
upper-case hex) and its ``-`` for empty values.

Secrets: like the reference's ``map $request $request_filtered`` chain, the values of the query
parameters ``code``, ``state``, ``token``, ``pin`` and ``data`` become ``[FILTERED]`` in the request
line and in the Referer. The reference's regexes replace only the last occurrence of each name and
also hit any parameter whose name ends in one (``access_token``); here every occurrence of every
parameter whose name ends in one of the five (case-insensitive) is filtered, so nothing the
reference hides is ever shown.

``$remote_user`` is what nginx puts there: the user name of an ``Authorization: Basic`` header
when the client sends one (:func:`remote_user`, nginx's ``ngx_http_auth_basic_user``: the
scheme case-insensitive, the base64 decoded as nginx's lenient decoder does, the name is
everything before the first ``:`` and must not be empty), ``-`` otherwise; the password is
never logged. confedge authenticates nobody: the name is what the client claims, escaped like
every other field, so it can neither break the line nor carry bytes beyond ``\\xHH``.

Empty versus absent, as nginx: an absent User-Agent is ``-``, a User-Agent header with an
empty value is ``""`` (nginx logs a found empty variable as nothing); the Referer goes through
the reference's filter maps, whose result is always a found value, so it is ``""`` when absent
or empty.

Strings are treated like nginx treats bytes: pass header values decoded as latin-1 (what HTTP
parsers produce) or as bytes, and each byte >= 0x7F is escaped as that byte. Characters beyond
U+00FF (only possible in text that did not come off the wire as latin-1) are escaped as their
UTF-8 bytes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Final

__all__ = [
    "AccessLog",
    "RequestCounter",
    "TimeLocal",
    "escape",
    "filter_secrets",
    "format_line",
    "remote_user",
    "request_line",
]

_SECRET_NAMES: Final = ("code", "state", "token", "pin", "data")

# A parameter starts after "?", "&" or ";"; its name ends in one of the secret names; its value
# runs to the next "&", whitespace or end (the same value grammar as the reference's
# "[^&\ \t\n]*"). Matching the whole name keeps "postcode" and "access_token" filtered too.
_SECRET_RE: Final = re.compile(
    r"(?<=[?&;])([^=&\s?]*(?:code|state|token|pin|data))=[^&\s]*", re.IGNORECASE
)


def filter_secrets(text: str) -> str:
    """Replace the values of secret query parameters with ``[FILTERED]``.

    Why the tests before the substitution: the pattern's look-behind is tried at every
    position, about 2.5 µs for an ordinary API target with a query string, on every logged
    request; a target that names none of the secrets (the usual case) is answered by a few
    substring tests instead (0.3 µs). They only skip what cannot match: for ASCII text,
    lower() is exactly the pattern's IGNORECASE; other text (Unicode case folding has more
    pairs, e.g. U+017F for "s") always takes the pattern.
    """
    if "=" not in text:
        return text
    if text.isascii():
        low = text.lower()
        if (
            "code" not in low
            and "state" not in low
            and "token" not in low
            and "pin" not in low
            and "data" not in low
        ):
            return text
    return _SECRET_RE.sub(r"\1=[FILTERED]", text)


_ESCAPES: Final[dict[int, str]] = {
    c: f"\\x{c:02X}" for c in (*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100))
}
_WIDE_RE: Final = re.compile(r"[^\x00-\xff]+")
# Fast path test: nothing to escape when the value is printable ASCII without '"' and '\'.
_NEEDS_ESCAPE_RE: Final = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def _wide(m: re.Match[str]) -> str:
    return "".join(f"\\x{b:02X}" for b in m.group().encode("utf-8"))


def escape(value: str | bytes | None) -> str:
    """nginx's log escaping (escape=default), with ``-`` for an empty value."""
    if not value:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    # Printable ASCII without '"' and '\\' needs nothing: four C-level tests, cheaper than
    # the regular expression's search (which stays the definition, for everything else).
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value
    if _NEEDS_ESCAPE_RE.search(value) is None:
        return value
    out = value.translate(_ESCAPES)
    if not out.isascii():
        out = _WIDE_RE.sub(_wide, out)
    return out


def _b64_lenient(data: bytes) -> bytes | None:
    """nginx's ngx_decode_base64: characters up to the first "=", all from the base64
    alphabet, a length that is not 1 modulo 4; missing padding is fine. None when invalid."""
    end = data.find(b"=")
    if end >= 0:
        data = data[:end]
    if len(data) % 4 == 1 or _B64_ALPHABET.fullmatch(data) is None:
        return None
    return base64.b64decode(data + b"=" * (-len(data) % 4))


_B64_ALPHABET: Final = re.compile(rb"[A-Za-z0-9+/]*")


def remote_user(authorization: bytes | None) -> str | None:
    """``$remote_user``: the user name of an ``Authorization: Basic`` value (RFC 7617 §2),
    exactly when nginx logs one, else None (logged as ``-``). Never the password."""
    if authorization is None or len(authorization) < 6:
        return None
    if authorization[:6].lower() != b"basic ":
        return None
    decoded = _b64_lenient(authorization[6:].lstrip(b" "))
    if not decoded:
        return None
    user, colon, _ = decoded.partition(b":")
    if not colon or not user:
        return None
    return user.decode("latin-1")


def _ua(user_agent: str | bytes | None) -> str:
    """``$http_user_agent``: ``-`` when the header is absent, nothing when it is empty."""
    if user_agent is None:
        return "-"
    return escape(user_agent) if user_agent else ""


_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)


class TimeLocal:
    """``$time_local`` (``25/Nov/2026:12:00:00 +0000``), formatted once per second.

    Month names are fixed English, never the process locale, as in nginx. ``utc=True`` (tests,
    containers) ignores the host's zone.
    """

    __slots__ = ("_sec", "_text", "_utc")

    def __init__(self, *, utc: bool = False) -> None:
        self._utc = utc
        self._sec = -1
        self._text = ""

    def __call__(self, now: float) -> str:
        return self.text(now)

    def text(self, now: float) -> str:
        """The same as calling it (a plain method: a direct call in the compiled build)."""
        sec = int(now)
        if sec != self._sec:
            tm = time.gmtime(sec) if self._utc else time.localtime(sec)
            off = 0 if self._utc else tm.tm_gmtoff
            sign = "-" if off < 0 else "+"
            off = abs(off) // 60
            self._text = (
                f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:"
                f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} "
                f"{sign}{off // 60:02d}{off % 60:02d}"
            )
            self._sec = sec
        return self._text


_default_time = TimeLocal()

# A second no wall clock reaches (int(time.time()) is never this): AccessLog's "no $time_local
# kept" (a plain int, which the compiled build compares natively).
_NO_SECOND: Final = -(2**62)

# "$status " for the statuses an HTTP server answers, made once (AccessLog.log).
_STATUS_FIELD: Final[list[str]] = [f"{i} " for i in range(600)]

# Distinct request shapes whose escaped text AccessLog keeps (see AccessLog.log).
_PARTS_CACHE_SIZE: Final = 4096


def request_line(method: str, target: str, http_version: str = "1.1") -> str:
    """``$request`` as nginx logs it: ``GET /path?q HTTP/1.1``."""
    return f"{method} {target} HTTP/{http_version}"


def format_line(
    remote_addr: str,
    now: float,
    request: str,
    status: int,
    body_bytes_sent: int,
    referer: str | bytes | None = None,
    user_agent: str | bytes | None = None,
    upstream_addr: str | None = None,
    upstream_status: str | None = None,
    upstream_response_time: str | None = None,
    remote_user: str | None = None,
    *,
    time_local: Callable[[float], str] = _default_time,
) -> str:
    """One access-log line (without the newline) in the reference format.

    ``request`` is the request line (see :func:`request_line`; pass the raw line for requests
    that failed to parse). Upstream fields follow nginx when several nodes were tried: addresses,
    statuses and times joined with ``", "`` in try order, times as seconds with three decimals
    (``"0.012, 0.004"``); ``None`` when no node was involved (static files, refusals) logs ``-``.

    A missing or empty Referer logs as ``""``, not ``"-"``: in the reference the Referer goes
    through the ``[FILTERED]`` maps, and a map's result is an empty *found* value, which nginx
    logs as nothing. A User-Agent header sent empty logs as ``""`` too, an absent one as ``-``
    (nginx's not-found value). ``remote_user``: see :func:`remote_user`. Every other empty
    field is ``-``.
    """
    if isinstance(referer, bytes):
        referer = referer.decode("latin-1")
    return (
        f"{escape(remote_addr)} - {escape(remote_user)} [{time_local(now)}]  "
        f'"{escape(filter_secrets(request))}" {status} {body_bytes_sent} '
        f'"{escape(filter_secrets(referer)) if referer else ""}" '
        f'"{_ua(user_agent)}" "{escape(upstream_addr)}" "{escape(upstream_status)}" '
        f'"{escape(upstream_response_time)}"'
    )


class AccessLog:
    """Buffered, append-only access-log writer.

    Lines are collected in memory and written with one ``write(2)`` per flush: after
    ``flush_interval`` seconds (a timer on the running loop, armed only while lines wait) or
    when ``buffer_bytes`` accumulate. No fsync: an access log is not a journal, and the
    reference's nginx does not sync either. The file is opened ``O_APPEND`` so several worker
    processes can share it without tearing lines (each flush is one write of whole lines).

    Rotation: :meth:`reopen` (wire it to SIGUSR1 like nginx), and besides, every flush at most
    once a second compares the path's inode with the open file's and reopens after a
    logrotate ``create``-style rotation by itself.

    ``path`` ``""`` or ``"-"`` writes to standard error (SPEC config ``proxy.access_log``).
    """

    def __init__(
        self,
        path: str = "",
        *,
        flush_interval: float = 1.0,
        buffer_bytes: int = 64 * 1024,
        time_local: Callable[[float], str] | None = None,
    ) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.buffer_bytes = buffer_bytes
        self.time_local: Callable[[float], str] = time_local or TimeLocal()
        # $time_local of the second `_sec` (int(now)), when the clock is a TimeLocal, whose
        # text changes only from one second to the next; another clock is asked for every
        # line (its `_sec` stays _NO_SECOND).
        self._per_second = isinstance(self.time_local, TimeLocal)
        self._sec = _NO_SECOND
        self._stamp = ""
        self._buf: list[str] = []
        self._size = 0
        # The buffered size at which a line calls _written: buffer_bytes while the flush timer
        # is armed, 0 when not (the next line arms it): one test per line instead of two.
        self._limit = 0
        # The escaped request line by line, and the escaped Referer, User-Agent, node and
        # node status by their values: apart, because the second repeats where the first does
        # not (one browser's many distinct targets and query strings behind the same page).
        self._requests: dict[str, str] = {}
        self._tails: dict[
            tuple[str | bytes | None, str | bytes | None, str | None, str | None], str
        ] = {}
        self._addrs: dict[str, str] = {}
        # $upstream_response_time texts as logged (escaped, "-" for none): the same few
        # hundred millisecond texts (exchange.seconds_text) come back line after line.
        self._times: dict[str | None, str] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._fd = -1
        self._own_fd = False
        self._checked = 0.0
        self.write_errors = 0
        self._open()

    def _open(self) -> None:
        if self.path in ("", "-"):
            self._fd = sys.stderr.fileno()
            self._own_fd = False
            return
        try:
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
        except OSError as exc:
            raise ValueError(
                f'proxy.access_log: cannot open "{self.path}" for appending: {exc.strerror}'
            ) from None
        self._own_fd = True

    def reopen(self) -> None:
        """Flush, close and reopen the file (after rotation)."""
        self.flush()
        if self._own_fd:
            os.close(self._fd)
            self._open()

    def log(
        self,
        remote_addr: str,
        now: float,
        request: str,
        status: int,
        body_bytes_sent: int,
        referer: str | bytes | None = None,
        user_agent: str | bytes | None = None,
        upstream_addr: str | None = None,
        upstream_status: str | None = None,
        upstream_response_time: str | None = None,
        remote_user: str | None = None,
    ) -> None:
        """Format and buffer one request's line; the same text as :func:`format_line`.

        Why a cache: a proxy's traffic repeats itself (the same client polling the same API
        paths with the same User-Agent through the same node), and escaping and secret
        filtering of those fields is most of the cost of a line. So the escaped text around
        the per-request values (time, status, bytes, response time) is kept per request line
        and per distinct (Referer, User-Agent, node, node status), the escaped address per
        address and the response time's text per text; the memos are bounded and simply
        emptied when full, so a client sending endless distinct URLs only turns them into the
        uncached path.
        """
        addr: str
        if remote_user is not None:  # rare: not memoised (a client could vary it freely)
            addr = f"{escape(remote_addr)} - {escape(remote_user)} ["
        else:
            addr = self._addrs.get(remote_addr) or self._remember_addr(remote_addr)
        head = self._requests.get(request) or self._remember_request(request)
        key = (referer, user_agent, upstream_addr, upstream_status)
        tail = self._tails.get(key) or self._make_tail(key)
        t = self._times.get(upstream_response_time) or self._remember_time(upstream_response_time)
        stamp = self._stamp if int(now) == self._sec else self._stamp_at(now)
        st = _STATUS_FIELD[status] if 0 <= status < 600 else f"{status} "
        line = f'{addr}{stamp}{head}{st}{body_bytes_sent}{tail}{t}"'
        # (write_line, without the call: once per proxied request)
        self._buf.append(line)
        size = self._size + len(line) + 1
        self._size = size
        if size >= self._limit:
            self._written()

    def _stamp_at(self, now: float) -> str:
        """$time_local for `now`, kept for the rest of its second when the clock allows."""
        stamp = self.time_local(now)
        if self._per_second:
            self._sec = int(now)
            self._stamp = stamp
        return stamp

    def _remember_time(self, upstream_response_time: str | None) -> str:
        text = escape(upstream_response_time)
        if len(self._times) >= _PARTS_CACHE_SIZE:
            self._times.clear()
        self._times[upstream_response_time] = text
        return text

    def _remember_addr(self, remote_addr: str) -> str:
        text = f"{escape(remote_addr)} - - ["
        if len(self._addrs) >= _PARTS_CACHE_SIZE:
            self._addrs.clear()
        self._addrs[remote_addr] = text
        return text

    def _remember_request(self, request: str) -> str:
        text = f']  "{escape(filter_secrets(request))}" '
        if len(self._requests) >= _PARTS_CACHE_SIZE:
            self._requests.clear()
        self._requests[request] = text
        return text

    def _make_tail(
        self, key: tuple[str | bytes | None, str | bytes | None, str | None, str | None]
    ) -> str:
        referer, user_agent, upstream_addr, upstream_status = key
        if isinstance(referer, bytes):
            referer = referer.decode("latin-1")
        text = (
            f' "{escape(filter_secrets(referer)) if referer else ""}" '
            f'"{_ua(user_agent)}" "{escape(upstream_addr)}" "{escape(upstream_status)}" "'
        )
        if len(self._tails) >= _PARTS_CACHE_SIZE:
            self._tails.clear()
        self._tails[key] = text
        return text

    def write_line(self, line: str) -> None:
        """Buffer an already formatted line; flushes when the buffer is full."""
        self._buf.append(line)
        size = self._size + len(line) + 1
        self._size = size
        if size >= self._limit:
            self._written()

    def _written(self) -> None:
        """After a line was buffered: flush a full buffer, or arm the flush timer."""
        if self._size >= self.buffer_bytes:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no loop (a script, a test): write through
                return
            self._timer = loop.call_later(self.flush_interval, self.flush)
            self._limit = self.buffer_bytes

    def flush(self) -> None:
        """Write every buffered line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._limit = 0
        if not self._buf:
            return
        self._buf.append("")
        data = "\n".join(self._buf).encode("utf-8", "backslashreplace")
        self._buf.clear()
        self._size = 0
        if self._own_fd:
            self._check_rotated()
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            # A full disk must not take the proxy down; count it for the metrics instead.
            self.write_errors += 1

    def _check_rotated(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            on_disk = os.stat(self.path)
            mine = os.fstat(self._fd)
        except OSError:
            on_disk = None
            mine = None
        if (
            on_disk is None
            or mine is None
            or (on_disk.st_ino, on_disk.st_dev)
            != (
                mine.st_ino,
                mine.st_dev,
            )
        ):
            try:
                os.close(self._fd)
            finally:
                self._open()

    def close(self) -> None:
        """Flush and close (the file, never standard error)."""
        self.flush()
        if self._own_fd and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._own_fd = False


class RequestCounter:
    """A tee in front of an access-log sink that counts answers by status class.

    Why a tee: every answer the proxy gives (proxied, its own refusals and error pages, port-80
    redirects) already goes through the sink exactly once, so counting there needs no change to
    the request path. The status page reads it in process (workers = 1), and each worker
    process reports its own to the main process (proxy/service.py) when workers > 1.
    """

    def __init__(self, file: AccessLog | None) -> None:
        # The access-log file (None: access logging off), by its own class: the compiled build
        # then calls its `log` natively (a generic call with eleven arguments otherwise).
        self.file = file
        self.total = 0
        self.by_class = [0, 0, 0, 0, 0, 0]  # index = status // 100 (0 for out-of-range)

    def log(
        self,
        remote_addr: str,
        now: float,
        request: str,
        status: int,
        body_bytes_sent: int,
        referer: str | bytes | None = None,
        user_agent: str | bytes | None = None,
        upstream_addr: str | None = None,
        upstream_status: str | None = None,
        upstream_response_time: str | None = None,
        remote_user: str | None = None,
    ) -> None:
        self.total += 1
        self.by_class[status // 100 if 100 <= status < 600 else 0] += 1
        file = self.file
        if file is not None:
            file.log(
                remote_addr,
                now,
                request,
                status,
                body_bytes_sent,
                referer,
                user_agent,
                upstream_addr,
                upstream_status,
                upstream_response_time,
                remote_user,
            )

    def to_json(self) -> dict[str, int]:
        out = {"total": self.total}
        for i, n in enumerate(self.by_class):
            out[f"{i}xx" if i else "other"] = n
        return out

    @staticmethod
    def add(totals: dict[str, int], more: dict[str, int]) -> dict[str, int]:
        """Sum two to_json() results (the workers' counters into one)."""
        keys = [*totals, *(k for k in more if k not in totals)]  # in to_json()'s order
        return {k: totals.get(k, 0) + more.get(k, 0) for k in keys}
