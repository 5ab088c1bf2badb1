"""HTTPS reverse proxy and load balancer for the conferencing nodes (SPEC §2).

Modules: paths (the canonical path), request (vetting of targets, hosts, methods), balancer
and health (sans-I/O), pages (canned answers), upstream (node connections and pools), server
(client protocol and exchanges), core (per-worker shared state and timers), service (listeners
and worker processes), static and accesslog (static mounts, the reference access log).
"""


def build_kind() -> str:
    """Which build of the hot path runs: "compiled (mypyc)" or "interpreted" (setup.py).

    A wheel build compiles the modules listed under [tool.confedge] compiled in pyproject.toml;
    an editable install or CONFEDGE_PURE=1 leaves them interpreted. Operators see it in the
    start-up log and in `confedge check`, because it changes CPU per request (not behaviour).
    """
    from confedge.proxy import server

    return "compiled (mypyc)" if server.__file__.endswith((".so", ".pyd")) else "interpreted"
