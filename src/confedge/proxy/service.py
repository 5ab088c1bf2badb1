"""ProxyService: listeners, worker processes and their lifecycle (what the lead wires in).

Process model (DESIGN "one process per core where it pays"): with `proxy.workers` > 1 each
worker is a separate process with its own uvloop, its own listening sockets bound with
SO_REUSEPORT (the kernel spreads new connections across them), its own node pools, health
checks and guard instance (built by `guard_factory`, sharing bans through the guard's store).
The parent holds the ports (bound, not listening) so a crashed worker can be restarted on the
same port; it never accepts connections itself. With workers = 1 everything runs in the
caller's event loop, which is what tests and the demo use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from confedge.config import Config
from confedge.proxy import build_kind
from confedge.proxy.core import GuardHook, ProxyCore, reuse_port_socket
from confedge.proxy.redirect import RedirectConnection
from confedge.proxy.server import ClientConnection
from confedge.tls.context import TLSContextHolder

__all__ = ["GuardFactory", "ProxyService", "ProxyWorker"]

log = logging.getLogger("confedge.proxy")

GuardFactory = Callable[[Config], GuardHook]


def _listen_hosts(cfg: Config) -> list[str]:
    hosts = [cfg.server.internal_address]
    ext = cfg.server.external_address
    if ext and ext != cfg.server.internal_address:
        hosts.append(ext)
    return hosts


def _url(scheme: str, host: str, port: int, default: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"{scheme}://{h}" + ("" if port == default else f":{port}") + "/"


class ProxyWorker:
    """Everything one process serves: TLS listeners, the redirect listener, one ProxyCore."""

    def __init__(
        self, cfg: Config, *, guard_factory: GuardFactory | None = None, workers: int = 1
    ) -> None:
        self.cfg = cfg
        self.guard_factory = guard_factory
        self.workers = workers
        self.core: ProxyCore | None = None
        self.tls: TLSContextHolder | None = None
        self.guard: Any = None
        self.access: Any = None
        self.static: Any = None
        self._servers: list[asyncio.AbstractServer] = []

    async def start(
        self, https_socks: list[socket.socket], http_socks: list[socket.socket]
    ) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.tls = TLSContextHolder(cfg)
        if self.guard_factory is not None:
            self.guard = self.guard_factory(cfg)
            start = getattr(self.guard, "start", None)
            if start is not None:
                await start()
        self.access = _make_access_log(cfg)
        self.static = _make_static(cfg)
        core = ProxyCore(
            cfg,
            loop,
            guard=self.guard,
            access_log=self.access,
            static=self.static,
            workers=self.workers,
        )
        self.core = core
        core.start()
        ctx = self.tls.context
        for s in https_socks:
            self._servers.append(
                await loop.create_server(
                    lambda: ClientConnection(core),
                    sock=s,
                    ssl=ctx,
                    ssl_handshake_timeout=cfg.proxy.header_timeout,
                    backlog=1024,
                )
            )
        https_port = https_socks[0].getsockname()[1] if https_socks else cfg.proxy.https_port
        for s in http_socks:
            self._servers.append(
                await loop.create_server(
                    lambda: RedirectConnection(core, https_port), sock=s, backlog=1024
                )
            )

    def reload_tls(self) -> None:
        if self.tls is not None:
            self.tls.reload()

    async def close(self, grace: float = 2.0) -> None:
        for srv in self._servers:
            srv.close()
        core = self.core
        if core is not None and grace > 0:
            # Let short exchanges finish; long streams (SSE, WebSocket) are cut after the grace.
            loop = asyncio.get_running_loop()
            end = loop.time() + grace
            while any(c.exchange is not None for c in core.clients) and loop.time() < end:
                await asyncio.sleep(0.05)
        if core is not None:
            await core.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        self._servers.clear()
        if self.guard is not None:
            close = getattr(self.guard, "close", None)
            if close is not None:
                await close()
        if self.access is not None:
            self.access.close()
        if self.static is not None:
            self.static.close()


def _make_access_log(cfg: Config) -> Any:
    try:
        from confedge.proxy.accesslog import AccessLog
    except ImportError:  # pragma: no cover - the module ships with confedge
        return None
    return AccessLog(cfg.proxy.access_log)


def _make_static(cfg: Config) -> Any:
    if not cfg.proxy.static:
        return None
    from confedge.proxy.static import StaticSite

    site = StaticSite(cfg.proxy.static)
    for prefix, names in site.rejected_members.items():
        log.warning("proxy.static %s: unsafe zip members ignored: %s", prefix, ", ".join(names))
    return site


def _bind_all(
    hosts: list[str], port: int, *, reuse_port: bool, listen: bool = True
) -> list[socket.socket]:
    """Bind `port` on every host; port 0 picks one on the first host and reuses it for the rest."""
    socks: list[socket.socket] = []
    try:
        for h in hosts:
            if listen:
                s = reuse_port_socket(h, port, reuse_port=reuse_port)
            else:
                family = socket.AF_INET6 if ":" in h else socket.AF_INET
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((h, port))
            socks.append(s)
            port = s.getsockname()[1]
    except OSError as exc:
        for s in socks:
            s.close()
        raise OSError(exc.errno, f"cannot listen on port {port}: {exc.strerror}") from None
    return socks


class ProxyService:
    """The HTTPS reverse proxy as one start/close unit."""

    def __init__(self, cfg: Config, *, guard_factory: GuardFactory | None = None) -> None:
        self.cfg = cfg
        self.guard_factory = guard_factory
        self.workers = cfg.proxy.workers or os.cpu_count() or 1
        self.https_port = 0
        self.http_port = 0
        self._worker: ProxyWorker | None = None
        self._held: list[socket.socket] = []
        self._procs: list[Any] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def core(self) -> ProxyCore | None:
        """The in-process core (workers = 1), for tests and the status page."""
        return self._worker.core if self._worker is not None else None

    async def start(self) -> None:
        cfg = self.cfg
        hosts = _listen_hosts(cfg)
        log.info("proxy: %d worker(s), hot path %s", self.workers, build_kind())
        # Check/generate the certificate once, in the parent, before any worker races for it.
        TLSContextHolder(cfg)
        if self.workers == 1:
            https = _bind_all(hosts, cfg.proxy.https_port, reuse_port=False)
            http = (
                _bind_all(hosts, cfg.proxy.http_port, reuse_port=False)
                if cfg.proxy.http_port
                else []
            )
            self.https_port = https[0].getsockname()[1]
            self.http_port = http[0].getsockname()[1] if http else 0
            self._worker = ProxyWorker(cfg, guard_factory=self.guard_factory)
            try:
                await self._worker.start(https, http)
            except BaseException:
                for s in https + http:
                    s.close()
                raise
            return
        held = _bind_all(hosts, cfg.proxy.https_port, reuse_port=True, listen=False)
        self._held = held
        self.https_port = held[0].getsockname()[1]
        if cfg.proxy.http_port:
            held_http = _bind_all(hosts, cfg.proxy.http_port, reuse_port=True, listen=False)
            self._held += held_http
            self.http_port = held_http[0].getsockname()[1]
        try:
            await asyncio.gather(*(self._spawn(i) for i in range(self.workers)))
        except BaseException:
            await self.close()
            raise
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def info(self) -> dict[str, str]:
        host = self.cfg.server.external_address or self.cfg.server.internal_address
        out = {"https": _url("https", host, self.https_port, 443)}
        if self.http_port:
            out["http"] = _url("http", host, self.http_port, 80)
        return out

    def reload_tls(self) -> None:
        """Reload the certificate in every worker (SIGHUP); connections in flight are kept."""
        if self._worker is not None:
            self._worker.reload_tls()
        for p in self._procs:
            if p is not None and p.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGHUP)

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._worker is not None:
            await self._worker.close()
            self._worker = None
        procs, self._procs = self._procs, []
        for p in procs:
            if p is not None and p.is_alive():
                p.terminate()  # SIGTERM: the worker drains and exits
        loop = asyncio.get_running_loop()
        for p in procs:
            if p is None:
                continue
            await loop.run_in_executor(None, p.join, 5.0)
            if p.is_alive():
                p.kill()
                await loop.run_in_executor(None, p.join, 2.0)
        for s in self._held:
            s.close()
        self._held.clear()

    # -- worker processes -----------------------------------------------------------------------

    async def _spawn(self, index: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker_main,
            args=(
                self.cfg,
                self.guard_factory,
                self.https_port,
                self.http_port,
                self.workers,
                child_end,
            ),
            name=f"confedge-proxy-{index}",
            daemon=True,
        )
        proc.start()
        child_end.close()
        while len(self._procs) <= index:
            self._procs.append(None)
        self._procs[index] = proc
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, _wait_ready, parent_end, proc, 30.0)
        parent_end.close()
        if ready != "ready":
            raise RuntimeError(f"proxy worker {index} failed to start: {ready}")

    async def _supervise(self) -> None:
        """Restart a worker that died (a crash must not halve capacity until someone notices)."""
        backoff = [1.0] * self.workers
        while not self._closing:
            await asyncio.sleep(0.5)
            for i, p in enumerate(self._procs):
                if p is None or p.is_alive() or self._closing:
                    continue
                log.error(
                    "proxy worker %d (pid %s) exited with %s; restarting", i, p.pid, p.exitcode
                )
                await asyncio.sleep(backoff[i])
                backoff[i] = min(backoff[i] * 2, 30.0)
                try:
                    await self._spawn(i)
                    backoff[i] = 1.0
                except (RuntimeError, OSError) as exc:
                    log.error("proxy worker %d restart failed: %s", i, exc)


def _wait_ready(conn: multiprocessing.connection.Connection, proc: Any, timeout: float) -> str:
    if conn.poll(timeout):
        try:
            return str(conn.recv())
        except EOFError:
            return f"exited with {proc.exitcode}"
    return "no answer within 30 s"


def _worker_main(
    cfg: Config,
    guard_factory: GuardFactory | None,
    https_port: int,
    http_port: int,
    workers: int,
    ready: multiprocessing.connection.Connection,
) -> None:
    """Entry point of a worker process."""
    import uvloop

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        hosts = _listen_hosts(cfg)
        try:
            https = _bind_all(hosts, https_port, reuse_port=True)
            http = _bind_all(hosts, http_port, reuse_port=True) if http_port else []
            worker = ProxyWorker(cfg, guard_factory=guard_factory, workers=workers)
            await worker.start(https, http)
        except Exception as exc:
            ready.send(f"{type(exc).__name__}: {exc}")
            ready.close()
            return
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, worker.reload_tls)
        ready.send("ready")
        ready.close()
        await stop.wait()
        await worker.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    sys.exit(0)
