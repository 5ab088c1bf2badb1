"""Logging for the long-running processes (``confedge run``, its proxy workers, the TURN server
alone, the simulated node): the standard library's logging, made cheaper per line.

Why: a relay writes one line per allocation that ends (turn/core.py ``_end``), and a busy edge
ends thousands a minute. With ``logging.basicConfig`` such a line cost about 10 µs on the
development machine (50,000 lines to /dev/null), two thirds of an Allocate's: logging
walks the stack for the caller's file and line (``findCaller``), looks up the thread and
process names for every record, and formats the time with ``strftime`` each time. None of
that is in our formats. The Python documentation's "Optimization" section of the logging
HOWTO names the switches used here (``logging._srcfile``, ``logThreads``, ``logProcesses``,
``logMultiprocessing``); the time text is made once per second and reused (same output as
``logging.Formatter``: ``2026-12-06 04:00:00,123``).

The lines and their format are unchanged; records just carry no caller file/line, thread or
process fields unless the format asks for them (``%(process)d`` keeps process ids on).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

__all__ = ["SecondCachedFormatter", "setup_service_logging"]

# logging.Formatter's default_msec_format (typed Optional there)
_MSEC_FORMAT = "%s,%03d"
# The record fields that need findCaller's stack walk
_CALLER_FIELDS = ("filename", "lineno", "funcName", "pathname", "module")


class SecondCachedFormatter(logging.Formatter):
    """``logging.Formatter`` whose default ``%(asctime)s`` is built once per second.

    ``strftime`` of the local time is most of a formatted record's cost after the message
    itself; lines of the same second share its text, and only the milliseconds differ.
    """

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return _MSEC_FORMAT % (self._text, record.msecs)


def setup_service_logging(level: str | int, fmt: str, stream: TextIO | None = None) -> None:
    """Root logger at ``level`` writing ``fmt`` lines to ``stream`` (standard error by default),
    like ``logging.basicConfig`` (which does nothing when the root already has a handler), with
    the per-record work our formats do not use turned off."""
    root = logging.getLogger()
    if root.handlers:  # as basicConfig: configured already (a test's capture, an embedding)
        return
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(level)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(SecondCachedFormatter(fmt))
    root.addHandler(handler)
    # The logging HOWTO's "Optimization": no caller lookup (a stack walk per record), no thread
    # or multiprocessing names; process ids only when the format shows them.
    if not any(f"%({field})" in fmt for field in _CALLER_FIELDS):
        logging._srcfile = None
    if "%(thread" not in fmt:
        logging.logThreads = False
    if "%(process" not in fmt:
        logging.logProcesses = False
    logging.logMultiprocessing = False
