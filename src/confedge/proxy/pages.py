"""Canned responses the proxy writes itself: status lines, refusals, the self-retrying error page.

Built once at import as bytes, because refusals are what an attacker makes the proxy produce in
bulk; the only per-response work is the cached Date header.
"""

from __future__ import annotations

import html
import http
import time
from email.utils import formatdate
from typing import Final

__all__ = ["STATUS_LINES", "DateCache", "error_response", "retry_page_response", "status_line"]

# The status lines of the codes Python knows (what status_line returns for them; a hot caller
# may look one up here first, a dictionary lookup instead of a call).
STATUS_LINES: Final[dict[int, bytes]] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus
}


def status_line(status: int) -> bytes:
    """The HTTP/1.1 status line; an unknown code gets an empty reason (RFC 9112 §4 allows it)."""
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d \r\n" % status
    return line


class DateCache:
    """The Date header (RFC 9110 §6.6.1), formatted at most once per second."""

    __slots__ = ("_second", "header")

    def __init__(self) -> None:
        self._second = -1
        self.header = b""
        self.refresh()

    def refresh(self) -> None:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self.header = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"


_REASONS = {
    400: "The request is malformed or not allowed here.",
    403: "Access denied.",
    404: "Not found.",
    405: "This method is not allowed.",
    408: "The request took too long to arrive.",
    413: "The request body is too large.",
    414: "The request target is too long.",
    429: "Too many failed attempts; try again later.",
    431: "The request headers are too large.",
    501: "This method or transfer coding is not supported.",
    502: "The conferencing service is not reachable right now.",
    503: "The conferencing service is temporarily unavailable.",
    504: "The conferencing service did not answer in time.",
}


def _html(status: int, text: str, retry: int = 0) -> bytes:
    phrase = http.HTTPStatus(status).phrase if status in STATUS_LINES else ""
    refresh = ""
    if retry:
        refresh = (
            f'<meta http-equiv="refresh" content="{retry}">'
            f"<script>setTimeout(function(){{location.reload()}},{retry * 1000})</script>"
        )
        text += f" This page retries by itself every {retry} seconds."
    return (
        f'<!doctype html><html><head><meta charset="utf-8">{refresh}'
        f"<title>{status} {phrase}</title></head><body><h1>{status} {phrase}</h1>"
        f"<p>{text}</p></body></html>\n"
    ).encode()


def error_response(
    status: int,
    date: bytes,
    *,
    extra: bytes = b"",
    close: bool = True,
    head_only: bool = False,
    detail: str = "",
) -> bytes:
    """A complete small HTML error response; `extra` is raw header lines (each ending CRLF).

    `detail` is the refusal's reason (request.Refused), so that whoever sent a request that
    was refused learns which rule it broke; reasons are fixed texts, escaped all the same.
    """
    text = _REASONS.get(status, "")
    if detail:
        text += f" Refused: {html.escape(detail, quote=False)}."  # element text: <>& only
    body = _html(status, text)
    return b"".join(
        (
            status_line(status),
            date,
            b"Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\n",
            extra,
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            b"" if head_only else body,
        )
    )


RETRY_SECONDS = 5


def health_response(
    serving: bool, date: bytes, *, close: bool, head_only: bool = False
) -> tuple[int, bytes, int]:
    """The health endpoint's answer (proxy.health_path, for a load balancer in front): 200
    "serving", or 503 "draining" from the moment a drain begins (confedge/drain.py), so the
    balancer moves new users away during the grace period. (status, response bytes, body
    length); the same for HTTP/1.1 and HTTP/2 clients."""
    body = b"serving\n" if serving else b"draining\n"
    status = 200 if serving else 503
    data = b"".join(
        (
            status_line(status),
            date,
            b"Content-Type: text/plain\r\nCache-Control: no-store\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            b"" if head_only else body,
        )
    )
    return status, data, len(body)


def retry_page_response(status: int, date: bytes, *, close: bool, head_only: bool = False) -> bytes:
    """SPEC §2: when every node fails, a 502/503 page that retries by itself."""
    body = _html(status, _REASONS.get(status, ""), retry=RETRY_SECONDS)
    return b"".join(
        (
            status_line(status),
            date,
            b"Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\nRetry-After: %d\r\n" % RETRY_SECONDS,
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            b"" if head_only else body,
        )
    )
