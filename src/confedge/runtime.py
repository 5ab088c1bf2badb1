"""Start and stop what a configuration enables, in one event loop.

Why a tiny component model: `confedge run` and `confedge demo` start the same parts (TURN, guard,
proxy, and for the demo the simulated nodes) and must stop them in reverse order on Ctrl-C or
SIGTERM without losing state (the guard flushes its store last-but-one, after the listeners that
feed it are closed). Each part only needs `start()`, `close()` and, for scripts, `info()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from confedge.config import Config
from confedge.drain import Drain, DrainAction, Phase
from confedge.host.notify import Notifier

log = logging.getLogger("confedge")

# How often a drain looks at what is left (and updates sd_notify STATUS).
DRAIN_TICK = 0.5

# Keys a reload cannot change in a running process (docs/CONFIGURATION.md "Reload"): the
# listeners' addresses and ports, the process model, where state lives, the relay's data plane,
# what is started at all. A reloaded file that changes one is refused, naming it.
RESTART_KEYS: dict[str, tuple[str, ...]] = {
    "server": ("internal_address", "external_address", "state_dir"),
    "proxy": ("enabled", "https_port", "http_port", "workers", "access_log", "http2",
              "http2_max_streams", "http2_engine", "http1_engine"),
    "turn": (
        "enabled", "port", "tls_port", "relay_ports", "relay_address_v6", "tls_on_https",
        "dataplane", "dataplane_threads", "dataplane_coalesce_us", "mode", "offload",
        "relay_multiplex",
    ),
    "guard": ("enabled", "store", "firewall"),
    "management": ("enabled", "port"),
    "cluster": ("store", "instance", "interval", "ttl"),
}  # fmt: skip


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The restart-only keys whose value differs between two configurations ("section.key")."""
    out = []
    for section, keys in RESTART_KEYS.items():
        a, b = getattr(old, section), getattr(new, section)
        out += [f"{section}.{k}" for k in keys if getattr(a, k) != getattr(b, k)]
    return out


def _left_text(left: dict[str, int]) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in left.items())


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
        # The file the configuration came from: a reload reads it again (`confedge reload`,
        # SIGHUP; `confedge cert install` pointed it at new files). None: reload the same files.
        self.config_path: str | None = None
        # Drain (confedge/drain.py): SIGUSR1 starts it, SIGUSR2 cancels it; `finished` is set
        # with "drained" when the process should exit by itself.
        self.drain = Drain(cfg.proxy.drain_grace, cfg.proxy.drain_timeout)
        self._drain_task: asyncio.Task[None] | None = None
        self.finished: asyncio.Future[str] | None = None
        # The last reload, for the status page and /metrics: {"time", "ok", "reason"}.
        self.last_reload: dict[str, Any] | None = None
        # The reload running (reload()), and whether a SIGHUP asked for one more meanwhile.
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False

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
        from confedge.heap import settle_heap

        settle_heap()  # start-up garbage back to the kernel, survivors out of the GC's way
        # Every enabled part listens now: tell systemd (READY=1, and start the watchdog).
        self.notifier.ready("running: " + ", ".join(name for name, _ in self.parts))

    def add(self, name: str, part: Component) -> None:
        """Register an already-started part so that close() stops it in order."""
        self.parts.append((name, part))

    def reload(self) -> None:
        """SIGHUP or `confedge reload`: read the configuration file again and apply it.

        Called from the signal handler, so it only starts the reload (_reload_once) as a task:
        with proxy worker processes a reload waits for each worker's answer about the
        certificate (ProxyService.reload_tls), and the event loop serves on meanwhile. Reloads
        never overlap: a SIGHUP during one asks for one more after it, which reads the file
        again; any number of them make one more, not a queue (each would read the same file).
        """
        task = self._reload_task
        if task is not None and not task.done():
            self._reload_again = True
            return
        self._reload_again = False
        self._reload_task = asyncio.get_running_loop().create_task(self._reload_series())

    async def reload_and_wait(self) -> dict[str, Any]:
        """reload(), and wait until a reload that started after this call has ended; its
        outcome (last_reload). For callers in the event loop and tests."""
        self.reload()
        task = self._reload_task
        assert task is not None
        await asyncio.shield(task)
        assert self.last_reload is not None
        return self.last_reload

    async def _reload_series(self) -> None:
        """Reloads one after the other while SIGHUPs keep asking for one more. The answer for
        `confedge reload` is written once no more is asked for: every `confedge reload` waiting
        then reads the outcome of a reload that read the file after its signal (it waits for
        the answer file to change, whoever wrote it)."""
        while True:
            self._reload_again = False
            ok, why = await self._reload_once()
            if not self._reload_again:
                break
        if self.config_path is not None:
            from confedge.opscli import write_reload_result

            write_reload_result(self.cfg.server.state_dir, ok, why)

    async def _reload_once(self) -> tuple[bool, str]:
        """One reload, from RELOADING=1 to READY=1: (ok, reason).

        Everything a running part can take without dropping a connection or an allocation is
        applied (docs/CONFIGURATION.md "Reload"); a file that fails validation, or that changes
        a key only a restart can change (RESTART_KEYS), is refused with the reason in one log
        line and the running configuration stays whole. Certificates are checked before any
        part is told (a bad one refuses the whole reload), and with worker processes the
        outcome waits for every worker's answer. One path through, no early return: whatever
        happens, the reload ends with READY=1.
        """
        self.notifier.reloading()  # systemd: RELOADING=1 ... READY=1 around the reload
        started = time.time()
        cfg, why = self._reread()
        if cfg is not None:
            try:
                why = await self._apply(cfg)
            except Exception as exc:  # a bug must still end the reload with an answer
                log.exception("reload failed")
                why = f"unexpected error, see the log: {exc!r}"
        if why:
            if "certificate not reloaded" in why:
                log.error("%s", why)  # one line for every part that refused the same files
            elif why.startswith("applied only in part"):
                log.error("configuration reloaded %s", why)
            else:
                log.error("configuration not reloaded, the running one stays: %s", why)
            status = f"running; reload refused at {time.strftime('%H:%M:%S')}: {why}"
        else:
            log.info("configuration reloaded from %s", self.config_path or "the running one")
            status = f"running; reloaded at {time.strftime('%H:%M:%S')}"
        self.notifier.send(READY=1, STATUS=status[:200])
        self.last_reload = {"time": started, "ok": not why, "reason": why}
        return not why, why

    def _reread(self) -> tuple[Config | None, str]:
        """The file's configuration (the running one when no file is known), or the reason
        it cannot be taken."""
        from confedge.config import ConfigError, load_config

        if self.config_path is None:
            return self.cfg, ""
        try:
            fresh = load_config(self.config_path)
        except ConfigError as exc:
            return None, "; ".join(exc.problems)
        changed = restart_only_changes(self.cfg, fresh)
        if changed:
            return None, (
                "only a restart can change " + ", ".join(changed) + " (restart confedge, or "
                "put the running values back and reload)"
            )
        return fresh, ""

    async def _apply(self, cfg: Config) -> str:
        """Hand `cfg` to every part; "" or the reason nothing was changed (or, "applied only
        in part: ...", what was not)."""
        from confedge.config import ConfigError
        from confedge.tls.certs import CertificateError

        try:
            # Checked before any part changes: certificates, static roots, TURN credentials.
            from confedge.tls.context import TLSContextHolder

            if self.proxy is not None or self.turn is not None:
                TLSContextHolder(cfg)
            if cfg.proxy.static:
                from confedge.proxy.static import StaticSite

                StaticSite(cfg.proxy.static)
            if self.turn is not None and getattr(self.turn, "core", None) is not None:
                from confedge.turn.core import TurnCore

                TurnCore.from_config(cfg, self.turn.dataplane)
        except CertificateError as exc:
            names = " and ".join(n for n, p in (("proxy", self.proxy), ("turn", self.turn)) if p)
            return f"{names}: certificate not reloaded, the old one stays in service: {exc}"
        except (ConfigError, OSError, ValueError) as exc:
            problems = getattr(exc, "problems", None)
            return "; ".join(problems) if problems else str(exc)
        # Certificates first, and nothing else if one is refused: the files were checked
        # above, but an operator (or a renewal hook) still writing them can change them in
        # between, and a reload must not then apply the rest around a certificate that did not
        # take, nor be reported as applied.
        took: list[str] = []
        failed: list[str] = []
        for name, part in (("proxy", self.proxy), ("turn", self.turn)):
            fn = getattr(part, "reload_tls", None)
            if fn is None:
                continue
            try:
                # The proxy's is a coroutine (with worker processes it waits for their
                # answers) and says which workers did not answer; TURN's is a plain call.
                unconfirmed = fn(cfg)
                if inspect.isawaitable(unconfirmed):
                    unconfirmed = await unconfirmed
            except (CertificateError, ConfigError, OSError, ValueError) as exc:
                kept = f"; {' and '.join(took)} took the new one" if took else ""
                return (
                    f"{name}: certificate not reloaded, the old one stays in service{kept}: {exc} "
                    "(a file changed while it was read: reload again once it is complete)"
                )
            took.append(name)
            if unconfirmed:
                failed.append(f"{name}: new certificate not confirmed: {unconfirmed}")
        for name, part, method in (
            ("guard", self.guard, "reload"),  # first: the proxy reads its ban_status
            ("proxy", self.proxy, "reload_config"),
            ("turn", self.turn, "reload_config"),
            ("admin", self.admin, "reload"),
            ("cluster", self.cluster, "reload"),
        ):
            fn = getattr(part, method, None)
            if fn is None:
                continue
            try:
                fn(cfg)
            except (CertificateError, ConfigError, OSError, ValueError) as exc:
                # Checked above, so only a file changed in between gets here: the other parts
                # take the new configuration, and the reload is reported as not whole.
                failed.append(f"{name} kept its old settings ({exc})")
        self.cfg = cfg
        self.drain.grace = cfg.proxy.drain_grace
        self.drain.timeout = cfg.proxy.drain_timeout
        if failed:
            return "applied only in part: " + "; ".join(failed) + " (reload again)"
        return ""

    # -- drain (confedge/drain.py) ------------------------------------------------------------

    def start_drain(self) -> None:
        """SIGUSR1 or `confedge drain`: stop taking new users, let the calls end, then exit."""
        loop = asyncio.get_running_loop()
        if not self.drain.start(loop.time()):
            log.info("drain: already %s", self.drain.phase.value)
            self._drain_result(False, f"already {self.drain.phase.value}, nothing changed")
            return
        self.state = "draining"  # published to the other instances (cluster registry)
        if self.proxy is not None:
            self.proxy.set_drain(Phase.DRAINING.value)
        if self.turn is not None:
            # New Allocates get 300 to turn.alternate_server (508 without one); the allocations
            # left are counted by drain_left() below, the future it returns is not needed.
            self.turn.start_drain()
        log.warning(
            "drain: health endpoint says draining; listeners close in %g s, exit when nothing "
            "is left or after %g s",
            self.drain.grace,
            self.drain.timeout,
        )
        self._drain_task = loop.create_task(self._drain_loop())
        self._drain_result(True)

    def cancel_drain(self) -> None:
        """SIGUSR2 or `confedge drain --cancel`: back to service, listeners open again."""
        if not self.drain.cancel():
            log.info("drain: nothing to cancel (%s)", self.drain.phase.value)
            self._drain_result(False, f"nothing to cancel: it is {self.drain.phase.value}")
            return
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        self.state = "serving"
        if self.proxy is not None:
            self.proxy.set_drain(Phase.SERVING.value)
        if self.turn is not None:
            self.turn.cancel_drain()
        log.warning("drain cancelled: serving again")
        self.notifier.send(STATUS="running; drain cancelled")
        self._drain_result(True)

    def _drain_result(self, done: bool, reason: str = "") -> None:
        """For `confedge drain` (opscli): what the signal it sent did."""
        from confedge.opscli import write_drain_result

        write_drain_result(self.cfg.server.state_dir, done, self.drain.phase.value, reason)

    def drain_left(self) -> dict[str, int]:
        """What a drain still waits for: client connections and TURN allocations."""
        out = {"proxy_connections": 0, "turn_allocations": 0}
        if self.proxy is not None:
            out["proxy_connections"] = self.proxy.left()
        if self.turn is not None and self.turn.core is not None:
            out["turn_allocations"] = len(self.turn.core.allocations)
        return out

    def drain_status(self) -> dict[str, Any]:
        """For the status page and /metrics: the phase, what is left, the time left."""
        out: dict[str, Any] = {"phase": self.drain.phase.value}
        if self.drain.phase is not Phase.SERVING:
            out.update(self.drain_left())
            out.update(self.drain.remaining(asyncio.get_running_loop().time()))
        return out

    async def _drain_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            left = self.drain_left()
            action = self.drain.tick(loop.time(), sum(left.values()))
            if action is DrainAction.CLOSE_LISTENERS and self.proxy is not None:
                self.proxy.set_drain(Phase.CLOSING.value)
                log.warning("drain: listeners closed; waiting for %s", _left_text(left))
            elif action is DrainAction.EXIT:
                log.warning("drain: done (%s left); stopping", _left_text(left))
                if self.finished is not None and not self.finished.done():
                    self.finished.set_result("drained")
                return
            self.notifier.send(STATUS=f"draining ({self.drain.phase.value}): {_left_text(left)}")
            await asyncio.sleep(DRAIN_TICK)

    async def close(self) -> None:
        await self.notifier.stopping()
        task, self._reload_task = self._reload_task, None
        if task is not None and not task.done():
            # Stopping during a reload (waiting for a worker's answer): it ends here, and a
            # `confedge reload` waiting for it hears so rather than nothing.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.config_path is not None:
                from confedge.opscli import write_reload_result

                write_reload_result(
                    self.cfg.server.state_dir, False, "confedge is stopping: reload not finished"
                )
        while self.parts:
            name, part = self.parts.pop()
            try:
                await part.close()
            except Exception:
                log.exception("error while stopping %s", name)
            else:
                log.info("%s stopped", name)


async def wait_for_signal(
    on_hup: Callable[[], None] | None = None,
    *,
    handlers: dict[signal.Signals, Callable[[], None]] | None = None,
    until: asyncio.Future[str] | None = None,
) -> str:
    """Block until SIGINT or SIGTERM (return the signal's name) or until `until` is done
    (return its result: "drained"). SIGHUP calls `on_hup`; `handlers` maps more signals
    (SIGUSR1 drain, SIGUSR2 cancel) to their calls."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not fut.done():
            fut.set_result(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)
    extra = dict(handlers or {})
    if on_hup is not None:
        extra[signal.SIGHUP] = on_hup
    for sig, call in extra.items():
        loop.add_signal_handler(sig, call)
    waits: list[asyncio.Future[str]] = [fut] if until is None else [fut, until]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        # Stopping now. Removing a handler restores the signal's default action, and for
        # SIGHUP, SIGUSR1, SIGUSR2 and SIGTERM that is to kill the process: a reload, a drain
        # or a second stop arriving while the parts close (`confedge cert install` from a
        # renewal hook, `confedge drain` from a script) would end it mid-stop, with the guard
        # not flushed, the pid file left behind and a failed exit status. They are ignored,
        # with one line each, until the process exits. SIGINT stays an operator's way out.
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)
        said: set[signal.Signals] = set()
        for sig in (signal.SIGTERM, *extra):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, _ignored_while_stopping, sig, said)


def _ignored_while_stopping(sig: signal.Signals, said: set[signal.Signals]) -> None:
    if sig not in said:
        said.add(sig)
        log.warning("%s ignored: stopping", sig.name)
