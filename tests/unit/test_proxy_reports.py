"""Worker reports to the main process (proxy/service.py)."""

from __future__ import annotations


def test_worker_report_drops_optional_parts_before_the_counters() -> None:
    """A worker's report must fit one atomic pipe write: with many nodes the sessions list and
    the latency histograms give way, the request counts and gauges stay."""
    from confedge.proxy.service import _STATS_MAX, _report_line

    stats = {
        "requests": {"total": 5, "2xx": 5},
        "client_connections": 3,
        "sessions": [{"client": "198.51.100.1", "node": "n", "path": "/x" * 40}] * 10,
        "latency": {f"10.0.0.{i}:443": [0.0] * 13 for i in range(60)},
    }
    line = _report_line(dict(stats))
    assert len(line) <= _STATS_MAX
    assert b'"requests"' in line and b'"client_connections":3' in line
    assert b'"sessions"' not in line
    small = {"requests": None, "sessions": [], "latency": {}}
    assert _report_line(dict(small)).count(b'"sessions"') == 1  # kept when it fits
