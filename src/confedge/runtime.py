"""Start and stop what a configuration enables, in one event loop.

Why a tiny component model: `confedge run` and `confedge demo` start the same parts (TURN, guard,
proxy, and for the demo the simulated nodes) and must stop them in reverse order on Ctrl-C or
SIGTERM without losing state (the guard flushes its store last-but-one, after the listeners that
feed it are closed). Each part only needs `start()`, `close()` and, for scripts, `info()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from confedge.config import Config
from confedge.host.notify import Notifier

log = logging.getLogger("confedge")


class Component(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Runtime:
    """The running parts of one confedge instance, started in order and closed in reverse."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.parts: list[tuple[str, Component]] = []
        self.guard: Any = None
        self.turn: Any = None
        self.proxy: Any = None
        self.admin: Any = None
        self.cluster: Any = None  # cluster.store set: the shared registry (docs/SCALING.md)
        # What this instance tells the others and its status page: "serving", or "draining".
        self.state = "serving"
        self.started: float | None = None  # Unix time of start(), for the status page
        self.notifier = Notifier()  # sd_notify under systemd (Type=notify); no-op elsewhere
        # The file the configuration came from: a reload reads its [tls] section again (after
        # `confedge cert install` pointed it at new files). None: reload the same files.
        self.config_path: str | None = None

    async def _start(self, name: str, part: Component) -> None:
        await part.start()
        self.parts.append((name, part))
        log.info("%s started", name)

    async def start(self, *, before_proxy: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start guard, TURN, proxy and the management listener as the configuration enables them.

        `before_proxy` lets the demo start its simulated nodes after TURN (they allocate relays on
        it) and before the proxy (whose health checks would otherwise mark them down at once).
        """
        cfg = self.cfg
        self.started = time.time()
        try:
            from confedge.guard import create_guard

            self.guard = create_guard(cfg)
            await self._start("guard", self.guard)
            if cfg.guard.enabled and cfg.guard.firewall:
                from confedge.host.banset import KernelBanSet

                await self._start("kernel ban set", KernelBanSet(self.guard))
            if cfg.cluster.store:
                # Before TURN: it takes the cluster's shared nonce key.
                from confedge.cluster.service import ClusterService

                self.cluster = ClusterService(cfg, self)
                await self._start("cluster", self.cluster)
            if cfg.turn.enabled:
                from confedge.turn.service import TurnService

                self.turn = TurnService(
                    cfg,
                    guard=self.guard if cfg.guard.enabled else None,
                    nonce_key=self.cluster.nonce_key if self.cluster is not None else None,
                )
                await self._start("turn", self.turn)
            if before_proxy is not None:
                await before_proxy()
            if cfg.proxy.enabled:
                from confedge.proxy.service import ProxyService

                factory = create_guard if cfg.guard.enabled else None
                # In process (workers = 1) the proxy uses this guard, the one TURN uses too.
                self.proxy = ProxyService(
                    cfg,
                    guard_factory=factory,
                    guard=self.guard if cfg.guard.enabled else None,
                    turn=self.turn,  # turn.tls_on_https: TURN connections of the HTTPS port
                )
                await self._start("proxy", self.proxy)
            if cfg.management.enabled:
                # Last: it reads the other parts (and hooks the in-process proxy's health
                # changes), and is stopped first.
                from confedge.admin import AdminService

                self.admin = AdminService(cfg, self)
                await self._start("admin", self.admin)
        except BaseException:
            await self.close()
            raise
        # Every enabled part listens now: tell systemd (READY=1, and start the watchdog).
        self.notifier.ready("running: " + ", ".join(name for name, _ in self.parts))

    def add(self, name: str, part: Component) -> None:
        """Register an already-started part so that close() stops it in order."""
        self.parts.append((name, part))

    def reload(self) -> None:
        """SIGHUP: reload the TLS certificate of the proxy and of TURN over TLS (SPEC §5).

        With `config_path` set, the file's [tls] section is read again first (other sections
        keep their running values). Connections in flight keep their session; a certificate
        that fails its checks is refused with one clear log line and the old one stays in
        service. One path through, no early return: whatever happens, the reload ends here.
        """
        from confedge.tls.certs import CertificateError

        self.notifier.reloading()  # systemd: RELOADING=1 ... READY=1 around the reload
        cfg = self._reread_tls()
        # Parts refusing the same files for the same reason make one line, not one per part.
        refused: dict[str, list[str]] = {}
        for name, part in (("proxy", self.proxy), ("turn", self.turn)):
            reload_tls = getattr(part, "reload_tls", None)
            if cfg is None or reload_tls is None:
                continue
            try:
                reload_tls(cfg)
            except CertificateError as exc:
                refused.setdefault(str(exc), []).append(name)
        if cfg is not None and not refused:
            self.cfg = cfg
        for reason, names in refused.items():
            log.error(
                "%s: certificate not reloaded, the old one stays in service: %s",
                " and ".join(names),
                reason,
            )
        self.notifier.send(READY=1, STATUS=f"running; reloaded at {time.strftime('%H:%M:%S')}")

    def _reread_tls(self) -> Config | None:
        """The running configuration with the file's current [tls] (the running one when no
        file is known); None, with one log line, when the file is not valid now."""
        from confedge.config import ConfigError, load_config

        if self.config_path is None:
            return self.cfg
        try:
            fresh = load_config(self.config_path)
        except ConfigError as exc:
            log.error(
                "configuration not reloaded, the running one stays: %s", "; ".join(exc.problems)
            )
            return None
        return self.cfg.model_copy(update={"tls": fresh.tls})

    async def close(self) -> None:
        await self.notifier.stopping()
        while self.parts:
            name, part = self.parts.pop()
            try:
                await part.close()
            except Exception:
                log.exception("error while stopping %s", name)
            else:
                log.info("%s stopped", name)


async def wait_for_signal(on_hup: Callable[[], None] | None = None) -> str:
    """Block until SIGINT or SIGTERM; return the signal's name. SIGHUP calls `on_hup`."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not fut.done():
            fut.set_result(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        return await fut
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
