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
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from confedge.config import Config, ConfigError
from confedge.guard.hook import GuardHook
from confedge.logsetup import setup_service_logging
from confedge.proxy import build_kind, engines
from confedge.proxy.accesslog import RequestCounter
from confedge.proxy.core import SESSIONS_SHOWN, WorkerRuntime, reuse_port_socket
from confedge.proxy.pools import build_pools
from confedge.proxy.redirect import RedirectConnection
from confedge.proxy.server import ClientConnection
from confedge.proxy.turnshare import InProcessShare, RelayShare
from confedge.tls.context import TLSContextHolder, TLSState
from confedge.turn.portshare import ALPN_STUN_TURN

__all__ = ["GuardFactory", "ProxyService", "ProxyWorker"]

log = logging.getLogger("confedge.proxy")

GuardFactory = Callable[[Config], GuardHook]

# How often a worker process reports its counters to the main process (status page, /metrics).
STATS_INTERVAL = 1.0
# A report must fit one atomic pipe write (PIPE_BUF): it then arrives whole or not at all.
_STATS_MAX = 4096
# A worker's reason for refusing a certificate, cut to this many characters: its answer stays
# one atomic write too.
_ANSWER_REASON_MAX = 1000
# How long a reload waits for every worker process to answer whether it loaded the new
# certificate. A worker answers within milliseconds; one that does not is hung or gone, and the
# reload must not hang with it (the answer is then reported as missing, naming the worker).
TLS_ANSWER_WAIT = 5.0


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
    """Everything one process serves: TLS listeners, the redirect listener, one WorkerRuntime."""

    def __init__(
        self,
        cfg: Config,
        *,
        guard_factory: GuardFactory | None = None,
        workers: int = 1,
        guard: GuardHook | None = None,
        turn_share: InProcessShare | RelayShare | None = None,
    ) -> None:
        self.cfg = cfg
        self.guard_factory = guard_factory
        # turn.tls_on_https: where TURN-over-TLS connections of the HTTPS port go.
        self.turn_share = turn_share
        # A guard the caller owns (started and closed by it), used instead of building one.
        self.shared_guard = guard
        self.workers = workers
        # Answers by status class, for the status page: read in process (workers = 1) or
        # reported to the main process by each worker (workers > 1).
        self.counter: RequestCounter | None = None
        self.core: WorkerRuntime | None = None
        self.tls: TLSContextHolder | None = None
        self.guard: Any = None
        self.access: Any = None
        self.static: Any = None
        self._servers: list[asyncio.AbstractServer] = []
        # The certificate served before the main process's last [tls] section was loaded, with
        # that section's generation: kept until the next one, so that the worker can go back
        # to it when another worker could not load the same files (give_back_tls).
        self._tls_before: tuple[int, TLSState] | None = None

    async def start(
        self, https_socks: list[socket.socket], http_socks: list[socket.socket]
    ) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        # RFC 7443 §4: with TURN on this port, "stun.turn" is offered too, first, so that a
        # client offering it gets it (OpenSSL picks in the server's order).
        alpn = ("http/1.1",) if self.turn_share is None else (ALPN_STUN_TURN, "http/1.1")
        if cfg.proxy.http2:
            alpn = (*alpn[:-1], "h2", "http/1.1")  # RFC 9113 §3.2: h2 preferred to http/1.1
        self.tls = TLSContextHolder(cfg, alpn=alpn)
        if self.shared_guard is not None:
            self.guard = self.shared_guard
        elif self.guard_factory is not None:
            self.guard = self.guard_factory(cfg)
            start = getattr(self.guard, "start", None)
            if start is not None:
                await start()
        self.access = _make_access_log(cfg)
        self.static = _make_static(cfg)
        self.counter = RequestCounter(self.access)
        core = WorkerRuntime(
            cfg,
            loop,
            guard=self.guard,
            access_log=self.counter,
            static=self.static,
            workers=self.workers,
        )
        self.core = core
        core.turn_share = self.turn_share
        if cfg.proxy.http2:
            from confedge.proxy.h2 import H2Runtime

            core.h2 = H2Runtime(
                core, max_streams=cfg.proxy.http2_max_streams, engine=cfg.proxy.http2_engine
            )
        core.start()
        self._https_addrs = [s.getsockname()[:2] for s in https_socks]
        self._http_addrs = [s.getsockname()[:2] for s in http_socks]
        await self._listen(https_socks, http_socks)

    async def _listen(
        self, https_socks: list[socket.socket], http_socks: list[socket.socket]
    ) -> None:
        """Serve the HTTPS and port-80 listeners on these sockets."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        core = self.core
        assert core is not None and self.tls is not None
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

    def set_drain(self, phase: str) -> None:
        """Drain phase from the main process (confedge/drain.py): "draining" makes the health
        endpoint answer 503; "closing" closes the listeners (connections in flight go on, idle
        ones are closed by the sweep); "serving" opens the listeners again on the same ports."""
        core = self.core
        if core is None:
            return
        was = core.drain_phase
        core.drain_phase = phase
        if phase == "closing" and self._servers:
            for srv in self._servers:
                srv.close()
            self._servers = []
            core.close_idle()
            log.info("proxy: listeners closed (drain); %d connection(s) left", len(core.clients))
        elif phase == "serving" and was == "closing" and not self._servers:
            asyncio.get_running_loop().create_task(self._reopen())

    async def _reopen(self) -> None:
        reuse = self.workers > 1
        https = [reuse_port_socket(h, p, reuse_port=reuse) for h, p in self._https_addrs]
        http = [reuse_port_socket(h, p, reuse_port=reuse) for h, p in self._http_addrs]
        await self._listen(https, http)
        log.info("proxy: listeners open again (drain cancelled)")

    def apply(self, cfg: Config) -> None:
        """A reloaded configuration (checked by the main process): the worker's core, its
        static mounts and its own guard's thresholds; certificates go through reload_tls."""
        if self.guard is not None and self.guard is not self.shared_guard:
            reload_guard = getattr(self.guard, "reload", None)
            if reload_guard is not None:
                reload_guard(cfg)  # first: the core reads its ban_status
        self.static = _make_static(cfg)
        if self.core is not None:
            self.core.apply(cfg)
            self.core.static = self.static
        self.cfg = cfg

    def reload_tls(self, cfg: Config | None = None, generation: int | None = None) -> None:
        """Load the certificates again, from `cfg`'s [tls] when given (CertificateError keeps
        the old ones in service). `generation`: the main process's number for this [tls]
        section; what served before is then kept for give_back_tls."""
        if self.tls is None:
            return
        before = self.tls.in_service()
        self.tls.reload(cfg)
        self._tls_before = None if generation is None else (generation, before)
        if cfg is not None:
            self.cfg = cfg

    def give_back_tls(self, generation: int) -> bool:
        """Serve the certificate of before `generation` again, if this worker took that
        generation and nothing since (True); a worker that refused it still serves the old
        one, and one started later has nothing older in memory (False)."""
        kept = self._tls_before
        if self.tls is None or kept is None or kept[0] != generation:
            return False
        self._tls_before = None
        self.tls.restore(kept[1])
        self.cfg = msgspec.structs.replace(self.cfg, tls=kept[1].cfg.tls)
        return True

    def stats(self) -> dict[str, Any]:
        """This worker's counters and gauges, as its report to the main process."""
        core = self.core
        out: dict[str, Any] = {
            "requests": self.counter.to_json() if self.counter is not None else None,
        }
        if core is not None:
            out["client_connections"] = len(core.clients)
            out["upstream_connections"] = len(core.upstreams)
            out["in_flight"] = list(core.balancer.active)
            out["idle_connections"] = [len(p.idle) for p in core.pools]
            out["pool_requests"] = list(core.pool_requests)
            out["latency"] = core.latency
            out["sessions"] = core.sessions()
            out["guard_decisions"] = core.guard_decisions
        return out

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
        if self.turn_share is not None:
            await self.turn_share.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        self._servers.clear()
        if self.guard is not None and self.guard is not self.shared_guard:
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
    try:
        return AccessLog(cfg.proxy.access_log)
    except ValueError as exc:  # a directory, a missing parent, no permission: one line at start
        raise ConfigError([str(exc)]) from None


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

    def __init__(
        self,
        cfg: Config,
        *,
        guard_factory: GuardFactory | None = None,
        guard: GuardHook | None = None,
        turn: Any = None,
    ) -> None:
        """`guard_factory` builds the guard of each worker process (it must be importable by a
        spawned process); `guard`, if given, is this process's own guard (already started,
        closed by the caller), which an in-process proxy (workers = 1) uses instead of building
        a second one, so that it and TURN count into, and ban from, one table. `turn` is the
        started TurnService, which serves the HTTPS port's TURN connections with
        turn.tls_on_https."""
        self.cfg = cfg
        self.turn = turn
        self._turn_relay: str | None = None
        self.guard_factory = guard_factory
        self.shared_guard = guard
        self.workers = cfg.proxy.workers or os.cpu_count() or 1
        self.https_port = 0
        self.http_port = 0
        self._worker: ProxyWorker | None = None
        self._held: list[socket.socket] = []
        self._procs: list[Any] = []
        # Per worker: the pipe end on which it is sent a new [tls] section to load (reload).
        self._commands: dict[int, multiprocessing.connection.Connection] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self.drain_phase = "serving"  # confedge/drain.py: what every worker is told
        # Worker reports (workers > 1): the last one of each worker, and the final request
        # counts of workers that exited, so that totals never go back when one is restarted.
        self._reports: dict[int, dict[str, Any]] = {}
        self._report_pipes: dict[int, tuple[int, Any, bytearray]] = {}
        self._retired: dict[str, int] = {}
        # Certificate reloads with workers (reload_tls): each [tls] section sent gets the next
        # generation; each worker's last answer is (generation, reason it refused or None).
        self._tls_generation = 0
        self._tls_answers: dict[int, tuple[int, str | None]] = {}
        self._tls_answered = asyncio.Event()

    @property
    def core(self) -> WorkerRuntime | None:
        """The in-process core (workers = 1), for tests and the status page."""
        return self._worker.core if self._worker is not None else None

    async def start(self) -> None:
        cfg = self.cfg
        hosts = _listen_hosts(cfg)
        try:  # an engine set to "native" without its extension: said before listening (the
            # workers choose again, by the same rule)
            h1, h2 = engines(cfg)
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
        log.info(
            "proxy: %d worker(s), hot path %s, HTTP/1.1 heads %s, HTTP/2 %s",
            self.workers,
            build_kind(),
            h1,
            h2 or "off",
        )
        webroot = cfg.proxy.acme_webroot
        if webroot and cfg.proxy.http_port:
            # Explicit config that serves files on port 80: said at every start.
            missing = "" if os.path.isdir(webroot) else f" ({webroot} does not exist yet: mkdir it)"
            log.warning(
                "proxy.acme_webroot: the HTTP port (%d) answers /.well-known/acme-challenge/ "
                "from %s/.well-known/acme-challenge/ (ACME HTTP-01 for certbot --webroot)%s",
                cfg.proxy.http_port,
                webroot.rstrip("/"),
                missing,
            )
        # Check/generate the certificate once, in the parent, before any worker races for it.
        TLSContextHolder(cfg)
        if cfg.turn.tls_on_https:
            if self.turn is None:
                raise ValueError("turn.tls_on_https: the proxy was started without TURN")
            if self.workers > 1:
                self._turn_relay = await self.turn.open_relay_listener()
            log.info("proxy: TURN over TLS shares the HTTPS port (turn.tls_on_https)")
        if self.workers == 1:
            https = _bind_all(hosts, cfg.proxy.https_port, reuse_port=False)
            http = (
                _bind_all(hosts, cfg.proxy.http_port, reuse_port=False)
                if cfg.proxy.http_port
                else []
            )
            self.https_port = https[0].getsockname()[1]
            self.http_port = http[0].getsockname()[1] if http else 0
            self._worker = ProxyWorker(
                cfg,
                guard_factory=self.guard_factory,
                guard=self.shared_guard,
                turn_share=InProcessShare(self.turn) if cfg.turn.tls_on_https else None,
            )
            try:
                await self._worker.start(https, http)
            except BaseException:
                for s in https + http:
                    s.close()
                raise
            return
        problem = _cwd_problem()
        if problem is not None:
            raise ConfigError(
                [
                    f"proxy.workers: the worker processes start in the working directory, and "
                    f"{problem}: start confedge from a directory this user can enter (a systemd "
                    "service runs in /)"
                ]
            )
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

    async def reload_tls(self, cfg: Config | None = None) -> str:
        """Reload the certificates in every worker (SIGHUP); connections in flight are kept.

        `cfg` carries a new [tls] section (the file was edited, e.g. by `confedge cert
        install`). With worker processes the files are checked here first, once: a bad
        certificate raises CertificateError to the caller (one log line per refusal) and no
        worker is told; each worker checking them itself would refuse them once per worker.

        Then each worker is sent the section, numbered, loads the files itself and answers
        (ok, or why not); this waits for every answer, at most TLS_ANSWER_WAIT seconds. The
        files can change between the check here and a worker's load (a renewal hook writing
        cert and key one after the other). If any worker could not load them, the reload is
        refused as a whole: CertificateError says how many workers and why, and the workers
        that did load the new certificate go back to the one they served before, from memory
        (ProxyWorker.give_back_tls). Why back rather than keep it: the refusal then means the
        same for every worker ("the old one stays in service"), clients do not get one
        certificate or the other by the kernel's choice of worker, and the next reload starts
        from one state. A worker restarted while a reload waits starts with the new section,
        loads the files at its start and counts as having taken it once it serves; a worker
        that neither answers nor is back in time is named in the returned text ("" when every
        worker answered), and the reload does not wait longer for it.
        """
        if self._worker is not None:
            self._worker.reload_tls(cfg)
            if cfg is not None:
                self.cfg = cfg
            return ""
        from confedge.tls.certs import CertificateError

        old = self.cfg
        new = cfg or old
        TLSContextHolder(new)
        self._tls_generation += 1
        generation = self._tls_generation
        self.cfg = new  # a worker (re)started from now on starts with it
        asked: dict[int, Any] = {}
        for index, conn in list(self._commands.items()):
            proc = self._procs[index] if index < len(self._procs) else None
            if proc is None or not proc.is_alive():
                continue  # the supervisor restarts it with self.cfg
            try:
                conn.send(("tls", generation, new.tls))
            except OSError:
                continue
            asked[index] = proc
        refused, took, silent = await self._tls_outcome(generation, asked)
        if not refused:
            return "; ".join(silent)
        self.cfg = old
        self._tell(("tls-back", generation))
        said = [f"{len(refused)} of {len(asked)} workers could not load it ({'; '.join(refused)})"]
        if took:
            said.append(f"the {took} that had loaded it went back to the old one")
        raise CertificateError("; ".join(said + silent))

    async def _tls_outcome(
        self, generation: int, asked: dict[int, Any]
    ) -> tuple[list[str], int, list[str]]:
        """Wait for the workers in `asked` (index -> process) to answer `generation`: the
        refusals ("worker 0 (pid N): reason"), how many loaded it, and the workers that did not
        answer in time. A worker whose process was replaced meanwhile never sees this
        generation's message: the new process started with the new section and loaded the
        files itself, and _spawn answers for it once it serves (a start that fails is the
        supervisor's to log and retry, and the worker is then named as not back)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + TLS_ANSWER_WAIT
        waiting = dict(asked)
        refused: list[str] = []
        took = 0
        while True:
            self._tls_answered.clear()
            for index, proc in list(waiting.items()):
                answer = self._tls_answers.get(index)
                if answer is not None and answer[0] == generation:
                    del waiting[index]
                    if answer[1] is None:
                        took += 1
                    else:
                        refused.append(f"worker {index} (pid {proc.pid}): {answer[1]}")
            left = end - loop.time()
            if not waiting or left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                # Woken by an answer; every 0.1 s at least, to see a worker restarted.
                await asyncio.wait_for(self._tls_answered.wait(), min(left, 0.1))
        silent = [
            f"worker {index} (pid {proc.pid}) "
            + ("did not answer" if proc.is_alive() else "exited and was not back")
            + f" within {TLS_ANSWER_WAIT:g} s"
            for index, proc in sorted(waiting.items())
        ]
        return sorted(refused), took, silent

    def set_drain(self, phase: str) -> None:
        """Tell every worker the drain phase (ProxyWorker.set_drain); a worker restarted later
        gets it at start."""
        self.drain_phase = phase
        if self._worker is not None:
            self._worker.set_drain(phase)
            return
        self._tell(("drain", phase))

    def reload_config(self, cfg: Config) -> None:
        """A reloaded configuration (runtime.py checked it, restart-only keys unchanged) for
        every worker, over the command pipe; connections in flight are kept."""
        self.cfg = cfg
        if self._worker is not None:
            self._worker.apply(cfg)
            return
        self._tell(("config", cfg))

    def _tell(self, message: Any) -> None:
        for conn in list(self._commands.values()):
            try:
                conn.send(message)
            except OSError:  # the worker is gone; the supervisor restarts it with self.cfg
                continue

    def left(self) -> int:
        """Client connections still open (in process, or as of the workers' last reports)."""
        core = self.core
        if core is not None:
            return len(core.clients)
        return sum(r.get("client_connections", 0) for r in self._reports.values())

    def latency(self) -> dict[str, list[float]]:
        """Per-node latency histograms (WorkerRuntime.latency), summed over workers."""
        core = self.core
        if core is not None:
            return core.latency
        out: dict[str, list[float]] = {}
        for r in self._reports.values():
            for netloc, h in (r.get("latency") or {}).items():
                cur = out.setdefault(netloc, [0.0] * len(h))
                if len(cur) == len(h):
                    out[netloc] = [a + b for a, b in zip(cur, h, strict=True)]
        return out

    def guard_decisions(self) -> dict[str, int]:
        """Guard decisions about proxied requests, summed over workers."""
        core = self.core
        if core is not None:
            return dict(core.guard_decisions)
        out: dict[str, int] = {}
        for r in self._reports.values():
            for k, v in (r.get("guard_decisions") or {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def sessions(self) -> list[dict[str, Any]]:
        """Proxied sessions on a node now, longest first (WorkerRuntime.sessions)."""
        core = self.core
        if core is not None:
            return core.sessions()
        rows = [row for r in self._reports.values() for row in r.get("sessions") or ()]
        rows.sort(key=lambda row: row.get("age", 0), reverse=True)
        return rows[:SESSIONS_SHOWN]

    def request_counts(self) -> dict[str, int] | None:
        """Answers by status class of the in-process proxy (workers = 1), else None (see
        worker_stats for worker processes)."""
        w = self._worker
        return w.counter.to_json() if w is not None and w.counter is not None else None

    def worker_stats(self) -> dict[str, Any] | None:
        """The workers' reports summed (workers > 1), or None before the first report.

        Request counts are totals since start (a restarted worker's last report is kept);
        connection counts and per-node gauges are as of each worker's last report (at most
        STATS_INTERVAL old).
        """
        reports = list(self._reports.values())
        if self._worker is not None or not (reports or self._retired):
            return None
        requests = dict(self._retired)
        for r in reports:
            if r.get("requests"):
                requests = RequestCounter.add(requests, r["requests"])
        n = sum(len(spec.nodes) for spec in build_pools(self.cfg))  # every pool's nodes
        pools = len(self.cfg.proxy.pools) + 1
        out: dict[str, Any] = {
            "reporting": len(reports),
            "requests": requests or None,
            "client_connections": sum(r.get("client_connections", 0) for r in reports),
            "upstream_connections": sum(r.get("upstream_connections", 0) for r in reports),
        }
        for key, size in (("in_flight", n), ("idle_connections", n), ("pool_requests", pools)):
            out[key] = [
                sum(r[key][i] for r in reports if len(r.get(key, ())) == size) for i in range(size)
            ]
        return out

    def _watch_reports(self, index: int, conn: Any) -> None:
        """Read worker `index`'s reports (JSON lines on its start-up pipe) from now on."""
        self._forget_reports(index)
        fd = conn.fileno()
        os.set_blocking(fd, False)
        self._report_pipes[index] = (fd, conn, bytearray())
        asyncio.get_running_loop().add_reader(fd, self._read_reports, index)

    def _read_reports(self, index: int) -> None:
        fd, _conn, buf = self._report_pipes[index]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker exited: keep what it counted
            last = self._reports.pop(index, None)
            if last is not None and last.get("requests"):
                self._retired = RequestCounter.add(self._retired, last["requests"])
            self._forget_reports(index)
            return
        buf += data
        *lines, rest = bytes(buf).split(b"\n")
        buf[:] = rest
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if not isinstance(report, dict):
                continue
            if "tls_answer" in report:  # _answer_tls: what it did with a [tls] section
                refused = report.get("refused")
                self._tls_answers[index] = (
                    int(report["tls_answer"]),
                    None if refused is None else str(refused),
                )
                self._tls_answered.set()
            else:
                self._reports[index] = report  # the last one counts

    def _forget_reports(self, index: int) -> None:
        entry = self._report_pipes.pop(index, None)
        if entry is None:
            return
        fd, conn, _ = entry
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(fd)
        conn.close()

    async def close(self) -> None:
        self._closing = True
        for index in list(self._report_pipes):
            self._forget_reports(index)
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
        for conn in self._commands.values():
            conn.close()
        self._commands.clear()

    # -- worker processes -----------------------------------------------------------------------

    async def _spawn(self, index: int) -> None:
        # The [tls] section this worker starts with (self.cfg's) is the current generation.
        generation = self._tls_generation
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe(duplex=False)
        command_in, command_out = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker_main,
            args=(
                self.cfg,
                self.guard_factory,
                self.https_port,
                self.http_port,
                self.workers,
                child_end,
                command_in,
                self._turn_relay,
            ),
            name=f"confedge-proxy-{index}",
            daemon=True,
        )
        # The child is born with SIGTERM blocked (a signal mask is inherited across fork and
        # exec) until _worker_main has its handler: a stop that lands while the interpreter
        # and multiprocessing's bootstrap start (a worker restarted just before a shutdown,
        # on a loaded host) waits for that handler instead of killing it by default action.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        child_end.close()
        command_in.close()
        old = self._commands.pop(index, None)
        if old is not None:
            old.close()
        self._commands[index] = command_out
        while len(self._procs) <= index:
            self._procs.append(None)
        self._procs[index] = proc
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, _wait_ready, parent_end, proc, 30.0)
        if ready != "ready":
            parent_end.close()
            # The worker's one line (an access log it cannot open, ...): `confedge run` says it
            # as `confedge: cannot start: ...`, as it does for the same problem in process.
            why = ready.removeprefix("ConfigError: ")
            raise ConfigError([f"proxy worker {index} failed to start: {why}"])
        self._watch_reports(index, parent_end)
        # It serves the certificate of that generation, loaded at its start: its answer to a
        # reload waiting for it (reload_tls), which it was never sent.
        self._tls_answers[index] = (generation, None)
        self._tls_answered.set()
        if self.drain_phase != "serving":
            command_out.send(("drain", self.drain_phase))

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
                except (RuntimeError, OSError, ConfigError) as exc:
                    log.error("proxy worker %d restart failed: %s", i, exc)


def _cwd_problem() -> str | None:
    """Why a worker process could not start in this working directory, or None.

    multiprocessing's spawn makes each worker change into the parent's working directory
    before anything of confedge runs; `sudo -u confedge confedge run` from root's home kept a
    directory the service user cannot enter, and every worker died at once with only "exited
    with 1" said (the supervisor then restarting it for ever)."""
    try:
        cwd = os.getcwd()
    except OSError as exc:
        return f"the working directory is gone ({exc.strerror})"
    if not os.access(cwd, os.X_OK):
        return f"{cwd} is not accessible to this user (uid {os.getuid()})"
    return None


def _wait_ready(conn: multiprocessing.connection.Connection, proc: Any, timeout: float) -> str:
    if conn.poll(timeout):
        try:
            return str(conn.recv())
        except EOFError:
            return f"exited with {proc.exitcode}"
    return "no answer within 30 s"


def _report_line(stats: dict[str, Any]) -> bytes:
    """One report as a JSON line. When it would not fit one atomic write, the optional parts
    go first (the sessions list, then the latency histograms), so that the counters and gauges
    still arrive with many nodes."""
    line = json.dumps(stats, separators=(",", ":")).encode() + b"\n"
    for optional in ("sessions", "latency"):
        if len(line) <= _STATS_MAX:
            break
        stats.pop(optional, None)
        line = json.dumps(stats, separators=(",", ":")).encode() + b"\n"
    return line


async def _report(worker: ProxyWorker, pipe: multiprocessing.connection.Connection) -> None:
    """Send this worker's stats to the main process every STATS_INTERVAL, as JSON lines.

    The pipe is non-blocking and each report is one write of at most PIPE_BUF bytes, so a report
    arrives whole or not at all, and a main process that stopped reading costs reports, never a
    blocked worker.
    """
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    while True:
        await asyncio.sleep(STATS_INTERVAL)
        line = _report_line(worker.stats())
        if len(line) > _STATS_MAX:
            log.warning("proxy worker report of %d bytes is too large; not sent", len(line))
            continue
        try:
            os.write(fd, line)
        except BlockingIOError:
            continue  # the main process is behind: skip this report
        except OSError:
            return  # the main process is gone


def _reload_worker_tls(
    worker: ProxyWorker, tls: Any = None, generation: int | None = None
) -> str | None:
    """Reload a worker's certificates: on SIGHUP sent to the worker itself (same [tls]), or
    when the main process sends a new [tls] section (with its `generation`). The main process
    checked the files first, so a refusal here means they changed in between: one line, never
    a traceback. Returns the reason of a refusal, None when the new certificate serves."""
    from confedge.tls.certs import CertificateError

    cfg = None if tls is None else msgspec.structs.replace(worker.cfg, tls=tls)
    try:
        worker.reload_tls(cfg, generation)
    except (CertificateError, ConfigError, OSError, ValueError) as exc:
        log.error("certificate not reloaded in this worker, the old one stays in service: %s", exc)
        return str(exc) or type(exc).__name__
    return None


def _answer_tls(fd: int, generation: int, refused: str | None) -> None:
    """Tell the main process what this worker did with [tls] section `generation`: one JSON
    line on the report pipe, one write below PIPE_BUF (so it arrives whole, between two stats
    reports, never inside one). A lost answer (pipe full, main process gone) only makes the
    main process say that this worker did not answer."""
    reason = None if refused is None else refused[:_ANSWER_REASON_MAX]
    line = json.dumps({"tls_answer": generation, "refused": reason}).encode() + b"\n"
    try:
        os.write(fd, line)
    except OSError as exc:
        log.warning("proxy worker: answer to certificate reload %d not sent: %s", generation, exc)


def _read_commands(
    worker: ProxyWorker,
    conn: multiprocessing.connection.Connection,
    stop: asyncio.Event,
    answers: int,
) -> None:
    """The main process sent a ("tls", generation, [tls] section), a ("tls-back", generation),
    a ("drain", phase) or a ("config", Config) (each message is one pickle, written whole): act
    on it; a [tls] section is answered on `answers` (the report pipe's fd). End of file means
    the main process is gone (killed: a clean stop SIGTERMs the workers first); the worker
    stops too rather than serve on as an orphan that nobody reloads, restarts or stops."""
    try:
        while conn.poll():
            message = conn.recv()
            kind = message[0] if isinstance(message, tuple) else None
            if kind == "drain":
                worker.set_drain(message[1])
            elif kind == "config":
                worker.apply(message[1])
            elif kind == "tls":
                _answer_tls(answers, message[1], _reload_worker_tls(worker, message[2], message[1]))
            elif kind == "tls-back" and worker.give_back_tls(message[1]):
                log.warning(
                    "proxy worker: back to the previous certificate: another worker could not "
                    "load the new files (reload %d)",
                    message[1],
                )
    except (EOFError, OSError):
        asyncio.get_running_loop().remove_reader(conn.fileno())
        if not stop.is_set():
            log.warning("proxy worker: the main process is gone; stopping")
            stop.set()


def _exit_while_starting(signum: int, frame: object) -> None:
    # os._exit, not SystemExit: the signal can land anywhere, also inside the event loop's
    # teardown after a start that failed (the parent stops every worker then), where an
    # exception raised from the handler became three chained tracebacks on stderr. A worker
    # that has not started has nothing to flush (its log lines are written as they come).
    os._exit(0)


def _worker_main(
    cfg: Config,
    guard_factory: GuardFactory | None,
    https_port: int,
    http_port: int,
    workers: int,
    ready: multiprocessing.connection.Connection,
    commands: multiprocessing.connection.Connection,
    turn_relay: str | None = None,
) -> None:
    """Entry point of a worker process; `turn_relay` is TURN's local socket (tls_on_https)."""
    # A stop (SIGTERM) that arrives while this worker is still starting (a restarted worker
    # during shutdown) ends it cleanly, exit code 0, instead of by the signal's default action;
    # the event loop's handler below replaces this one once the worker serves.
    signal.signal(signal.SIGTERM, _exit_while_starting)
    # (born with SIGTERM blocked, see ProxyService._spawn: one that came meanwhile lands now)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    import uvloop

    setup_service_logging(
        logging.INFO, "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        hosts = _listen_hosts(cfg)
        try:
            https = _bind_all(hosts, https_port, reuse_port=True)
            http = _bind_all(hosts, http_port, reuse_port=True) if http_port else []
            share = RelayShare(turn_relay, loop) if turn_relay else None
            worker = ProxyWorker(
                cfg, guard_factory=guard_factory, workers=workers, turn_share=share
            )
            await worker.start(https, http)
        except Exception as exc:
            ready.send(f"{type(exc).__name__}: {exc}")
            ready.close()
            return
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reload_worker_tls, worker)
        ready.send("ready")
        # From here on the start-up pipe carries JSON lines (stats reports, answers to [tls]
        # sections), each one non-blocking write.
        os.set_blocking(ready.fileno(), False)
        loop.add_reader(commands.fileno(), _read_commands, worker, commands, stop, ready.fileno())
        reporter = loop.create_task(_report(worker, ready))
        await stop.wait()
        reporter.cancel()
        await worker.close()
        ready.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    sys.exit(0)
