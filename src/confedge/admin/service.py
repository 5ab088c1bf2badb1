"""AdminService: the management listener as one runtime component (start/close/info).

It binds ``server.internal_address:management.port`` only (SPEC §1: management only on the
internal address), refuses peers outside ``management.networks`` at accept, and answers:

=================  ======================================================================
``/status``        HTML page for an operator (refreshes itself every 5 s)
``/status.json``   the same snapshot as JSON, for scripts
``/metrics``       Prometheus text exposition format
``/healthz``       200 "ok" while the process serves (a liveness probe)
``/``              302 to /status
=================  ======================================================================

Read-only: there is no write API; bans are managed with ``confedge bans``.
``management.enabled = false`` switches it off; ``management.port = 0`` binds an ephemeral port
(what the tests use), reported by :meth:`info`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
from typing import Any

from confedge.admin.http import AccessList, AdminConnection, AdminServer, Limits, Response
from confedge.admin.render import (
    METRICS_CONTENT_TYPE,
    render_html,
    render_json,
    render_metrics,
)
from confedge.admin.snapshot import RuntimeView, StatusSource
from confedge.config import Config

__all__ = ["AdminService"]

log = logging.getLogger("confedge.admin")


def _url(host: str, port: int, path: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}{path}"


class AdminService:
    """The management listener of SPEC §1 (see the module docstring)."""

    def __init__(self, cfg: Config, runtime: RuntimeView, *, limits: Limits | None = None) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.limits = limits or Limits()
        self.port = 0
        self.source: StatusSource | None = None
        self.http: AdminServer | None = None
        self._server: asyncio.AbstractServer | None = None

    @property
    def host(self) -> str:
        return self.cfg.server.internal_address

    @property
    def url(self) -> str:
        """The status page's URL (valid after start())."""
        return _url(self.host, self.port, "/status")

    def info(self) -> dict[str, str]:
        """For `confedge demo --json` (SPEC §8 key "status")."""
        return {"status": self.url}

    async def start(self) -> None:
        cfg = self.cfg
        m = cfg.management
        self._warn_if_wide()
        s = cfg.server
        names = {s.hostname, s.fqdn, "localhost", *m.allowed_hosts}
        self.http = AdminServer(
            AccessList(m.networks), self.route, allowed_hosts=names, limits=self.limits
        )
        loop = asyncio.get_running_loop()
        http = self.http
        try:
            self._server = await loop.create_server(
                lambda: AdminConnection(http),
                host=self.host,
                port=m.port,
                reuse_address=True,
                backlog=128,
            )
        except OSError as exc:
            why = "address in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise OSError(
                exc.errno,
                f"cannot listen on {self.host}:{m.port} for management ({why}); "
                "change management.port or set management.enabled = false",
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        self.source = StatusSource(cfg, self.runtime, management_url=self.url)
        self.source.attach()
        log.info(
            "management listening on %s (from %s)", self.url, ", ".join(m.networks) or "nobody"
        )

    def reload(self, cfg: Config) -> None:
        """A reloaded configuration: management networks and Host names apply to the next
        connection; the status page shows the new configuration (and checks the new node
        list itself when the proxy runs in worker processes). The port is restart-only."""
        self.cfg = cfg
        self._warn_if_wide()
        if self.http is not None:
            m, s = cfg.management, cfg.server
            self.http.access = AccessList(m.networks)
            names = {s.hostname, s.fqdn, "localhost", *m.allowed_hosts}
            self.http.allowed_hosts = frozenset(h.lower().rstrip(".") for h in names)
        if self.source is not None:
            old, self.source = self.source, StatusSource(cfg, self.runtime, management_url=self.url)
            self.source.started = old.started
            self.source.attach()
            asyncio.get_running_loop().create_task(old.detach())

    def _warn_if_wide(self) -> None:
        m, s = self.cfg.management, self.cfg.server
        if any(ipaddress.ip_network(n).prefixlen == 0 for n in m.networks):
            log.warning(
                "management.networks admits every address (%s): the status page and metrics "
                "are readable by anyone who can reach %s:%d",
                ", ".join(m.networks),
                s.internal_address,
                m.port,
            )
        if ipaddress.ip_address(s.internal_address).is_unspecified:
            log.warning(
                "server.internal_address is %s: the management listener is on every interface",
                s.internal_address,
            )
        if not m.networks:
            log.warning("management.networks is empty: every management connection is refused")

    async def close(self) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            srv.close()
        if self.http is not None:
            for conn in list(self.http.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        if srv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2.0)
        if self.source is not None:
            await self.source.detach()
            self.source = None

    # -- routing --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        assert self.source is not None and self.http is not None
        snap = self.source.snapshot()
        snap["management"]["refused_connections"] = self.http.refused
        return snap

    def route(self, path: str) -> Response:
        if path == "/healthz":
            return Response(200, b"ok")
        if path == "/status":
            return Response(200, render_html(self.snapshot()), "text/html; charset=utf-8")
        if path == "/status.json":
            return Response(200, render_json(self.snapshot()), "application/json")
        if path == "/metrics":
            return Response(200, render_metrics(self.snapshot()), METRICS_CONTENT_TYPE)
        if path == "/":
            return Response(302, b"see /status\n", headers=(("Location", "/status"),))
        return Response(404, b"not found; try /status, /status.json, /metrics or /healthz\n")
