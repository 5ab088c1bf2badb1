"""The management listener's pure parts: renderers, secret masking, access list, Host check,
refusal-log throttling, /proc reading."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from admin_support import metric, parse_metrics

from confedge.admin.http import AccessList, AdminServer, Response
from confedge.admin.procstats import child_pids, read_proc, self_stat
from confedge.admin.render import (
    duration,
    human_bytes,
    render_html,
    render_json,
    render_metrics,
)
from confedge.admin.snapshot import mask_url, masked_config
from confedge.config import parse_config

NOW = 1_800_000_000.0

SNAP: dict[str, Any] = {
    "version": "0.1.0",
    "time": NOW,
    "started": NOW - 3725,
    "uptime": 3725.0,
    "server": {
        "fqdn": "edge.example.com",
        "internal_address": "10.0.0.5",
        "external_address": "203.0.113.5",
    },
    "management": {
        "url": "http://10.0.0.5:9090/status",
        "networks": ["10.0.0.0/24"],
        "refused_connections": 3,
    },
    "proxy": {
        "enabled": True,
        "listeners": {"https": "https://203.0.113.5/"},
        "workers": 2,
        "balance": "round-robin",
        "health_source": "management",
        "nodes": [
            {"node": "https://10.0.0.11:443", "state": "up", "since": None, "reason": None},
            {
                "node": 'https://evil"node\\:443',
                "state": "down",
                "since": NOW - 75,
                "reason": "2 status checks failed: <script>alert(1)</script>",
            },
            {
                "node": "https://10.0.0.13:443",
                "state": "maintenance",
                "since": NOW - 5,
                "reason": "503",
            },
        ],
        "nodes_up": 1,
        "requests": None,
    },
    "turn": {
        "enabled": True,
        "mode": "permissive",
        "realm": "example.com",
        "listeners": [{"transport": "udp", "address": "10.0.0.5:3478"}],
        "relay": {"addresses": ["203.0.113.5"], "ports": "49152-65535"},
        "allocations": 4,
        "bytes_to_peer": 123456789,
        "packets_to_peer": 1000,
        "bytes_to_client": 42,
        "packets_to_client": 1,
        "dropped_no_permission": 7,
        "dataplane": {
            "backend": "native",
            "threads": 2,
            "folded": 1,
            "folds": 3,
            "unfolds": 2,
            "steered": 1,
            "drops": {"unknown_channel": 5, "kernel_drops_listener": 11},
        },
    },
    "guard": {
        "enabled": True,
        "store": "redis:redis://:****@10.0.0.9:6379/0",
        "store_ok": False,
        "maxretry": 10,
        "findtime": 300.0,
        "bantime": 300.0,
        "bans_total": 1,
        "bans": [
            {
                "source": "198.51.100.7",
                "reason": "10 wrong PINs for <b>meet</b>",
                "count": 2,
                "failures": 10,
                "created": NOW - 10,
                "expires": NOW + 590,
                "remaining": 590.0,
            }
        ],
    },
    "process": {
        "pid": 1234,
        "rss_bytes": 50 * 1024 * 1024,
        "vms_bytes": 100 * 1024 * 1024,
        "cpu_seconds": 12.5,
        "start_time": NOW - 4000,
        "threads": 3,
        "open_fds": 40,
        "max_fds": 1024,
        "children": [
            {"pid": 1300, "rss_bytes": 30_000_000, "cpu_seconds": 2.0},
            {"pid": 1301, "rss_bytes": None, "cpu_seconds": None},
        ],
    },
    "config": {"turn": {"password": "****"}},
}


def test_metrics_parse_and_carry_the_snapshot() -> None:
    fam = parse_metrics(render_metrics(SNAP).decode())
    assert metric(fam, "confedge_turn_allocations") == 4
    assert metric(fam, "confedge_turn_relayed_bytes_total", direction="to_peer") == 123456789
    assert metric(fam, "confedge_turn_dropped_packets_total", reason="no_permission") == 7
    assert metric(fam, "confedge_turn_relay_threads") == 2
    assert metric(fam, "confedge_turn_relay_threads_folded") == 1
    assert metric(fam, "confedge_turn_relay_fold_changes_total", to="split") == 2
    assert metric(fam, "confedge_turn_requests_steered") == 1
    drops = "confedge_turn_dataplane_dropped_packets_total"
    assert metric(fam, drops, reason="kernel_drops_listener") == 11
    assert metric(fam, drops, reason="unknown_channel") == 5
    assert metric(fam, "confedge_proxy_node_up", node="https://10.0.0.11:443") == 1
    # The label value is escaped in the text and reads back as the original.
    assert metric(fam, "confedge_proxy_node_up", node='https://evil\\"node\\\\:443') == 0
    assert (
        metric(fam, "confedge_proxy_node_state", node="https://10.0.0.13:443", state="maintenance")
        == 1
    )
    assert metric(fam, "confedge_guard_bans") == 1
    assert metric(fam, "confedge_guard_store_up") == 0
    assert metric(fam, "confedge_management_refused_connections_total") == 3
    assert metric(fam, "confedge_children_processes") == 2
    assert metric(fam, "confedge_children_resident_memory_bytes") == 30_000_000
    assert metric(fam, "process_resident_memory_bytes") == 50 * 1024 * 1024
    # Unknown is absent, not zero: no counters from out-of-process workers, no in-flight gauge.
    assert "confedge_proxy_requests_total" not in fam
    assert "confedge_proxy_node_requests_in_flight" not in fam
    assert "confedge_proxy_client_connections" not in fam


def test_metrics_with_parts_off() -> None:
    snap = copy.deepcopy(SNAP)
    snap["proxy"] = {"enabled": False}
    snap["turn"] = {"enabled": False}
    snap["guard"] = {"enabled": False}
    snap["process"]["children"] = []
    fam = parse_metrics(render_metrics(snap).decode())
    assert not any(name.startswith(("confedge_turn_", "confedge_proxy_")) for name in fam)
    assert metric(fam, "confedge_guard_enabled") == 0
    assert "confedge_guard_bans" not in fam
    assert metric(fam, "confedge_children_processes") == 0


def test_metrics_with_prometheus_client_parser() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    fams = {f.name: f for f in parser.text_string_to_metric_families(render_metrics(SNAP).decode())}
    node = next(s for s in fams["confedge_proxy_node_up"].samples if s.value == 0)
    assert node.labels["node"] == 'https://evil"node\\:443'
    assert fams["process_cpu_seconds"].type == "counter"


def test_drain_latency_and_sessions_render() -> None:
    """While draining: the phase and what is left on the page and in /metrics; per-node latency
    as a Prometheus histogram (cumulative buckets, +Inf = count); sessions by node, escaped."""
    parser = pytest.importorskip("prometheus_client.parser")
    snap = copy.deepcopy(SNAP)
    snap["drain"] = {
        "phase": "closing",
        "proxy_connections": 2,
        "turn_allocations": 7,
        "grace_left": 0.0,
        "deadline_left": 3500.0,
    }
    # 11 bounds: 3 answers under 5 ms, 1 under 250 ms, 1 over 10 s; 5 in all, 12.6 s in sum.
    snap["proxy"]["latency"] = {"https://10.0.0.11:443": [3, 0, 0, 0, 0, 1] + [0] * 5 + [5, 12.6]}
    snap["proxy"]["sessions"] = [
        {
            "client": "198.51.100.9",
            "node": "10.0.0.11:443",
            "path": "/a/<b>",
            "kind": "sse",
            "age": 90,
        }
    ]
    snap["proxy"]["guard_decisions"] = {"banned": 4}
    fams = {f.name: f for f in parser.text_string_to_metric_families(render_metrics(snap).decode())}
    hist = fams["confedge_proxy_node_latency_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets["0.005"] == 3 and buckets["0.1"] == 3 and buckets["0.25"] == 4
    assert buckets["10.0"] == 4 and buckets["+Inf"] == 5
    assert {s.labels["phase"]: s.value for s in fams["confedge_drain_state"].samples} == {
        "serving": 0,
        "draining": 0,
        "closing": 1,
        "drained": 0,
    }
    left = {s.labels["what"]: s.value for s in fams["confedge_drain_left"].samples}
    assert left == {"proxy_connections": 2, "turn_allocations": 7}
    assert fams["confedge_proxy_guard_decisions"].samples[0].value == 4
    page = render_html(snap).decode()
    assert "<h2>Drain</h2>" in page and "<b>closing</b>" in page
    assert "turn allocations left" in page
    assert "10.0.0.11:443" in page and "/a/&lt;b&gt;" in page and "1m 30s" in page
    assert "<h2>Drain</h2>" not in render_html(SNAP).decode()  # serving: no banner


def test_html_escapes_and_shows_state() -> None:
    page = render_html(SNAP).decode()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>meet</b>" not in page and "&lt;b&gt;meet&lt;/b&gt;" in page
    assert '<span class="down">down</span>' in page
    assert '<span class="maintenance">maintenance</span>' in page
    assert "1m 15s ago" in page  # since the node went down
    assert "198.51.100.7" in page and "in 9m 50s" in page
    assert "unreachable" in page  # the guard store
    assert "own status checks" in page  # health source explained
    assert "in flight" not in page  # no counters from out-of-process workers: no column
    assert "117.7 MiB (123456789)" in page
    assert 'http-equiv="refresh" content="5"' in page
    assert "<script" not in page.replace("&lt;script", "")


def test_json_roundtrip() -> None:
    assert json.loads(render_json(SNAP)) == SNAP


def test_duration_and_bytes() -> None:
    assert duration(0) == "0s"
    assert duration(42.7) == "42s"
    assert duration(3725) == "1h 2m"
    assert duration(90061) == "1d 1h"
    assert duration(-5) == "0s"
    assert duration(None) == "-"
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(None) == "-"


def test_secrets_masked(tmp_path: Path) -> None:
    assert mask_url("redis://:hunter2@10.0.0.9:6379/0") == "redis://:****@10.0.0.9:6379/0"
    assert mask_url("rediss://bob:hunter2@[2001:db8::9]/1") == "rediss://bob:****@[2001:db8::9]/1"
    assert mask_url("redis://10.0.0.9/0") == "redis://10.0.0.9/0"
    assert mask_url("sqlite") == "sqlite"
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "proxy": {"enabled": False},
            "turn": {"mode": "permissive", "secrets": ["rest-secret-1", "rest-secret-2"]},
            "guard": {"store": "redis://:hunter2@10.0.0.9:6379/0"},
        }
    )
    text = json.dumps(masked_config(cfg))
    for secret in ("hunter2", "rest-secret-1", "rest-secret-2"):
        assert secret not in text


def test_access_list() -> None:
    acl = AccessList(["127.0.0.1/32", "10.0.0.0/24", "2001:db8::/64"])
    assert acl.allows("127.0.0.1")
    assert not acl.allows("127.0.0.2")
    assert acl.allows("10.0.0.77")
    assert acl.allows("::ffff:10.0.0.77")  # a dual-stack socket's view of an IPv4 peer
    assert acl.allows("2001:db8::1%eth0")
    assert not acl.allows("2001:db8:1::1")
    assert not acl.allows("unknown")
    assert not AccessList([]).allows("127.0.0.1")


def _server(clock: list[float]) -> AdminServer:
    return AdminServer(
        AccessList(["127.0.0.1/32"]),
        lambda path: Response(200),
        allowed_hosts=["edge", "edge.example.com", "localhost"],
        clock=lambda: clock[0],
    )


def test_host_check() -> None:
    srv = _server([0.0])
    for ok in (
        "10.0.0.5",
        "10.0.0.5:9090",
        "[2001:db8::5]:9090",
        "[::1]",
        "EDGE.example.com.",
        "localhost:9090",
    ):
        assert srv.host_ok(ok), ok
    for bad in (
        None,
        "evil.example",
        "evil.example:9090",
        "[nonsense]",
        "[::1",
        "edge.example.com.evil",
    ):
        assert not srv.host_ok(bad), bad


def test_refusals_logged_once_a_minute_per_source(caplog: pytest.LogCaptureFixture) -> None:
    clock = [100.0]
    srv = _server(clock)
    with caplog.at_level(logging.WARNING, logger="confedge.admin"):
        srv.refuse("192.0.2.1", "source not in management.networks")
        srv.refuse("192.0.2.1", "source not in management.networks")
        srv.refuse("192.0.2.2", "source not in management.networks")
        clock[0] += 61
        srv.refuse("192.0.2.1", "source not in management.networks")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "management: refused connection from 192.0.2.1: source not in management.networks",
        "management: refused connection from 192.0.2.2: source not in management.networks",
        "management: refused connection from 192.0.2.1: source not in management.networks",
    ]
    assert srv.refused == 4


def test_refusal_log_memory_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    srv = _server(clock)
    with caplog.at_level(logging.ERROR, logger="confedge.admin"):
        for i in range(10_000):
            srv.refuse(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "spoofed scan")
    assert len(srv._logged) <= 4096
    assert srv.refused == 10_000


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_procstats_reads_this_process() -> None:
    me = self_stat()
    assert me.pid == os.getpid()
    assert me.rss_bytes is not None and me.rss_bytes > 1_000_000
    assert me.cpu_seconds is not None and me.cpu_seconds > 0
    assert me.open_fds is not None and me.open_fds >= 3
    assert me.start_time is not None and abs(me.start_time - NOW) < 10 * 365 * 86400
    assert read_proc(2**22 + 12345) is None  # no such process
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in child_pids()
        st = read_proc(child.pid)
        assert st is not None and st.threads == 1
    finally:
        child.kill()
        child.wait()
    assert child.pid not in child_pids()


def test_absurd_ban_expiry_does_not_break_the_page() -> None:
    from confedge.admin.render import _utc

    assert _utc(1e300) == "never"
    assert _utc(0.0).startswith("1970-01-01")


def test_status_page_says_how_the_relay_runs() -> None:
    """The TURN section names the data plane, its relay threads, whether they are folded and
    the packets it dropped; the Python plane shows its name only."""
    page = render_html(SNAP).decode()
    assert (
        "native, 2 relay threads (folded into one: moderate traffic), requests on the control "
        "socket, 16 packets dropped"
    ) in page
    python = {**SNAP, "turn": {**SNAP["turn"], "dataplane": {"backend": "python"}}}
    page = render_html(python).decode()
    assert "data plane" in page and "relay threads" not in page
    fam = parse_metrics(render_metrics(python).decode())
    assert "confedge_turn_relay_threads" not in fam


def test_certificates_render_with_their_expiry() -> None:
    snap = copy.deepcopy(SNAP)
    snap["tls"] = [
        {
            "certificate": "default (tls.cert)",
            "path": "/var/lib/confedge/tls/server.pem",
            "subject": "CN=edge.example.com",
            "issuer": "CN=R11,O=Let's Encrypt,C=US",
            "names": ["edge.example.com", "meet.example.com"],
            "not_after": NOW + 60 * 86400,
        },
        {
            "certificate": "tls.certificates[0]",
            "path": "/etc/confedge/video.pem",
            "subject": 'CN=<b>"video"</b>',
            "issuer": "CN=Private CA",
            "names": ["video.example.org"],
            "not_after": NOW + 20 * 86400,
        },
        {
            "certificate": "tls.certificates[1]",
            "path": "/etc/confedge/old.pem",
            "subject": "CN=old.example.org",
            "issuer": "CN=Private CA",
            "names": ["old.example.org"],
            "not_after": NOW - 2 * 86400,
        },
        {
            "certificate": "tls.certificates[2]",
            "path": "/etc/confedge/gone.pem",
            "problem": "cannot read /etc/confedge/gone.pem: No such file or directory",
        },
    ]
    fam = parse_metrics(render_metrics(snap).decode())
    name = "confedge_tls_certificate_expiry_timestamp_seconds"
    assert metric(fam, name, certificate="default (tls.cert)", subject="CN=edge.example.com") == (
        NOW + 60 * 86400
    )
    assert len(fam[name]) == 3  # the unreadable one has no expiry to report (absent, not 0)
    page = render_html(snap).decode()
    assert "in 60d (" in page
    assert '<span class="maintenance">in 20d</span>' in page  # renewal overdue (certbot: 30 d)
    assert '<span class="down">expired 2d ago</span>' in page
    assert "No such file or directory" in page
    assert "<b>" not in page.split("<h2>Certificates</h2>")[1].split("<h2>")[0]  # escaped
    # Without the key (an older snapshot), no section content and no metric.
    assert name not in render_metrics(SNAP).decode()
