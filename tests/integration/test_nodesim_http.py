"""The simulated node over real sockets: keep-alive, pipelining, SSE framing and live events,
limits and bad input, the web page, the maintenance switch, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from confedge.nodesim import Conference, NodeSim
from confedge.nodesim.cli import nodesim_command

API = "/api/client/v2"


class Conn:
    """A minimal HTTP/1.1 client over one connection, to see exactly what goes on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, node: NodeSim) -> Conn:
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        return cls(r, w)

    def send(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        data = (
            b""
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        lines = [f"{method} {path} HTTP/1.1", "Host: node"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines.append(f"Content-Length: {len(data)}")
        self.w.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)

    async def head(self) -> tuple[int, dict[str, str]]:
        status_line = await asyncio.wait_for(self.r.readline(), 5)
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while True:
            line = (await asyncio.wait_for(self.r.readline(), 5)).decode().rstrip("\r\n")
            if not line:
                return status, headers
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.head()
        body = await asyncio.wait_for(
            self.r.readexactly(int(headers.get("content-length", "0"))), 5
        )
        return status, headers, body

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        self.send(method, path, body, headers)
        status, hdrs, data = await self.response()
        return status, (
            json.loads(data) if hdrs.get("content-type") == "application/json" else data
        )

    async def chunk(self, timeout: float = 5) -> bytes:
        size = int((await asyncio.wait_for(self.r.readline(), timeout)).strip(), 16)
        data = await asyncio.wait_for(self.r.readexactly(size + 2), timeout)
        assert data.endswith(b"\r\n")
        return data[:-2]

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(ConnectionError):
            await self.w.wait_closed()


@pytest.fixture
async def node() -> AsyncIterator[NodeSim]:
    sim = NodeSim(
        [Conference("meet", "1234", "5678"), Conference("open")], node_name="n1", keepalive=0.3
    )
    await sim.start("127.0.0.1", 0)
    try:
        yield sim
    finally:
        await sim.close()


async def join(c: Conn, alias: str, pin: str | None, name: str = "A") -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if pin is not None:
        headers["pin"] = pin
    status, body = await c.request(
        "POST", f"{API}/conferences/{alias}/request_token", {"display_name": name}, headers
    )
    assert status == 200, body
    result: dict[str, Any] = body["result"]
    return result


def parse_events(blob: bytes) -> list[tuple[str, Any]]:
    out = []
    for block in blob.decode().split("\n\n"):
        if not block or block.startswith(":"):
            continue
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        out.append((fields["event"], json.loads(fields["data"]) if fields.get("data") else None))
    return out


async def test_keepalive_many_requests_one_connection(node: NodeSim) -> None:
    c = await Conn.open(node)
    for _ in range(5):
        assert await c.request("GET", f"{API}/status") == (
            200,
            {"status": "success", "result": "OK"},
        )
    status, body = await c.request(
        "POST", f"{API}/conferences/meet/request_token", {"display_name": "x"}, {"pin": "9"}
    )
    assert (status, body) == (403, {"status": "success", "result": "Invalid PIN"})
    status, body = await c.request(
        "POST", f"{API}/conferences/meet/request_token", {"display_name": "x"}
    )
    assert (status, body["result"]) == (403, {"pin": "required", "guest_pin": "required"})
    status, body = await c.request(
        "POST", f"{API}/conferences/zzz/request_token", {"display_name": "x"}
    )
    assert (status, body) == (
        404,
        {"status": "success", "result": "Neither conference nor gateway found"},
    )
    await c.close()


async def test_pipelined_requests_answered_in_order(node: NodeSim) -> None:
    c = await Conn.open(node)
    c.send("POST", f"{API}/conferences/zzz/request_token", {"display_name": "x"})
    c.send("GET", f"{API}/status")
    c.send("POST", f"{API}/conferences/meet/request_token", {"display_name": "x"}, {"pin": "1"})
    assert (await c.response())[0] == 404
    assert (await c.response())[0] == 200
    assert (await c.response())[0] == 403
    await c.close()


async def test_response_headers(node: NodeSim) -> None:
    c = await Conn.open(node)
    c.send("GET", f"{API}/status")
    _, headers, _ = await c.response()
    assert headers["content-type"] == "application/json"
    assert headers["x-confedge-node"] == "n1"
    assert "connection" not in headers
    c.send("GET", f"{API}/status", headers={"Connection": "close"})
    _, headers, _ = await c.response()
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(c.r.read(), 5) == b""  # the node closed it
    await c.close()


async def test_sse_stream_sync_live_keepalive_and_end(node: NodeSim) -> None:
    ctl = await Conn.open(node)
    me = await join(ctl, "meet", "1234", "Host")
    es = await Conn.open(node)
    es.send("GET", f"{API}/conferences/meet/events?token={me['token']}")
    status, headers = await es.head()
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked"
    events = parse_events(await es.chunk())
    assert [n for n, _ in events] == [
        "participant_sync_begin",
        "participant_create",
        "participant_sync_end",
    ]
    # Live events while the stream is open.
    other = await join(ctl, "meet", "5678", "Guest")
    ((name, data),) = parse_events(await es.chunk())
    assert (
        name == "participant_create" and data["display_name"] == "Guest" and data["role"] == "guest"
    )
    # Keepalive comment while idle (node keepalive = 0.3 s).
    assert await es.chunk() == b": keepalive\n\n"
    status, _ = await ctl.request(
        "POST", f"{API}/conferences/meet/release_token", headers={"token": other["token"]}
    )
    assert status == 200
    blob = await es.chunk()
    while blob.startswith(b":"):
        blob = await es.chunk()
    assert parse_events(blob) == [("participant_delete", {"uuid": other["participant_uuid"]})]
    # Releasing our own token ends our stream: disconnect event, then the last chunk.
    await ctl.request(
        "POST", f"{API}/conferences/meet/release_token", headers={"token": me["token"]}
    )
    blob = await es.chunk()
    while blob.startswith(b":"):
        blob = await es.chunk()
    assert parse_events(blob) == [("disconnect", {"reason": "Token released"})]
    assert await es.chunk() == b""
    # The connection stays usable after the stream ended (keep-alive).
    assert (await es.request("GET", f"{API}/status"))[0] == 200
    await es.close()
    await ctl.close()


async def test_sse_token_header_and_client_going_away(node: NodeSim) -> None:
    ctl = await Conn.open(node)
    me = await join(ctl, "open", None)
    for _ in range(3):
        es = await Conn.open(node)
        es.send("GET", f"{API}/conferences/open/events", headers={"token": me["token"]})
        assert (await es.head())[0] == 200
        await es.chunk()
        await es.close()
    await asyncio.sleep(0.1)
    assert node.state._subs == []  # streams whose client left are forgotten
    es = await Conn.open(node)
    status, body = await es.request("GET", f"{API}/conferences/open/events?token=nope")
    assert (status, body) == (403, {"status": "success", "result": "Invalid token"})
    await es.close()
    await ctl.close()


async def test_malformed_request_gets_400_and_close(node: NodeSim) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", node.port)
    w.write(b"GARBAGE\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 5)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b'"status":"failure"' in data
    w.close()


async def test_oversized_header_and_body(node: NodeSim) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", node.port)
    w.write(
        b"GET /api/client/v2/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    )
    data = await asyncio.wait_for(r.read(), 5)
    assert data.startswith(b"HTTP/1.1 431 ")
    w.close()
    r, w = await asyncio.open_connection("127.0.0.1", node.port)
    w.write(
        b"POST /api/client/v2/status HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n"
        + b"a" * 300000
    )
    data = await asyncio.wait_for(r.read(), 5)
    assert data.startswith(b"HTTP/1.1 413 ")
    w.close()


async def test_chunked_request_body(node: NodeSim) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", node.port)
    body = json.dumps({"display_name": "Chunky"}).encode()
    w.write(
        b"POST /api/client/v2/conferences/open/request_token HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    c = Conn(r, w)
    status, _, data = await c.response()
    assert status == 200 and json.loads(data)["result"]["display_name"] == "Chunky"
    await c.close()


async def test_webapp_static_files(node: NodeSim) -> None:
    c = await Conn.open(node)
    c.send("GET", "/")
    status, headers, _ = await c.response()
    assert status == 302 and headers["location"] == "/webapp/"
    c.send("GET", "/webapp/")
    status, headers, body = await c.response()
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    for element in (
        b'id="alias"',
        b'id="name"',
        b'id="pin"',
        b'id="join"',
        b'id="error"',
        b'id="state"',
        b'id="local"',
        b'id="remote"',
        b'id="participants"',
    ):
        assert element in body
    c.send("GET", "/webapp/app.js")
    status, headers, body = await c.response()
    assert status == 200 and "javascript" in headers["content-type"] and b"request_token" in body
    for bad in (
        "/webapp/../core.py",
        "/webapp/%2e%2e/core.py",
        "/webapp/nope.js",
        "/webapp/.hidden",
    ):
        c.send("GET", bad)
        assert (await c.response())[0] == 404, bad
    c.send("POST", "/webapp/index.html")
    assert (await c.response())[0] == 405
    await c.close()


async def test_maintenance_switch_http_and_method(node: NodeSim) -> None:
    c = await Conn.open(node)
    assert await c.request("POST", "/admin/maintenance?on=1") == (
        200,
        {"status": "success", "result": {"maintenance": True}},
    )
    status, body = await c.request("GET", f"{API}/status")
    assert status == 503 and body["status"] == "failed"
    # Through a proxy (forwarding headers): refused, so the Internet cannot flip it.
    status, _ = await c.request(
        "POST", "/admin/maintenance?on=0", headers={"X-Forwarded-For": "198.51.100.7"}
    )
    assert status == 403
    assert (await c.request("POST", "/admin/maintenance?on=maybe"))[0] == 400
    node.set_maintenance(False)
    assert (await c.request("GET", f"{API}/status"))[0] == 200
    assert (await c.request("GET", "/admin/maintenance"))[1]["result"] == {"maintenance": False}
    await c.close()


async def test_calls_without_turn_answer_host_candidates_or_clear_error(node: NodeSim) -> None:
    pytest.importorskip("aiortc")
    c = await Conn.open(node)
    me = await join(c, "open", None)
    path = f"{API}/conferences/open/participants/{me['participant_uuid']}/calls"
    status, body = await c.request(
        "POST",
        path,
        {"call_type": "WEBRTC", "sdp": "v=0\r\nm=video x y\r\n"},
        {"token": me["token"]},
    )
    assert status == 400 and body["status"] == "failure" and "SDP" in body["result"]
    await c.close()


def test_cli_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert nodesim_command(["--listen", "nohost"]) == 2
    assert "--listen" in capsys.readouterr().err
    assert nodesim_command(["--conference", "m::55"]) == 2
    assert "guest PIN needs a host PIN" in capsys.readouterr().err
    assert nodesim_command(["--turn", "127.0.0.1:3478"]) == 2
    assert "--turn-user" in capsys.readouterr().err
    assert nodesim_command(["--turn-user", "u"]) == 2
    assert nodesim_command(["--conference", "a", "--conference", "A"]) == 2
    assert "listed twice" in capsys.readouterr().err


def test_cli_runs_and_stops_on_sigterm() -> None:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from confedge.nodesim.cli import nodesim_command as c; "
            "sys.exit(c(sys.argv[1:]))",
            "--listen",
            "127.0.0.1:0",
            "--conference",
            "room:11:22",
            "--maintenance",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("nodesim nodesim listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        port = int(url.rsplit(":", 1)[1])
        import http.client

        h = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        h.request("GET", f"{API}/status")
        assert h.getresponse().status == 503  # --maintenance
        h.close()
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_expect_100_continue(node: NodeSim) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", node.port)
    body = json.dumps({"display_name": "Patient"}).encode()
    w.write(
        b"POST /api/client/v2/conferences/open/request_token HTTP/1.1\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    w.write(body)
    c = Conn(r, w)
    status, _, data = await c.response()
    assert status == 200 and json.loads(data)["result"]["display_name"] == "Patient"
    await c.close()


async def test_garbage_never_crashes_or_hangs_the_node(node: NodeSim) -> None:
    """Random bytes, truncated requests and odd framing: each connection gets an error or is
    closed within the timeout, and the node keeps serving."""
    import random

    rng = random.Random(5)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(30)]
    samples += [
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /api/client/v2/conferences/open/request_token HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /api/client/v2/conferences/%ff%fe/participants HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/client/v2/conferences/open/participants?token=%ZZ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET " + b"/a" * 5000 + b" HTTP/1.1\r\n\r\n",
    ]
    for blob in samples:
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(blob)
        with contextlib.suppress(ConnectionError):
            w.write_eof()
        data = await asyncio.wait_for(r.read(), 5)
        assert data == b"" or data.startswith(b"HTTP/1.1 "), (blob[:60], data[:80])
        w.close()
    c = await Conn.open(node)
    assert (await c.request("GET", f"{API}/status"))[0] == 200
    await c.close()


async def test_half_closed_client_still_gets_its_answers(node: NodeSim) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", node.port)
    w.write(b"GET /api/client/v2/status HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 5)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    w.close()
