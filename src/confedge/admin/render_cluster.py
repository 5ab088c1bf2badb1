"""The cluster registry on the status page and in /metrics (docs/SCALING.md).

Kept beside render.py rather than inside it so the page's other sections and this one can
change independently; the same plain snapshot (``snap["cluster"]``) feeds both."""

from __future__ import annotations

from typing import Any

from confedge.admin.render import _e, _kv, _Metrics, _table, _utc, duration, human_bytes

__all__ = ["cluster_html", "cluster_metrics"]

HTML_ALLOCATION_LIMIT = 50  # per instance on the page; /status.json has the published list


def cluster_metrics(m: _Metrics, c: dict[str, Any]) -> None:
    if not c.get("enabled"):
        return
    insts = c["instances"]
    m.one("confedge_cluster_store_up", "gauge", "1 if the cluster store answered", c["store_up"])
    m.one(
        "confedge_cluster_instances",
        "gauge",
        "Instances in the registry (this one too)",
        len(insts),
    )
    m.family(
        "confedge_cluster_instance_allocations",
        "gauge",
        "TURN allocations of each instance, as it last published",
        [({"instance": i["instance"]}, i["allocation_count"]) for i in insts],
    )
    m.family(
        "confedge_cluster_instance_age_seconds",
        "gauge",
        "Seconds since each instance last published its record",
        [({"instance": i["instance"]}, round(i["age"], 3)) for i in insts],
    )
    m.family(
        "confedge_cluster_instance_state",
        "gauge",
        "State of each instance (1 for the current state)",
        [
            ({"instance": i["instance"], "state": s}, 1 if i["state"] == s else 0)
            for i in insts
            for s in ("serving", "draining")
        ],
    )


def _alloc_rows(allocs: list[dict[str, Any]], now: float) -> list[list[str]]:
    return [
        [
            f"<code>{_e(a['client'])}</code>",
            f"<code>{_e(a['relay'])}</code>",
            _e(a["username"]),
            _e(duration(now - a["created"])),
            _e(human_bytes(a["bytes_to_peer"])),
            _e(human_bytes(a["bytes_to_client"])),
        ]
        for a in allocs[:HTML_ALLOCATION_LIMIT]
    ]


def cluster_html(c: dict[str, Any], now: float) -> str:
    if not c.get("enabled"):
        return "<p>This instance is alone (cluster.store is empty).</p>"
    store = _e(c["store"])
    if not c["store_up"]:
        store += ' <span class="down">unreachable</span>'
        if c["last_contact"] is not None:
            store += _e(f" (last contact {_utc(c['last_contact'])}; others as of then)")
    pairs = [
        ("this instance", f"<code>{_e(c['instance'])}</code> {_e(c['state'])}"),
        ("store", store),
        ("nonce key", "shared" if c["nonce_key_shared"] else "this instance's own"),
    ]
    rows = [
        [
            f"<code>{_e(i['instance'])}</code>" + (" (this one)" if i["self"] else ""),
            _e(i["state"]),
            f"<code>{_e(i['turn'] or '-')}</code>",
            _e(i["allocation_count"]),
            _e(f"{i['age']:.1f} s ago"),
            "same" if i["same_secret"] else '<span class="down">differs</span>',
        ]
        for i in c["instances"]
    ]
    out = [
        _kv(pairs),
        _table(["instance", "state", "TURN", "allocations", "updated", "REST secret"], rows, {3}),
    ]
    head = ["client", "relay", "username", "age", "to peer", "to client"]
    for i in c["instances"]:
        if i["self"]:
            continue
        out.append(f"<h3>Allocations on {_e(i['instance'])}</h3>")
        if not i["allocations"]:
            out.append("<p>none</p>")
            continue
        out.append(_table(head, _alloc_rows(i["allocations"], now), {4, 5}))
        more = i["allocation_count"] - min(len(i["allocations"]), HTML_ALLOCATION_LIMIT)
        if more > 0:
            out.append(f'<p class="meta">{_e(more)} more (busiest listed first).</p>')
    return "".join(out)
