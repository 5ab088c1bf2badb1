#!/usr/bin/env python3
"""Python time per proxied request, without sockets: the proxy's own share of the CPU.

Drives one worker's WorkerRuntime with fake transports: a client request is fed to a
ClientConnection as the TLS transport would (BufferedProtocol), the node's answer to the
UpstreamConnection, and the coalesced writes are flushed, with the access log written to
/dev/null. What remains is exactly the Python (or, with the compiled build first on PYTHONPATH,
the mypyc-compiled) work per request: parsing callbacks, vetting, header rebuilding, balancing,
bookkeeping and the access-log line. No TLS, no syscalls per request.

`--distinct K` cycles through K requests that differ (a query string and an X-Request-Id each)
and K node answers (an ETag each), as real traffic does: a memo of whole requests or answers
finds nothing there, where the default (one request, repeated) finds everything.

Usage:
    .venv/bin/python bench/proxy/hotpath.py [--requests N] [--path /webapp/home] [--distinct K]
    PYTHONPATH=build/native .venv/bin/python bench/proxy/hotpath.py     # after `make native`
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from typing import Any

import uvloop

from confedge.config import parse_config
from confedge.proxy import build_kind
from confedge.proxy.accesslog import AccessLog, RequestCounter

try:
    from confedge.proxy.core import WorkerRuntime
except ImportError:  # the tree before the sans-I/O exchange (3278fe5^), for A/B runs
    from confedge.proxy.core import ProxyCore as WorkerRuntime  # type: ignore[attr-defined,no-redef]
from confedge.proxy.server import ClientConnection
from confedge.proxy.upstream import UpstreamConnection

REQUEST = (
    b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:32021\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    b"Accept: */*\r\nAccept-Language: en\r\nReferer: https://127.0.0.1:32021/webapp/\r\n\r\n"
)


class NullTransport:
    """Accepts writes and drops them; what the proxy asks of a transport, nothing more."""

    def __init__(self) -> None:
        self.closing = False
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def answer(body: bytes, etag: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 15:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\n%sContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
        % (etag, len(body), body)
    )


def exchanges(path: bytes, body: bytes, distinct: int) -> list[tuple[bytes, bytes]]:
    """(request, node answer) pairs: one, or `distinct` that differ from one another."""
    if distinct <= 1:
        return [(REQUEST % path, answer(body))]
    return [
        (
            REQUEST.replace(b"\r\n\r\n", b"\r\nX-Request-Id: %d-%d\r\n\r\n" % (i, i * 7919))
            % (path + b"?n=%d" % i),
            answer(body, b'ETag: "%d"\r\n' % i),
        )
        for i in range(distinct)
    ]


async def run(
    requests: int, path: bytes, body: bytes, distinct: int = 1, counted: bool = False
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(
            {
                "server": {"state_dir": tmp},
                "turn": {"enabled": False},
                "guard": {"enabled": False},
                "proxy": {"nodes": [f"http://127.0.0.1:{p}" for p in (9, 10, 11)]},
            }
        )
        log = AccessLog("/dev/null")
        # --counted: the sink as the service passes it (proxy/service.py), the log behind the
        # status page's counter of answers by class.
        sink: Any = RequestCounter(log) if counted else log
        core = WorkerRuntime(cfg, asyncio.get_running_loop(), access_log=sink)
        ups = []
        for pool in core.pools:
            up = UpstreamConnection(pool)
            up.connection_made(NullTransport())  # type: ignore[arg-type]
            pool.idle.append(up)
            ups.append(up)
        client = ClientConnection(core)
        client.connection_made(NullTransport())  # type: ignore[arg-type]
        pairs = exchanges(path, body, distinct)
        view = core.read_view
        # Where the client's node connection hangs: the connection itself, or its exchange
        # before the sans-I/O exchange. Decided once, outside the timed loop.
        old_tree = not hasattr(client, "up")

        def one(i: int) -> None:
            raw, resp = pairs[i % len(pairs)]
            n = len(raw)
            view[:n] = raw
            client.buffer_updated(n)
            core.flush_writes()
            up = client.exchange.up if old_tree else client.up  # type: ignore[attr-defined]
            assert up is not None
            up.data_received(resp)
            core.flush_writes()

        for i in range(2000):  # warm the memos, as a running worker has
            one(i)
        await asyncio.sleep(0)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(requests):
                one(i)
                if i % 256 == 0:
                    await asyncio.sleep(0)  # run the queued flush callbacks (each finds nothing)
            best = min(best, (time.perf_counter() - t0) / requests)
        log.close()
        return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--path", default="/webapp/home")
    ap.add_argument("--body", type=int, default=1024, help="response body bytes")
    ap.add_argument(
        "--distinct",
        type=int,
        default=1,
        help="cycle through this many different requests and answers (default 1: one, repeated)",
    )
    ap.add_argument(
        "--counted",
        action="store_true",
        help="log through the status page's RequestCounter, as the service does",
    )
    args = ap.parse_args(argv)
    us = uvloop.run(
        run(args.requests, args.path.encode(), b"x" * args.body, args.distinct, args.counted)
    )
    shape = f", {args.distinct} distinct" if args.distinct > 1 else ""
    print(
        f"{build_kind()}: {us:.2f} us of proxy work per request "
        f"(best of 5 x {args.requests}{shape})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
