"""HTTPS reverse proxy and load balancer for the conferencing nodes (SPEC §2).

Modules: exchange (the sans-I/O exchange core: one request's state machine, failover policy,
response planning), paths (the canonical path), request (the Request type; vetting of targets,
hosts, methods), balancer and health (sans-I/O), pages (canned answers), server (client
HTTP/1.1 adapter), upstream (node adapter, keep-alive pools), healthcheck (the active check
loop), core (WorkerRuntime: what one worker owns), service (listeners and worker processes),
static and accesslog (static mounts, the reference access log). docs/ARCHITECTURE.md has the
map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confedge.config import Config


def engines(cfg: Config) -> tuple[str, str | None]:
    """What reads HTTP/1.1 heads and what frames HTTP/2 (None: proxy.http2 is off) under `cfg`
    and the CONFEDGE_H1_ENGINE / CONFEDGE_H2_ENGINE overrides, as `confedge check` and the
    start-up log say them. Raises ValueError naming the key when an engine set to "native" is
    not built (both callers refuse to start then)."""
    from confedge.proxy import h1engine, h2engine

    h2 = h2engine.describe(h2engine.choose(cfg.proxy.http2_engine)) if cfg.proxy.http2 else None
    return h1engine.describe(h1engine.choose(cfg.proxy.http1_engine)), h2


def build_kind() -> str:
    """Which build of the hot path runs: "compiled (mypyc)" or "interpreted" (setup.py).

    A wheel build compiles the modules listed under [tool.confedge] compiled in pyproject.toml;
    an editable install or CONFEDGE_PURE=1 leaves them interpreted. Operators see it in the
    start-up log and in `confedge check`, because it changes CPU per request (not behaviour).

    It asks the import system where `proxy.server` would load from (`find_spec` locates the
    file, as `import` would, without executing it), so the status page (admin/) can report
    the build without importing a proxy adapter.
    """
    from importlib.util import find_spec

    spec = find_spec("confedge.proxy.server")
    origin = spec.origin if spec is not None else None
    return "compiled (mypyc)" if origin and origin.endswith((".so", ".pyd")) else "interpreted"
