"""Snapshot -> bytes: the HTML status page, its JSON twin and the Prometheus text exposition.

Pure functions of the plain-data snapshot (snapshot.py), so each output format is tested on
its own without sockets, and the three never disagree.

Everything that comes from outside the program (ban reasons, node URLs, host names) is escaped
for its context: ``html.escape`` on the page, the exposition format's label escaping in
/metrics. The page needs no script: it refreshes itself with ``<meta http-equiv="refresh">``,
so the management listener can send ``Content-Security-Policy: default-src 'none'``.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Iterable
from typing import Any

from confedge.proxy.health import LATENCY_BUCKETS

__all__ = [
    "METRICS_CONTENT_TYPE",
    "REFRESH_SECONDS",
    "render_html",
    "render_json",
    "render_metrics",
]

REFRESH_SECONDS = 5
HTML_BAN_LIMIT = 200  # rows on the page; the JSON has up to snapshot.BAN_LIMIT

# Prometheus text exposition format, version 0.0.4 (what every scraper accepts).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DRAIN_PHASES = ("serving", "draining", "closing", "drained")  # confedge/drain.py Phase


# -- JSON ---------------------------------------------------------------------------------------


def render_json(snap: dict[str, Any]) -> bytes:
    return json.dumps(snap, indent=2, allow_nan=False).encode() + b"\n"


# -- Prometheus text format -----------------------------------------------------------------------


def _label_value(v: str) -> str:
    # Exposition format: in label values, backslash, double quote and line feed are escaped.
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


class _Metrics:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        doc: str,
        samples: Iterable[tuple[dict[str, str], float | int | None]],
    ) -> None:
        """One metric family; samples whose value is None (unknown) are left out, and a
        family with no sample is not written at all (absent, not zero)."""
        rows = [(labels, v) for labels, v in samples if v is not None]
        if not rows:
            return
        self.lines.append(f"# HELP {name} {doc.replace(chr(92), chr(92) * 2)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, v in rows:
            if labels:
                inner = ",".join(f'{k}="{_label_value(val)}"' for k, val in labels.items())
                self.lines.append(f"{name}{{{inner}}} {_number(v)}")
            else:
                self.lines.append(f"{name} {_number(v)}")

    def histogram(
        self, name: str, doc: str, bounds: Iterable[float], rows: dict[str, list[float]]
    ) -> None:
        """A histogram family per node: `rows` maps node -> [count per bucket (not
        cumulative) ..., +Inf-free total count, sum] (WorkerRuntime.latency_row)."""
        if not rows:
            return
        les = [_number(b) for b in bounds]
        self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} histogram")
        for node, h in sorted(rows.items()):
            if len(h) != len(les) + 2:
                continue
            label = f'node="{_label_value(node)}"'
            running = 0.0
            for le, count in zip(les, h, strict=False):
                running += count
                self.lines.append(f'{name}_bucket{{{label},le="{le}"}} {_number(running)}')
            self.lines.append(f'{name}_bucket{{{label},le="+Inf"}} {_number(h[-2])}')
            self.lines.append(f"{name}_sum{{{label}}} {_number(h[-1])}")
            self.lines.append(f"{name}_count{{{label}}} {_number(h[-2])}")

    def one(self, name: str, kind: str, doc: str, value: float | int | None) -> None:
        self.family(name, kind, doc, [({}, value)])


def render_metrics(snap: dict[str, Any]) -> bytes:
    m = _Metrics()
    m.family(
        "confedge_build_info",
        "gauge",
        "confedge version (always 1)",
        [({"version": str(snap["version"])}, 1)],
    )
    m.one(
        "confedge_start_time_seconds",
        "gauge",
        "When the runtime started (Unix time)",
        snap["started"],
    )
    m.one("confedge_uptime_seconds", "gauge", "Seconds since the runtime started", snap["uptime"])
    m.family(
        "confedge_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "When each certificate confedge serves expires (Unix time; alert on it minus time())",
        [
            ({"certificate": c["certificate"], "subject": c["subject"]}, c["not_after"])
            for c in snap.get("tls", [])
            if "not_after" in c
        ],
    )

    reload = snap.get("reload")
    if reload is not None:
        m.one(
            "confedge_config_last_reload_successful",
            "gauge",
            "1 if the last reload (SIGHUP, confedge reload) was applied, 0 if it was refused",
            1 if reload["ok"] else 0,
        )
        m.one(
            "confedge_config_last_reload_time_seconds",
            "gauge",
            "When the last reload was asked for (Unix time)",
            reload["time"],
        )
    drain = snap.get("drain") or {"phase": "serving"}
    m.family(
        "confedge_drain_state",
        "gauge",
        "Drain phase (1 for the current one): serving, draining (grace), closing, drained",
        [({"phase": ph}, 1 if drain["phase"] == ph else 0) for ph in DRAIN_PHASES],
    )
    m.family(
        "confedge_drain_left",
        "gauge",
        "What a drain still waits for: proxy client connections and TURN allocations",
        [
            ({"what": k}, drain.get(k))
            for k in ("proxy_connections", "turn_allocations")
            if k in drain
        ],
    )
    m.one(
        "confedge_drain_deadline_seconds",
        "gauge",
        "Seconds until the drain's deadline (proxy.drain_timeout)",
        drain.get("deadline_left"),
    )

    proxy = snap["proxy"]
    if proxy.get("enabled"):
        nodes = proxy["nodes"]
        known = [n for n in nodes if n["state"] is not None]
        m.family(
            "confedge_proxy_node_up",
            "gauge",
            "1 if the node gets new requests (health state up), else 0",
            [({"node": n["node"]}, 1 if n["state"] == "up" else 0) for n in known],
        )
        m.family(
            "confedge_proxy_node_state",
            "gauge",
            "Health state of each node (1 for the current state)",
            [
                ({"node": n["node"], "state": s}, 1 if n["state"] == s else 0)
                for n in known
                for s in ("up", "down", "maintenance")
            ],
        )
        m.family(
            "confedge_proxy_node_requests_in_flight",
            "gauge",
            "Requests being answered by each node now",
            [({"node": n["node"]}, n.get("in_flight")) for n in nodes],
        )
        m.family(
            "confedge_proxy_node_idle_connections",
            "gauge",
            "Idle keep-alive connections to each node",
            [({"node": n["node"]}, n.get("idle_connections")) for n in nodes],
        )
        pools = proxy.get("pools") or []
        m.family(
            "confedge_proxy_pool_nodes",
            "gauge",
            'Nodes of each node pool ("default" is proxy.nodes, else the [[proxy.pools]] prefix)',
            [({"pool": q["pool"]}, q["nodes"]) for q in pools],
        )
        m.family(
            "confedge_proxy_pool_nodes_up",
            "gauge",
            "Nodes of each pool that get new requests (health state up)",
            [({"pool": q["pool"]}, q["nodes_up"]) for q in pools],
        )
        m.family(
            "confedge_proxy_pool_requests_total",
            "counter",
            "Requests finished that reached a node of each pool (not static files or refusals)",
            [({"pool": q["pool"]}, q.get("requests")) for q in pools],
        )
        m.family(
            "confedge_proxy_pool_requests_in_flight",
            "gauge",
            "Requests being answered by each pool's nodes now",
            [({"pool": q["pool"]}, q["in_flight"]) for q in pools],
        )
        m.one(
            "confedge_proxy_client_connections",
            "gauge",
            "Open client connections (HTTP and HTTPS)",
            proxy.get("client_connections"),
        )
        m.one(
            "confedge_proxy_upstream_connections",
            "gauge",
            "Open connections to nodes",
            proxy.get("upstream_connections"),
        )
        m.histogram(
            "confedge_proxy_node_latency_seconds",
            "Seconds from sending a request to a node to its response head (connect included)",
            LATENCY_BUCKETS,
            proxy.get("latency") or {},
        )
        m.family(
            "confedge_proxy_guard_decisions_total",
            "counter",
            "Guard decisions about proxied requests (banned, pin_admitted, pin_held_back, "
            "pin_failure, pin_accepted, session_known, session_unknown)",
            [({"decision": k}, v) for k, v in sorted((proxy.get("guard_decisions") or {}).items())],
        )
        m.one(
            "confedge_proxy_sessions",
            "gauge",
            "Proxied exchanges on a node now that are listed on the status page",
            len(proxy["sessions"]) if "sessions" in proxy else None,
        )
        req = proxy.get("requests")
        if req is not None:
            m.family(
                "confedge_proxy_requests_total",
                "counter",
                "Requests answered, by status class (proxied and the proxy's own answers)",
                [({"code": k}, v) for k, v in req.items() if k != "total"],
            )

    turn = snap["turn"]
    if turn.get("enabled"):
        m.one("confedge_turn_allocations", "gauge", "TURN allocations now", turn["allocations"])
        m.family(
            "confedge_turn_relayed_bytes_total",
            "counter",
            "Bytes relayed (payload), by direction",
            [
                ({"direction": "to_peer"}, turn["bytes_to_peer"]),
                ({"direction": "to_client"}, turn["bytes_to_client"]),
            ],
        )
        m.family(
            "confedge_turn_relayed_packets_total",
            "counter",
            "Packets relayed, by direction",
            [
                ({"direction": "to_peer"}, turn["packets_to_peer"]),
                ({"direction": "to_client"}, turn["packets_to_client"]),
            ],
        )
        m.family(
            "confedge_turn_dropped_packets_total",
            "counter",
            "Packets from peers dropped, by reason",
            [
                ({"reason": "no_permission"}, turn["dropped_no_permission"]),
                ({"reason": "bandwidth"}, turn.get("dropped_bandwidth")),
            ],
        )
        _turn_live_metrics(m, turn.get("live") or {})
        _turn_dataplane_metrics(m, turn.get("dataplane") or {})

    guard = snap["guard"]
    m.one(
        "confedge_guard_enabled", "gauge", "1 if the PIN guard is on", 1 if guard["enabled"] else 0
    )
    if guard["enabled"]:
        m.one("confedge_guard_bans", "gauge", "Active bans", guard["bans_total"])
        ok = guard.get("store_ok")
        m.one(
            "confedge_guard_store_up",
            "gauge",
            "1 if the guard store is reachable",
            None if ok is None else (1 if ok else 0),
        )

    from confedge.admin.render_cluster import cluster_metrics

    cluster_metrics(m, snap.get("cluster", {}))

    mgmt = snap["management"]
    m.one(
        "confedge_management_refused_connections_total",
        "counter",
        "Connections to the management listener refused (source outside management.networks, "
        "or connection cap)",
        mgmt.get("refused_connections"),
    )

    p = snap["process"]
    m.one("process_resident_memory_bytes", "gauge", "Resident memory size in bytes", p["rss_bytes"])
    m.one("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes", p["vms_bytes"])
    m.one(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds",
        p["cpu_seconds"],
    )
    m.one(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds",
        p["start_time"],
    )
    m.one("process_open_fds", "gauge", "Number of open file descriptors", p["open_fds"])
    m.one("process_max_fds", "gauge", "Maximum number of open file descriptors", p["max_fds"])
    m.one("confedge_process_threads", "gauge", "Threads of the main process", p["threads"])
    children = p["children"]
    m.one(
        "confedge_children_processes",
        "gauge",
        "Child processes (proxy workers when proxy.workers > 1)",
        len(children),
    )
    if children:
        m.one(
            "confedge_children_resident_memory_bytes",
            "gauge",
            "Resident memory of all child processes, in bytes",
            sum(c["rss_bytes"] or 0 for c in children),
        )
        m.one(
            "confedge_children_cpu_seconds_total",
            "counter",
            "CPU time of the live child processes, in seconds",
            sum(c["cpu_seconds"] or 0.0 for c in children),
        )
    return ("\n".join(m.lines) + "\n").encode()


# -- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h1 small{color:#666;font-weight:normal}
h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.3em 0}th,td{padding:.2em .8em .2em 0;text-align:left;
vertical-align:top}th{color:#555;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#666}.up{color:#0a7d28;font-weight:600}.down{color:#c0161d;font-weight:600}
.maintenance{color:#b36b00;font-weight:600}.unknown{color:#666}pre{background:#f0f0f0;padding:.6em;
overflow:auto}code{font-size:.95em}
"""


def _e(v: object) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _utc(t: float | None) -> str:
    if t is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    except (OverflowError, OSError, ValueError):  # a stored expiry beyond any calendar
        return "never"


def duration(seconds: float | None) -> str:
    """3725 -> "1h 2m"; 42.4 -> "42s": the two largest units are enough for a status page."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or (unit == "s" and not parts):
            parts.append(f"{s // size}{unit}")
            s %= size
    return " ".join(parts[:2])


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _table(head: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def _kv(pairs: list[tuple[str, str]]) -> str:
    return (
        "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>"
    )


def _proxy_html(p: dict[str, Any], now: float) -> str:
    if not p.get("enabled"):
        return "<p>The proxy is off (proxy.enabled = false).</p>"
    pairs = [(k, f"<code>{_e(v)}</code>") for k, v in p["listeners"].items()]
    pairs.append(("balance", _e(p["balance"])))
    workers = _e(p["workers"])
    if p.get("workers_reporting") is not None:
        # Counters below are the workers' reports (each second), summed.
        workers += f" ({_e(p['workers_reporting'])} reporting)"
    pairs.append(("workers", workers))
    if p.get("client_connections") is not None:
        pairs.append(("client connections", _e(p["client_connections"])))
        pairs.append(("node connections", _e(p["upstream_connections"])))
    req = p.get("requests")
    if req is not None:
        classes = ", ".join(f"{k}: {v}" for k, v in req.items() if k != "total" and v)
        pairs.append(
            ("requests answered", _e(f"{req['total']}" + (f" ({classes})" if classes else "")))
        )
    out = [_kv(pairs)]
    if p["health_source"] == "management":
        out.append(
            '<p class="meta">Node health from this listener\'s own status checks (the proxy '
            "workers run in separate processes).</p>"
        )
    counters = any("in_flight" in n for n in p["nodes"])  # once the proxy's counters are known
    pools = p.get("pools") or []
    if len(pools) > 1:  # [[proxy.pools]]: one row per pool, and a pool column for the nodes
        prows = [
            [
                f"<code>{_e(q['pool'])}</code>",
                _e(q["balance"]),
                _e(q["nodes"]),
                _e("-" if q["nodes_up"] is None else q["nodes_up"]),
                _e("-" if q["in_flight"] is None else q["in_flight"]),
                _e("-" if q.get("requests") is None else q["requests"]),
            ]
            for q in pools
        ]
        head = ["pool", "balance", "nodes", "up", "in flight", "requests"]
        out.append(_table(head, prows, {2, 3, 4, 5}))
    rows = []
    for n in p["nodes"]:
        state = n["state"] or "unknown"
        since = n["since"]
        row = [
            *([f"<code>{_e(n.get('pool', ''))}</code>"] if len(pools) > 1 else []),
            f"<code>{_e(n['node'])}</code>",
            f'<span class="{_e(state)}">{_e(state)}</span>',
            _e(f"{duration(now - since)} ago" if since is not None else "start"),
            _e(n["reason"] or ""),
        ]
        if counters:
            row += [_e(n.get("in_flight", "-")), _e(n.get("idle_connections", "-"))]
        rows.append(row)
    head = ["node", "state", "since", "last change"]
    if counters:
        head += ["in flight", "idle connections"]
    if len(pools) > 1:
        head.insert(0, "pool")
        out.append(_table(head, rows, {5, 6}))
    else:
        out.append(_table(head, rows, {4, 5}))
    return "".join(out)


def _turn_dataplane_metrics(m: _Metrics, dp: dict[str, Any]) -> None:
    """The native data plane: relay threads, whether they are folded into one (docs/TURN.md
    "Folding") and how often that changed, and packets it dropped, by cause."""
    if "threads" not in dp:
        return
    m.one(
        "confedge_turn_relay_threads",
        "gauge",
        "Relay threads of the native data plane",
        dp["threads"],
    )
    m.one(
        "confedge_turn_relay_threads_folded",
        "gauge",
        "1 while one relay thread serves every thread's sockets (moderate rates)",
        dp.get("folded", 0),
    )
    m.one(
        "confedge_turn_requests_steered",
        "gauge",
        "1 when TURN requests reach the control plane on their own socket (the kernel's "
        "steering program), 0 when through the relay threads",
        dp.get("steered", 0),
    )
    m.family(
        "confedge_turn_relay_fold_changes_total",
        "counter",
        "Times the relay threads folded into one, and split again",
        [({"to": "folded"}, dp.get("folds", 0)), ({"to": "split"}, dp.get("unfolds", 0))],
    )
    drops = dp.get("drops") or {}
    m.family(
        "confedge_turn_dataplane_dropped_packets_total",
        "counter",
        "Packets the native data plane dropped, by cause (kernel_*: socket receive buffers full)",
        [({"reason": k}, v) for k, v in sorted(drops.items())],
    )


def _turn_live_metrics(m: _Metrics, live: dict[str, Any]) -> None:
    """TURN's live figures (TurnService.live): throughput, the busiest allocations' counters
    (updated while they live), answers by cause, lifetimes, drain state."""
    if not live:
        return
    tp = live["throughput"]
    m.family(
        "confedge_turn_relay_throughput_bytes_per_second",
        "gauge",
        "Bytes per second relayed over the last second, by direction",
        [({"direction": "to_peer"}, tp["to_peer"]), ({"direction": "to_client"}, tp["to_client"])],
    )
    top = live["top"]
    keys = [{"allocation": str(a["id"]), "user": a["user"], "client": a["client"]} for a in top]

    def per_direction(field: str) -> list[tuple[dict[str, str], float | int | None]]:
        return [
            ({**k, "direction": d}, a[f"{field}_{d}"])
            for k, a in zip(keys, top, strict=True)
            for d in ("to_peer", "to_client")
        ]

    m.family(
        "confedge_turn_allocation_bytes_total",
        "counter",
        "Bytes relayed by each of the busiest live allocations, by direction",
        per_direction("bytes"),
    )
    m.family(
        "confedge_turn_allocation_throughput_bytes_per_second",
        "gauge",
        "Bytes per second relayed by each of the busiest live allocations, by direction",
        per_direction("rate"),
    )
    m.family(
        "confedge_turn_allocation_dropped_bandwidth_total",
        "counter",
        "Packets of each of the busiest live allocations dropped over a bandwidth cap",
        [(k, a["dropped_bandwidth"]) for k, a in zip(keys, top, strict=True)],
    )
    m.family(
        "confedge_turn_error_responses_total",
        "counter",
        "TURN error answers by code and cause (code 0: left unanswered, unauth_budget spent)",
        [({"code": str(code), "cause": cause}, n) for code, cause, n in live["answers"]],
    )
    life = live["lifetimes"]
    name = "confedge_turn_allocation_lifetime_seconds"
    m.lines.append(f"# HELP {name} Lifetimes of ended TURN allocations")
    m.lines.append(f"# TYPE {name} histogram")
    for le, n in life["buckets"]:
        m.lines.append(f'{name}_bucket{{le="{le if isinstance(le, str) else _number(le)}"}} {n}')
    m.lines.append(f"{name}_sum {_number(life['sum'])}")
    m.lines.append(f"{name}_count {life['count']}")
    drain = live["drain"]
    m.one(
        "confedge_turn_draining", "gauge", "1 while TURN is draining", 1 if drain["draining"] else 0
    )
    m.family(
        "confedge_turn_drain_turned_away_total",
        "counter",
        "Allocates turned away while draining, by answer",
        [
            ({"answer": "300"}, drain.get("redirected")),
            ({"answer": "508"}, drain.get("refused")),
        ],
    )


def _rate(bps: float) -> str:
    """bytes/s as kbit/s or Mbit/s."""
    bits = bps * 8
    return f"{bits / 1e6:.2f} Mbit/s" if bits >= 1e6 else f"{bits / 1e3:.0f} kbit/s"


def _turn_live_html(t: dict[str, Any]) -> str:
    """The TURN section's live part: throughput, caps, drain state, busiest allocations."""
    live = t.get("live") if t.get("enabled") else None
    if not live:
        return ""
    tp, bw, drain = live["throughput"], live["bandwidth"], live["drain"]

    def cap(v: int) -> str:
        return "unlimited" if not v else _rate(v)

    pairs = [
        (
            "relaying now",
            _e(f"{_rate(tp['to_peer'])} to peers, {_rate(tp['to_client'])} to clients"),
        ),
        (
            "bandwidth caps",
            _e(
                f"per allocation {cap(bw['per_allocation'])}, per user {cap(bw['per_user'])}, "
                f"total {cap(bw['total'])} (policy {bw['policy']}), each direction"
            ),
        ),
    ]
    if drain.get("draining"):
        where = drain.get("alternate") or "none: new allocations get 508"
        pairs.append(
            (
                "draining",
                _e(
                    f"since {duration(drain['since'])}, {drain['allocations']} allocations left, "
                    f"alternate {where}, {drain['redirected']} redirected, "
                    f"{drain['refused']} refused"
                ),
            )
        )
    rows = [
        [
            _e(a["user"]),
            f"<code>{_e(a['client'])}</code>/{_e(a['transport'])}",
            f"<code>{_e(a['relay'])}</code>",
            _e(_rate(a["rate_to_peer"])),
            _e(_rate(a["rate_to_client"])),
            _e(human_bytes(a["bytes_to_peer"] + a["bytes_to_client"])),
            _e(a["dropped_bandwidth"]),
            _e(duration(a["age"])),
        ]
        for a in live["top"]
    ]
    table = (
        "<h3>Busiest allocations now</h3>"
        + _table(
            ["user", "client", "relay", "to peer", "to client", "bytes", "over cap", "age"],
            rows,
            {3, 4, 5, 6},
        )
        if rows
        else ""
    )
    return _kv(pairs) + table


def _turn_html(t: dict[str, Any]) -> str:
    if not t.get("enabled"):
        return "<p>TURN is off (turn.enabled = false).</p>"
    listeners = ", ".join(
        f"{_e(x['transport'])} <code>{_e(x['address'])}</code>" for x in t["listeners"]
    )
    relay = t["relay"]
    pairs = [
        ("mode", _e(t["mode"])),
        ("realm", _e(t["realm"])),
        ("listeners", listeners),
        (
            "relay",
            f"<code>{_e(' '.join(relay['addresses']))}</code> "
            f"ports <code>{_e(relay['ports'])}</code>",
        ),
        ("allocations", _e(t["allocations"])),
    ]
    dp = t.get("dataplane")
    if dp:
        plane = _e(dp["backend"])
        if "threads" in dp:
            plane += f", {_e(dp['threads'])} relay threads"
            if dp.get("folded"):
                plane += " (folded into one: moderate traffic)"
            plane += (
                ", requests on the control socket"
                if dp.get("steered")
                else ", requests through the relay threads"
            )
            dropped = sum((dp.get("drops") or {}).values())
            plane += f", {_e(dropped)} packets dropped"
        pairs.append(("data plane", plane))
    traffic = _table(
        ["direction", "bytes", "packets"],
        [
            [
                "client &rarr; peer",
                _e(f"{human_bytes(t['bytes_to_peer'])} ({t['bytes_to_peer']})"),
                _e(t["packets_to_peer"]),
            ],
            [
                "peer &rarr; client",
                _e(f"{human_bytes(t['bytes_to_client'])} ({t['bytes_to_client']})"),
                _e(t["packets_to_client"]),
            ],
            ["dropped (no permission)", "", _e(t["dropped_no_permission"])],
        ],
        {1, 2},
    )
    return _kv(pairs) + traffic


def _guard_html(g: dict[str, Any], now: float) -> str:
    if not g["enabled"]:
        return "<p>The guard is off (guard.enabled = false).</p>"
    store = _e(g["store"] or "-")
    if g["store_ok"] is False:
        store += ' <span class="down">unreachable</span>'
    pairs = [
        ("store", store),
        (
            "rule",
            _e(
                f"{g['maxretry']} failures within {duration(g['findtime'])} "
                f"ban for {duration(g['bantime'])}"
            ),
        ),
        ("active bans", _e(g["bans_total"])),
    ]
    out = [_kv(pairs)]
    bans = g["bans"][:HTML_BAN_LIMIT]
    if bans:
        rows = [
            [
                f"<code>{_e(b['source'])}</code>",
                _e(b["reason"]),
                _e(b["count"]),
                _e(b["failures"]),
                _e(f"in {duration(b['expires'] - now)}"),
                _e(_utc(b["expires"])),
            ]
            for b in bans
        ]
        out.append(_table(["source", "reason", "ban #", "failures", "expires", "at"], rows, {2, 3}))
        if g["bans_total"] > len(bans):
            out.append(
                f'<p class="meta">{_e(g["bans_total"] - len(bans))} more; '
                "<code>confedge bans list</code> shows them all.</p>"
            )
    return "".join(out)


def _process_html(p: dict[str, Any]) -> str:
    pairs = [
        ("pid", _e(p["pid"])),
        ("memory (RSS)", _e(human_bytes(p["rss_bytes"]))),
        ("CPU time", _e("-" if p["cpu_seconds"] is None else f"{p['cpu_seconds']:.1f} s")),
        ("threads", _e(p["threads"] if p["threads"] is not None else "-")),
        (
            "open files",
            _e(f"{p['open_fds']} of {p['max_fds']}" if p["open_fds"] is not None else "-"),
        ),
    ]
    for c in p["children"]:
        pairs.append(
            (
                f"child {c['pid']}",
                _e(f"RSS {human_bytes(c['rss_bytes'])}, CPU {c['cpu_seconds'] or 0:.1f} s"),
            )
        )
    return _kv(pairs)


CERT_SOON = 30 * 86400  # expiry shown as a warning this close (certbot renews at 30 days)
CERT_URGENT = 7 * 86400


def _tls_html(certs: list[dict[str, Any]], now: float) -> str:
    """The certificates served, each with its expiry: orange within 30 days (a renewal that
    should have happened), red within 7 or past it."""
    if not certs:
        return "<p>None yet (one is generated when the proxy or TURN over TLS starts).</p>"
    rows = []
    for c in certs:
        if "not_after" not in c:
            rows.append([_e(c["certificate"]), f'<span class="down">{_e(c["problem"])}</span>',
                         "", "", ""])  # fmt: skip
            continue
        left = c["not_after"] - now
        if left <= 0:
            expiry = f'<span class="down">expired {_e(duration(-left))} ago</span>'
        elif left < CERT_SOON:
            css = "down" if left < CERT_URGENT else "maintenance"
            expiry = f'<span class="{css}">in {_e(duration(left))}</span>'
        else:
            expiry = f"in {_e(duration(left))}"
        rows.append(
            [
                _e(c["certificate"]),
                _e(c["subject"]),
                _e(", ".join(c["names"])),
                _e(c["issuer"]),
                f"{expiry} ({_e(_utc(c['not_after']))})",
            ]
        )
    return _table(["certificate", "subject", "names", "issuer", "expires"], rows)


def _cluster_html(c: dict[str, Any], now: float) -> str:
    from confedge.admin.render_cluster import cluster_html

    return cluster_html(c, now)


def _reload_row(r: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The last reload: when, and the reason when it was refused."""
    if r is None:
        return []
    when = _e(_utc(r["time"]))
    text = f"applied at {when}" if r["ok"] else f"<b>refused</b> at {when}: {_e(r['reason'])}"
    return [("last reload", text)]


def _drain_html(d: dict[str, Any]) -> str:
    """A banner while draining: the phase and what is left (confedge/drain.py)."""
    if d.get("phase", "serving") == "serving":
        return ""
    pairs = [("phase", f"<b>{_e(d['phase'])}</b>")]
    if "grace_left" in d:
        pairs.append(("listeners close in", _e(duration(d["grace_left"]))))
        pairs.append(("deadline in", _e(duration(d["deadline_left"]))))
    for key in ("proxy_connections", "turn_allocations"):
        if key in d:
            pairs.append((key.replace("_", " ") + " left", _e(d[key])))
    return "<h2>Drain</h2>" + _kv(pairs)


def _sessions_html(p: dict[str, Any]) -> str:
    """Which node each long-running proxied session (SSE, WebSocket, request) is on."""
    rows = p.get("sessions")
    if not rows:
        return ""
    body = [
        [
            _e(r["client"]),
            f"<code>{_e(r['node'])}</code>",
            _e(r["kind"]),
            f"<code>{_e(r['path'])}</code>",
            _e(duration(r["age"])),
        ]
        for r in rows
    ]
    return "<h3>Sessions on nodes (longest first)</h3>" + _table(
        ["client", "node", "kind", "path", "for"], body
    )


def render_html(snap: dict[str, Any]) -> bytes:
    now = snap["time"]
    srv = snap["server"]
    title = f"confedge status: {srv['fqdn']}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>confedge <small>{_e(srv['fqdn'])}</small></h1>",
        '<p class="meta">'
        f"version {_e(snap['version'])} &middot; up {_e(duration(snap['uptime']))} "
        f"(since {_e(_utc(snap['started']))}) &middot; at {_e(_utc(now))} &middot; refreshes every "
        f'{REFRESH_SECONDS} s &middot; <a href="/status.json">JSON</a> &middot; '
        '<a href="/metrics">metrics</a></p>',
        "<h2>Addresses</h2>",
        _kv(
            [
                ("internal", f"<code>{_e(srv['internal_address'])}</code>"),
                ("external", f"<code>{_e(srv['external_address'])}</code>"),
                ("management from", _e(", ".join(snap["management"]["networks"]))),
                *_reload_row(snap.get("reload")),
            ]
        ),
        _drain_html(snap.get("drain") or {"phase": "serving"}),
        "<h2>Certificates</h2>",
        _tls_html(snap.get("tls", []), now),
        "<h2>Proxy</h2>",
        _proxy_html(snap["proxy"], now),
        _sessions_html(snap["proxy"]),
        "<h2>TURN</h2>",
        _turn_html(snap["turn"]) + _turn_live_html(snap["turn"]),
        "<h2>Guard</h2>",
        _guard_html(snap["guard"], now),
        "<h2>Other instances</h2>",
        _cluster_html(snap.get("cluster", {}), now),
        "<h2>Process</h2>",
        _process_html(snap["process"]),
        "<h2>Configuration</h2>",
        "<details><summary>effective configuration (secrets masked)</summary><pre>",
        _e(json.dumps(snap["config"], indent=2)),
        "</pre></details>",
        "</body></html>\n",
    ]
    return "".join(parts).encode()
