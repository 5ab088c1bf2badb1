"""What hostile clients, nodes and a hostile cluster Redis can put on the operator's screen.

One real runtime (proxy, TURN in permissive mode, guard and cluster registry on a throwaway
redis-server, management listener), attacked over real sockets:

* TURN allocations whose REST usernames are markup, quotes, backslashes, a line feed, U+2028,
  an RTL override, a NUL, and 480 bytes;
* a node that answers its health checks and then holds every proxied request, so that a
  request with a hostile (percent-encoded) path stays listed as a session;
* records written straight into the cluster registry and the guard's ban hash, as anyone with
  the Redis password can: markup in every string, ``Infinity`` and 400-digit numbers, a record
  stored under one name that claims another (or this instance's), 300 instance names.

Then the page is read as the operator reads it: /status, /status.json and /metrics over HTTP,
/metrics through prometheus_client's parser, and the page in headless Chromium with its
Content-Security-Policy bypassed, so that escaping alone has to hold.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from admin_support import get, parse_metrics
from guard_redis import RedisServer, redis_server

from confedge.config import parse_config
from confedge.runtime import Runtime
from confedge.turn.auth import RestCredentials
from confedge.turn.testing import UdpTurnClient, response_code

parser = pytest.importorskip("prometheus_client.parser")

SECRET = "qa-admin-rest-secret"
SCRIPT = "<script>window.__pwned=1;alert(1)</script>"
IMG = '"><img src=x onerror="window.__pwned=2">'
# REST usernames (<expiry>:<user>); each must reach the page as text.
USERS = [
    SCRIPT,
    IMG,
    "quote\"back\\slash'",
    "line\nfeed\r\nand\u2028sep\u2029",
    "rtl\u202egnp.exe",
    "nul\x00byte",
    "long-" + "x" * 480,
]
# Cluster records are JSON: hostile strings in every field the page shows.
EVIL_INSTANCE = 'ev"il\\\n' + IMG[:40]
EVIL_USER = SCRIPT + "\u2028\u202e" + "'\"\\\n"


@dataclass
class Stack:
    rt: Runtime
    redis: RedisServer
    held: list[asyncio.StreamWriter]

    @property
    def port(self) -> int:
        assert self.rt.admin is not None
        return int(self.rt.admin.port)


async def _holding_node() -> tuple[asyncio.Server, list[asyncio.StreamWriter]]:
    """A node that answers its status checks and never answers anything else."""
    held: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if b"/api/client/v2/status" in line:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
            writer.close()
        else:
            held.append(writer)  # keep the request open: it is a session now

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, held


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    node, held = await _holding_node()
    node_port = node.sockets[0].getsockname()[1]
    with redis_server() as srv:
        cfg = parse_config(
            {
                "server": {
                    "hostname": "edge",
                    "domain": "hostile.test",
                    "internal_address": "127.0.0.1",
                    "state_dir": str(tmp_path),
                },
                "proxy": {
                    "https_port": 0,
                    "http_port": 0,
                    "workers": 1,
                    "nodes": [f"http://127.0.0.1:{node_port}"],
                    "health_interval": 0.2,
                    "health_rise": 1,
                    "read_timeout": 60,
                },
                "turn": {
                    "port": 0,
                    "tls_port": 0,
                    "relay_ports": "36300-36349",
                    "mode": "permissive",
                    "secrets": [SECRET],
                    "allowed_peers": ["127.0.0.0/8"],
                },
                "guard": {"enabled": True, "store": srv.url, "refresh_interval": 0.1},
                "cluster": {"store": srv.url, "instance": "edge-a", "interval": 0.2, "ttl": 2},
                "management": {"port": 0, "networks": ["127.0.0.1/32"]},
            }
        )
        rt = Runtime(cfg)
        await rt.start()
        try:
            yield Stack(rt, srv, held)
        finally:
            await rt.close()
            for w in held:
                w.close()
            node.close()
            await node.wait_closed()


def _record(name: str, **over: Any) -> dict[str, Any]:
    now = time.time()
    rec: dict[str, Any] = {
        "instance": name,
        "state": "serving",
        "started": now - 60,
        "updated": now,
        "turn": "javascript:alert(1)",
        "fingerprint": "x",
        "allocation_count": 3,
        "allocations": [
            {
                "client": IMG[:60],
                "relay": "127.0.0.1:1/udp",
                "username": EVIL_USER,
                "created": now - 5,
                "bytes_to_peer": 10,
                "bytes_to_client": 20,
            }
        ],
    }
    rec.update(over)
    return rec


def _poison_redis(url: str) -> None:
    """Write what a hostile holder of the Redis password would (see the module doc)."""
    r = redis.Redis.from_url(url)
    try:
        far = time.time() + 3600  # index scores in the future: never trimmed as stale
        records: dict[str, str] = {
            EVIL_INSTANCE: json.dumps(_record(EVIL_INSTANCE)),
            # the same name again, under another key: two series of one name in /metrics
            "liar": json.dumps(_record(EVIL_INSTANCE)),
            # a foreign record that says it is this instance
            "selfie": json.dumps(_record("edge-a")),
            # JSON that json.loads takes and no renderer could: Infinity, 400 digits
            "inf-started": json.dumps(_record("inf-started")).replace(
                '"started": ', '"started": Infinity, "x": '
            ),
            "inf-created": json.dumps(_record("inf-created")).replace(
                '"created": ', '"created": 1e999, "x": '
            ),
            "huge-bytes": json.dumps(_record("huge-bytes")).replace(
                '"bytes_to_peer": 10', '"bytes_to_peer": 1' + "0" * 400
            ),
        }
        # and a flood of names in the index, each with a valid record
        for i in range(300):
            records[f"zz-filler-{i:03d}"] = json.dumps(_record(f"zz-filler-{i:03d}"))
        pipe = r.pipeline(transaction=False)
        for name, value in records.items():
            pipe.set(f"confedge:cluster:instance:{name}", value, ex=3600)
            pipe.zadd("confedge:cluster:instances", {name: far})
        now = time.time()
        bans = {
            "192.0.2.66": {"reason": SCRIPT + IMG, "expires": now + 600},
            "192.0.2.67": {"reason": "forever", "expires": "inf"},
            "192.0.2.68": {"reason": "nan", "expires": now + 600, "created": "nan"},
            "<b>not-an-address</b>": {"reason": "x", "expires": now + 600},
        }
        for source, b in bans.items():
            rec = {"source": source, "created": now, "count": 1, "failures": 3, **b}
            pipe.hset("confedge:guard:bans", source, json.dumps(rec))
        pipe.incr("confedge:guard:version")
        pipe.execute()
    finally:
        r.close()


async def _allocate_hostile_users(stack: Stack) -> list[UdpTurnClient]:
    assert stack.rt.turn is not None
    clients = []
    expiry = int(time.time()) + 3600
    for user in USERS:
        username = f"{expiry}:{user}"
        c = UdpTurnClient(
            ("127.0.0.1", stack.rt.turn.port),
            username,
            RestCredentials.password_for(SECRET, username),
            "hostile.test",
        )
        clients.append(c)
        msg = await c.allocate()
        assert msg is not None and response_code(msg) == 200, (user, msg)
    return clients


HOSTILE_PATH = (
    "/api/client/v2/conferences/%3Cscript%3Ealert(1)%3Cimg%20src=x%20onerror=alert(2)%3E'%22/events"
)


async def _hold_session(stack: Stack) -> asyncio.StreamWriter:
    assert stack.rt.proxy is not None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", stack.rt.proxy.https_port, ssl=ctx, server_hostname="edge.hostile.test"
    )
    writer.write(
        f"GET {HOSTILE_PATH} HTTP/1.1\r\nHost: edge.hostile.test\r\n"
        f"User-Agent: {SCRIPT}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    return writer


async def _until(cond: Any, timeout: float = 8.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.1)


async def _snapshot_json(stack: Stack) -> dict[str, Any]:
    reply = await get(stack.port, "/status.json")
    assert reply.status == 200, reply.body[:300]
    out: dict[str, Any] = json.loads(reply.body)
    return out


async def _attacked(stack: Stack) -> tuple[list[UdpTurnClient], asyncio.StreamWriter]:
    """Everything of the module doc at once; returns what must stay open."""
    _poison_redis(stack.redis.url)
    clients = await _allocate_hostile_users(stack)
    session = await _hold_session(stack)

    async def ready() -> bool:
        r = await get(stack.port, "/status.json")
        if r.status != 200:
            return True  # a defect: let the assertions below show it
        j = json.loads(r.body)
        others = [i for i in j["cluster"]["instances"] if not i["self"]]
        return bool(j["proxy"].get("sessions")) and bool(others) and j["guard"]["bans_total"] > 0

    await _until(ready)
    return clients, session


async def test_hostile_input_stays_text_on_every_view(stack: Stack) -> None:
    clients, session = await _attacked(stack)
    try:
        page_r = await get(stack.port, "/status")
        json_r = await get(stack.port, "/status.json")
        metrics_r = await get(stack.port, "/metrics")
    finally:
        session.close()
        for c in clients:
            c.close()
    # Every view answers (was: 500 for the page and /status.json while an Infinity or a
    # 400-digit number sat in a cluster record, or an infinite ban expiry in the guard's hash).
    assert (page_r.status, json_r.status, metrics_r.status) == (200, 200, 200), (
        page_r.body[:200],
        json_r.body[:200],
    )
    csp = page_r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert page_r.headers["x-content-type-options"] == "nosniff"

    page = page_r.body.decode()
    for raw in (SCRIPT, IMG, "<b>not-an-address</b>"):
        assert raw not in page
    assert "<script" not in page and "<img" not in page, page[page.find("<img") - 200 :][:400]
    assert 'href="javascript:' not in page  # a record's TURN field is text, never a link
    # shown, as text
    assert html.escape(SCRIPT) in page
    assert html.escape(USERS[4]) in page  # the RTL override reaches the page as the character
    assert html.escape(HOSTILE_PATH[:80]) in page  # the held request, as a session (80 chars)

    # /status.json: strict JSON (no NaN/Infinity), the strings as they came
    j = json.loads(json_r.body, parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    users = {a["user"].split(":", 1)[1] for a in j["turn"]["live"]["top"]}
    assert users == set(USERS)
    sessions = j["proxy"]["sessions"]
    assert [s["path"] for s in sessions] == [HOSTILE_PATH[:80]]
    cluster = j["cluster"]["instances"]
    names = [i["instance"] for i in cluster]
    # One row per name; a record stored under another key than its name is not one (was: the
    # "liar" twin, and "selfie" shown as this instance a second time).
    assert len(names) == len(set(names)), names
    assert [i["instance"] for i in cluster if i["self"]] == ["edge-a"]
    # Records that no renderer can show are left out (was: kept, and every view failed).
    assert not {"inf-started", "inf-created", "huge-bytes"} & set(names)
    assert EVIL_INSTANCE in names
    evil = next(i for i in cluster if i["instance"] == EVIL_INSTANCE)
    assert evil["allocations"][0]["username"] == EVIL_USER
    # At most 64 others are read (cluster.service.MAX_INSTANCES; was: all 300+ names, every
    # interval, 200 allocations each in memory and 50 rows each on the page).
    assert len(cluster) <= 64 + 1
    bans = {b["source"]: b for b in j["guard"]["bans"]}
    assert bans["192.0.2.66"]["reason"] == SCRIPT + IMG
    assert "192.0.2.67" not in bans and "192.0.2.68" not in bans  # not finite: skipped
    assert "<b>not-an-address</b>" in bans  # a string like any other: escaped on the page
    assert len(json_r.body) < 2_000_000

    # /metrics: both parsers, and the label values come back byte for byte
    text = metrics_r.body.decode()
    parse_metrics(text)  # strict: no duplicate sample (Prometheus refuses a whole scrape)
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    seen = {
        s.labels["user"].split(":", 1)[1]
        for s in fams["confedge_turn_allocation_bytes"].samples
        if s.name.endswith("_total")
    }
    assert seen == set(USERS)
    inst = [s.labels["instance"] for s in fams["confedge_cluster_instance_allocations"].samples]
    assert EVIL_INSTANCE in inst and len(inst) == len(set(inst))


@pytest.mark.chromium
async def test_the_page_in_chromium_runs_nothing_and_shows_the_text(stack: Stack) -> None:
    """The operator's view: headless Chromium with the page's CSP switched off, so that only
    the escaping stands between the hostile strings and script."""
    from e2e.chromium_driver import CHROMIUM, require_browser, run_driver

    node_bin = require_browser()
    driver = Path(__file__).resolve().parents[1] / "e2e" / "admin_page_driver.mjs"
    clients, session = await _attacked(stack)
    try:
        results = []
        for bypass in (True, False):
            with tempfile.TemporaryDirectory(prefix="adminqa-chromium-") as profile:
                cfg = {
                    "chromium": CHROMIUM,
                    "userDataDir": profile,
                    "url": f"http://127.0.0.1:{stack.port}/status",
                    "bypassCSP": bypass,
                }
                results.append(await run_driver(node_bin, cfg, 60, driver))
    finally:
        session.close()
        for c in clients:
            c.close()
    for r in results:
        assert r["status"] == 200
        assert r["dialogs"] == [] and r["pageErrors"] == [] and r["pwned"] is None, r
        els = r["elements"]
        assert not {"script", "img", "iframe", "object", "embed", "svg", "form"} & set(els), els
        assert r["handlers"] == []  # no on* attribute anywhere
        assert set(r["hrefs"]) == {"/status.json", "/metrics"}
        text = r["text"]
        assert SCRIPT in text and IMG[2:] in text  # shown, as text
        assert "rtl\u202egnp.exe" in text
        assert "javascript:alert(1)" in text  # a record's TURN field, as text
        assert r["title"] == "confedge status: edge.hostile.test"
    assert results[1]["csp"] and "default-src 'none'" in results[1]["csp"]
    assert results[1]["consoleErrors"] == []  # nothing on the page needed the CSP to stop it


def test_a_record_name_cannot_forge_log_lines_or_grow_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The secret-mismatch warning names another instance, read from the registry."""
    from confedge.cluster.core import InstanceRecord
    from confedge.cluster.service import ClusterService

    cfg = parse_config(
        {
            "proxy": {"enabled": False},
            "turn": {"enabled": False, "mode": "permissive", "secrets": ["s"]},
            "cluster": {"store": "redis://127.0.0.1:1/0", "instance": "edge-a"},
        }
    )
    svc = ClusterService(cfg, None)

    def rec(name: str) -> InstanceRecord:
        return InstanceRecord(name, "serving", 1.0, 2.0, "", "other", 0)

    forged = "b\nWARNING confedge.guard: all bans cleared by operator"
    svc.others = [rec(forged)]
    with caplog.at_level(logging.WARNING, logger="confedge.cluster"):
        svc._warn_secret_mismatch("mine")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and repr(forged) in line  # was: a second, forged line
    for i in range(5):  # a new name every publication, 300 at a time
        svc.others = [rec(f"n{i}-{k}") for k in range(300)]
        svc._warn_secret_mismatch("mine")
    assert len(svc._warned) <= 1024 + 300  # cluster.service.WARNED_LIMIT, then one round
