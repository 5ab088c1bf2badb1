"""The HTTP/2 client adapter (proxy/h2.py) without sockets to the client: a hyper-h2 client
connection's bytes go straight into `H2Client` through an in-memory transport, and its answers
come back the same way. What is checked here needs no node: the SETTINGS the proxy announces,
per-stream refusals that leave the connection usable, rapid-reset and CONTINUATION limits, and
the head translation. The paths through a node are in tests/integration/test_proxy_h2.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hyperframe.frame as hf
import pytest

from confedge.config import parse_config
from confedge.proxy.core import WorkerRuntime
from confedge.proxy.h2 import RESET_LIMIT, H2Client, H2Runtime, h1_head


class MemoryTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def set_protocol(self, proto: Any) -> None:
        self.proto = proto

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class Peer:
    """A hyper-h2 client wired to an H2Client through a MemoryTransport."""

    def __init__(self, client: H2Client, transport: MemoryTransport) -> None:
        self.server = client
        self.t = transport
        cfg = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        self.conn = h2.connection.H2Connection(cfg)
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []

    async def send(self, raw: bytes = b"") -> list[h2.events.Event]:
        data = self.conn.data_to_send() + raw
        if data:
            self.server.data_received(data)
        await asyncio.sleep(0)  # WorkerRuntime's write coalescing flushes at the loop's turn
        out, self.t.out = bytes(self.t.out), bytearray()
        evs = self.conn.receive_data(out) if out else []
        self.events += evs
        return evs

    async def get(self, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=True)
        evs = await self.send()
        status, body = 0, b""
        for ev in evs:
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                body += ev.data
        return status, body


def _core(tmp_path: Path, **proxy: Any) -> WorkerRuntime:
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "turn": {"enabled": False},
            "proxy": {
                "nodes": ["http://127.0.0.1:9"],
                "access_log": str(tmp_path / "a.log"),
                **proxy,
            },
        }
    )
    return WorkerRuntime(cfg, asyncio.get_running_loop())


async def _peer(tmp_path: Path, **proxy: Any) -> Peer:
    core = _core(tmp_path, **proxy)
    rt = H2Runtime(core, max_streams=core.cfg.proxy.http2_max_streams)
    t = MemoryTransport()
    client = H2Client(rt, t, "192.0.2.7")  # type: ignore[arg-type]
    client.start()
    peer = Peer(client, t)
    await peer.send()
    return peer


def _req(
    path: str = "/", method: str = "GET", authority: str = "localhost"
) -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "https"), (":authority", authority), (":path", path)]


def test_h1_head_to_h2_fields() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\nX-Node: n1\r\n\r\nbody"
    )
    assert h1_head(head) == (200, [(b"content-type", b"text/plain"), (b"x-node", b"n1")], b"body")
    assert h1_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n") is None


async def test_settings_announce_the_limits(tmp_path: Path) -> None:
    peer = await _peer(tmp_path, max_header_bytes=8192, http2_max_streams=7)
    (changed,) = [e for e in peer.events if isinstance(e, h2.events.RemoteSettingsChanged)]
    s = {k: v.new_value for k, v in changed.changed_settings.items()}
    codes = h2.settings.SettingCodes
    assert s[codes.MAX_CONCURRENT_STREAMS] == 7
    assert s[codes.MAX_HEADER_LIST_SIZE] == 8192
    assert s[codes.ENABLE_PUSH] == 0
    assert s.get(codes.ENABLE_CONNECT_PROTOCOL, 0) == 0  # no RFC 8441: WebSockets use HTTP/1.1


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (_req("/api/../secret"), 400),
        (_req("/a/%252e%252e/b"), 400),
        (_req("http://evil.example/"), 400),
        (_req("/", authority="evil.example"), 400),
        (_req("/", method="TRACE"), 405),
        ([(":method", "CONNECT"), (":authority", "localhost:443")], 405),
        (_req("/", method="PROPFIND"), 501),
        ([*_req("/"), *[(f"x-{i}", "v") for i in range(120)]], 431),
        ([*_req("/"), ("content-length", "999999999999")], 413),
    ],
)
async def test_refused_per_stream_connection_stays(
    tmp_path: Path, headers: list[tuple[str, str]], status: int
) -> None:
    peer = await _peer(tmp_path)
    got, body = await peer.get(headers)
    assert got == status, body
    assert not peer.t.closing
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in peer.events)
    # the next stream on the same connection is vetted afresh
    got, _ = await peer.get(_req("/x/../y"))
    assert got == 400


async def test_host_and_authority_must_agree(tmp_path: Path) -> None:
    """RFC 9113 §8.3.1: hyper-h2 treats the mismatch as a protocol error (GOAWAY)."""
    peer = await _peer(tmp_path)
    status, _ = await peer.get([*_req("/"), ("host", "other.example")])
    assert status == 0
    ends = [e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ends and ends[0].error_code == 1  # PROTOCOL_ERROR
    assert peer.t.closing


@pytest.mark.parametrize(
    "headers",
    [
        [*_req("/"), ("X-Upper", "1")],
        [*_req("/"), ("connection", "close")],
        [*_req("/"), ("transfer-encoding", "chunked")],
        [*_req("/"), ("te", "gzip")],
        [*_req("/"), ("x-a", "a\x00b")],
        [*_req("/"), ("x-a", " padded")],
        [("accept", "*/*"), *_req("/")],
        [*_req("/"), (":foo", "x")],
        [*_req("/"), (":status", "200")],
        _req("/")[:3],
    ],
    ids=[
        "uppercase", "connection", "transfer-encoding", "te", "nul", "whitespace",
        "pseudo-after-regular", "unknown-pseudo", "status-in-request", "no-path",
    ],
)  # fmt: skip
async def test_malformed_request_is_a_connection_error(
    tmp_path: Path, headers: list[tuple[str, str]]
) -> None:
    """RFC 9113 §8.1.1, §8.2, §8.3: a malformed header block ends the connection with GOAWAY
    PROTOCOL_ERROR (request.h2_fields_problem, as hyper-h2's own validation did), and no
    exchange starts for it: no answer on the stream, no node connection."""
    peer = await _peer(tmp_path)
    core = peer.server.core
    peer.conn.config.normalize_outbound_headers = False  # send the block exactly as written
    status, _ = await peer.get(headers)
    assert status == 0
    ends = [e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ends and ends[0].error_code == 1  # PROTOCOL_ERROR
    assert peer.t.closing
    assert not peer.server.streams and not core.upstreams


async def test_rapid_reset_gets_goaway(tmp_path: Path) -> None:
    peer = await _peer(tmp_path)
    for _ in range(RESET_LIMIT + 1):
        sid = peer.conn.get_next_available_stream_id()
        peer.conn.send_headers(sid, _req("/x/../y"), end_stream=True)
        peer.conn.reset_stream(sid)
    await peer.send()
    ends = [e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ends and ends[0].error_code == 11  # ENHANCE_YOUR_CALM
    assert peer.t.closing


async def test_resets_below_the_limit_are_fine(tmp_path: Path) -> None:
    peer = await _peer(tmp_path)
    for _ in range(RESET_LIMIT // 2):
        sid = peer.conn.get_next_available_stream_id()
        peer.conn.send_headers(sid, _req("/x/../y"), end_stream=True)
        peer.conn.reset_stream(sid)
    await peer.send()
    assert not peer.t.closing
    assert (await peer.get(_req("/x/../y")))[0] == 400


async def test_continuation_flood_closes(tmp_path: Path) -> None:
    peer = await _peer(tmp_path)
    f = hf.HeadersFrame(1)
    f.data = b""
    raw = f.serialize()
    for _ in range(100):
        c = hf.ContinuationFrame(1)
        c.data = b"\x00" * 100
        raw += c.serialize()
    await peer.send(raw)
    assert peer.t.closing
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in peer.events)


@pytest.mark.parametrize(
    "raw",
    [
        bytes.fromhex("000004080000000000") + bytes(4),  # WINDOW_UPDATE of 0 on the connection
        bytes.fromhex("000005000000000000") + b"hello",  # DATA on stream 0
    ],
    ids=["window-update-0", "data-on-stream-0"],
)
async def test_connection_errors_close(tmp_path: Path, raw: bytes) -> None:
    """RFC 9113 §6.9, §6.1: connection errors; whether the engine raises (hyper-h2) or answers
    them itself (libnghttp2), the client gets GOAWAY PROTOCOL_ERROR and the connection closes."""
    peer = await _peer(tmp_path)
    await peer.send(raw)
    assert peer.t.closing
    (term,) = [e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert term.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


async def test_no_node_reachable_answers_on_the_stream(tmp_path: Path) -> None:
    """The node (port 9, discard: nothing listens) refuses: the retry page on this stream."""
    peer = await _peer(tmp_path)
    sid = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(sid, _req("/api/client/v2/status"), end_stream=True)
    await peer.send()
    for _ in range(100):
        await asyncio.sleep(0.02)
        await peer.send()
        if any(isinstance(e, h2.events.StreamEnded) for e in peer.events):
            break
    (resp,) = [e for e in peer.events if isinstance(e, h2.events.ResponseReceived)]
    assert int(dict(resp.headers)[b":status"]) in (502, 503)
    assert not peer.t.closing
