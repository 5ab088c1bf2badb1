"""Exceptions of the proxy's own code that input reached, reported where an operator sees them.

Why a module of its own: both HTTP/1.1 adapters (the client side, server.py, and the node side,
upstream.py) get such exceptions back from httptools as "User callback error", which reads like
the peer's fault; each reports the real one here, and neither imports the other.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Final

__all__ = ["report_defect"]

log = logging.getLogger("confedge.proxy")

_DEFECT_LOG_EVERY: Final = 60.0  # seconds between two tracebacks of report_defect
# defects seen since the last traceback, and when that one was logged (loop-independent clock)
_defects: list[float] = [0.0, -math.inf]


def report_defect(exc: BaseException, where: str) -> None:
    """An exception in the proxy's own code that input reached: logged at ERROR with its
    traceback, at most once a minute (a client that found one could otherwise fill the log
    with it), with how many more there were in between."""
    _defects[0] += 1
    now = time.monotonic()
    if now - _defects[1] < _DEFECT_LOG_EVERY:
        return
    more = int(_defects[0]) - 1
    _defects[0], _defects[1] = 0.0, now
    also = f" ({more} more since the last one logged)" if more else ""
    log.error("internal error %s%s", where, also, exc_info=(type(exc), exc, exc.__traceback__))
