"""How the proxy reads HTTP/1.1 heads: httptools alone, or a C fast path in front of it.

``proxy.http1_engine`` ("auto", "native", "python") chooses; the environment variable
CONFEDGE_H1_ENGINE overrides it (the test suites run once per engine with it), by the rule
every native backend follows (confedge/backends.py).

- "python": every request and response head goes through httptools (llhttp, in C, with a
  Python callback per line).
- "native": confedge.proxy._h1native (_h1native.c) reads the *ordinary* head first, a whole
  request without a body or a whole response with its Content-Length body in one read, in one C
  pass that makes the same values httptools would; anything else (a body, chunked coding, an
  upgrade, a head split over reads, pipelining, anything unusual at all) returns None and goes
  to httptools exactly as under "python". So the two engines differ in CPU only: the adapters
  (server.py, upstream.py) feed the exchange core the same events either way.

Why a second reader: httptools' callbacks are a third of the proxy's own CPU per request
(docs/BENCHMARKS.md, issue 16). Why not a library: Debian packages no C HTTP/1.1 parser the
build could link (llhttp, which httptools embeds, is not a C library there; http-parser is
archived upstream), and the fast path only has to recognise a strict subset of RFC 9112's
grammar, proven against llhttp by tests/unit/test_proxy_h1native.py.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from confedge import backends

__all__ = ["ENV", "choose", "describe", "native_available", "readers"]

ENV: Final = "CONFEDGE_H1_ENGINE"

_h1native: ModuleType | None
try:
    from confedge.proxy import _h1native as _built

    _h1native = _built
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built (no compiler at install time)
    _h1native = None
    _IMPORT_ERROR = f" ({exc})"

# (the signatures of _h1native.parse_request and parse_response, see _h1native.pyi)
RequestReader = Callable[[Any, int, int, int, int], tuple[Any, ...] | None]
ResponseReader = Callable[[bytes, int], tuple[int, list[tuple[bytes, bytes]], int, bool] | None]


def native_available() -> tuple[bool, str]:
    """(the C fast path is built, why not)."""
    if _h1native is None:
        return False, (
            f"the extension confedge.proxy._h1native is not built{_IMPORT_ERROR}; install "
            "confedge with a C compiler (`make native`, `pip install .`)"
        )
    return True, ""


def choose(setting: str) -> str:
    """The engine, "native" or "python", for ``proxy.http1_engine`` (or CONFEDGE_H1_ENGINE).

    Raises ValueError naming the key when "native" is asked for and not built."""
    return backends.choose(setting, env=ENV, key="proxy.http1_engine", available=native_available)


def describe(kind: str) -> str:
    """What reads HTTP/1.1 heads for engine `kind`, for the start-up log and `confedge check`."""
    if kind == "native":
        return "C fast path for ordinary heads, httptools for the rest"
    return "httptools"


def readers(kind: str) -> tuple[RequestReader | None, ResponseReader | None]:
    """(request reader, response reader) for engine `kind`; (None, None) for "python"."""
    if kind != "native" or _h1native is None:
        return None, None
    return _built.parse_request, _built.parse_response
