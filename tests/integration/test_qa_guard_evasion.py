"""A PIN guesser against the guard through the real proxy (docs/QA.md, "guard, evasion").

What an attacker tried to keep guessing unbanned, or to lock real participants out: hanging up
(HTTP/1.1 close, HTTP/2 RST_STREAM) before the node's answer; a `pin` field the node never gets
(`Connection: pin`) or gets twice, with `distinct_pins`; the path spellings of test_guard_proxy's
EVASIONS as HTTP/2 `:path`; fifty streams of one connection racing the threshold; a half-close
after the request; forwarding headers naming an innocent address. The HTTP/2 tests run on the
engine CONFEDGE_H2_ENGINE selects (hyper-h2 or libnghttp2); run the file once per engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from guard_upstream import PinNode
from msgspec.structs import replace
from test_guard_proxy import EVASIONS, TOKEN, _raw, _read, _ssl, attempt, config, send

from confedge.guard import create_guard
from confedge.nodesim import Conference, NodeSim
from confedge.proxy.service import ProxyService

# Health checks that never take the node out during a test (it shares the test's loop).
CALM = 30.0


@pytest.fixture
async def node() -> Any:
    n = await PinNode().start()
    yield n
    await n.stop()


class H2Client:
    """One HTTP/2 connection over TLS (hyper-h2 as the client), from a chosen source."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        )
        self.next_id = 1
        self.status: dict[int, int] = {}
        self.ended: set[int] = set()

    @classmethod
    async def open(cls, port: int, source: str) -> H2Client:
        ctx = _ssl()
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, local_addr=(source, 0)
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        c = cls(reader, writer)
        c.conn.initiate_connection()
        c.flush()
        return c

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def post(
        self, port: int, path: str, extra: list[tuple[str, str]], body: bytes | None = None
    ) -> int:
        sid = self.next_id
        self.next_id += 2
        head = [(":method", "POST"), (":scheme", "https"), (":authority", f"localhost:{port}")]
        fields = [*head, (":path", path), *extra]
        self.conn.send_headers(sid, fields, end_stream=body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid)
        self.flush()

    async def wait(self, sids: list[int]) -> list[int]:
        """The status of each stream once all have ended (0: reset or no answer)."""
        while not set(sids) <= self.ended:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            assert data, "the proxy closed the connection"
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    self.ended.add(ev.stream_id)
            self.flush()
        return [self.status.get(s, 0) for s in sids]

    def close(self) -> None:
        self.writer.close()


async def _node_busy_with(node: PinNode, source: str) -> None:
    """Until the node is judging a request_token from `source` (PinNode.delay)."""
    t0 = time.monotonic()
    while node.busy.get(f"ip:{source}", 0) == 0:
        assert time.monotonic() - t0 < 5.0, "the request never reached the node"
        await asyncio.sleep(0.005)


async def _node_done_with(node: PinNode, source: str) -> None:
    """Until the node has judged it (one guess at a time: `busy` then tells them apart)."""
    while node.busy.get(f"ip:{source}", 0):
        await asyncio.sleep(0.01)


async def _hang_up_h1(port: int, node: PinNode, source: str, pin: str) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_ssl(), local_addr=(source, 0))
    writer.write(_raw(TOKEN, pin))
    await _node_busy_with(node, source)
    writer.transport.abort()
    await _node_done_with(node, source)


@pytest.mark.parametrize("how", ["HTTP/1.1 close", "HTTP/2 RST_STREAM"])
async def test_hanging_up_before_the_answer_neither_hides_the_guess_nor_holds_the_conference(
    node: PinNode, tmp_path: Path, how: str
) -> None:
    """Each guess is dropped once the node is judging it, before its answer. Was: nothing was
    counted and every reservation held its slots for its whole ttl (140 s by default): the
    guesser was never banned, and a handful of such requests (here 3, by default 32 from any
    8 addresses) kept the conference's real participants out with 429 all that time."""
    node.delay = 0.5
    cfg = config(
        node,
        tmp_path,
        health_interval=CALM,
        maxretry=3,
        bantime=60,
        inflight_per_conference=3,
    )
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    attacker = "127.0.20.1"
    try:
        if how == "HTTP/1.1 close":
            for i in range(3):
                await _hang_up_h1(port, node, attacker, f"000{i}")
        else:
            c = await H2Client.open(port, attacker)
            try:
                for i in range(3):
                    sid = c.post(port, TOKEN, [("pin", f"000{i}")])
                    await _node_busy_with(node, attacker)
                    c.reset(sid)
                    await _node_done_with(node, attacker)
            finally:
                c.close()
        # A participant who knows the PIN joins at once (the conference's slots are free).
        t0 = time.monotonic()
        while (status := await attempt(port, "1234", source="127.0.20.9")) != 200:
            assert status == 429, status
            assert time.monotonic() - t0 < 3.0, "the hung-up guesses still hold the conference"
            await asyncio.sleep(0.1)
        # The three guesses the node judged were counted: the guesser is banned, not merely
        # held back for a second.
        (r,) = await send(port, [_raw(TOKEN, "1234")], attacker)
        assert r[0] == 429 and int(r[1]["retry-after"]) > 10, r[:2]
        assert node.wrong_pins_from(attacker) == 3
    finally:
        await svc.close()


async def test_a_half_close_after_the_request_is_a_hang_up_and_counted(
    node: PinNode, tmp_path: Path
) -> None:
    """A TCP half-close (shutdown(SHUT_WR), no TLS close_notify) right after an HTTP/1.1
    request: over TLS the event loop closes the connection (asyncio's SSL transport cannot stay
    half-open), so it is a hang-up like any other, and the guess the node judged is counted
    (was: not counted, its reservation lapsing after ttl)."""
    node.delay = 0.3
    cfg = config(node, tmp_path, health_interval=CALM, maxretry=1, bantime=60)
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    source = "127.0.24.1"
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=_ssl(), local_addr=(source, 0)
        )
        writer.write(_raw(TOKEN, "0000"))
        await _node_busy_with(node, source)
        writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await asyncio.wait_for(_read(reader), 10)
        writer.close()
        await _node_done_with(node, source)
        (r,) = await send(port, [_raw(TOKEN, "1234")], source)
        assert r[0] == 429 and int(r[1]["retry-after"]) > 10, r[:2]
    finally:
        await svc.close()


def _join(headers: list[tuple[str, str]], body: dict[str, str]) -> bytes:
    data = json.dumps(body).encode()
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (
        f"POST {TOKEN} HTTP/1.1\r\nHost: localhost\r\n{lines}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def test_distinct_pins_hashes_the_pin_the_node_reads(tmp_path: Path) -> None:
    """guard.distinct_pins counts a repeated wrong PIN once, so the guard must hash the PIN
    the node reads. nodesim reads the `pin` header, else the body's "pin". Was: `Connection:
    pin` (the proxy drops the field, RFC 9110 §7.6.1) beside a constant `pin: 000000` made
    every body-PIN guess "the same PIN" (eight wrong PINs, never banned), and of repeated
    `pin` fields only the last was hashed."""
    ns = NodeSim([Conference("meet", "123456", None)])
    await ns.start()
    cfg = config(
        SimpleNamespace(address=ns.url),  # type: ignore[arg-type]
        tmp_path,
        health_interval=CALM,
        maxretry=3,
        bantime=60,
        distinct_pins=True,
    )
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    spellings = {
        "body PIN": lambda i: _join([], {"display_name": "x", "pin": f"{i:06d}"}),
        "Connection: pin": lambda i: _join(
            [("pin", "000000"), ("Connection", "pin")], {"display_name": "x", "pin": f"{i:06d}"}
        ),
        "two pin fields": lambda i: _join(
            [("pin", f"{i:06d}"), ("pin", "000000")], {"display_name": "x"}
        ),
    }
    try:
        for j, (name, make) in enumerate(spellings.items()):
            source = f"127.0.21.{j + 1}"
            statuses = [(await send(port, [make(i)], source))[0][0] for i in range(1, 6)]
            assert statuses == [403, 403, 403, 429, 429], (name, statuses)
        # HTTP/2: repeated `pin` fields are joined the same way.
        c = await H2Client.open(port, "127.0.21.9")
        try:
            statuses = []
            for i in range(1, 6):
                pins = [("pin", f"{i:06d}"), ("pin", "000000")]
                sid = c.post(port, TOKEN, pins, b'{"display_name": "x"}')
                statuses += await c.wait([sid])
        finally:
            c.close()
        assert statuses == [403, 403, 403, 429, 429], statuses
    finally:
        await svc.close()
        await ns.close()


async def test_path_spellings_over_h2_do_not_evade(node: PinNode, tmp_path: Path) -> None:
    """Held: the EVASIONS of test_guard_proxy as `:path` (and headers) of HTTP/2 requests."""
    cfg = config(node, tmp_path, health_interval=CALM, maxretry=1, bantime=60)
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    missed: list[str] = []
    try:
        for i, (name, kw) in enumerate(EVASIONS):
            if "version" in kw:
                continue  # (HTTP/1.0 has no HTTP/2 spelling)
            extra = [("pin", "0000")]
            for line in kw.get("extra", "").split("\r\n"):
                if line:
                    k, _, v = line.partition(":")
                    extra.append((k.strip().lower(), v.strip()))
            source = f"127.0.22.{i + 1}"
            c = await H2Client.open(port, source)
            try:
                (first,) = await c.wait([c.post(port, kw.get("target", TOKEN), extra)])
                if first == 400:  # refused by vetting (".."): nothing reached the node
                    assert node.attempts_from(source) == 0, name
                    continue
                assert first == 403, (name, first)
                (then,) = await c.wait([c.post(port, TOKEN, [("pin", "1234")])])
            finally:
                c.close()
            if then != 429:
                missed.append(name)
    finally:
        await svc.close()
    assert missed == []


async def test_fifty_streams_of_one_connection_race_the_threshold(
    node: PinNode, tmp_path: Path
) -> None:
    """Held: 50 guesses on one HTTP/2 connection at once: no more than maxretry reach the node,
    whatever the engine's stream order; the rest get 429."""
    node.delay = 0.1
    cfg = config(node, tmp_path, health_interval=CALM, maxretry=3, bantime=60)
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    source = "127.0.23.1"
    try:
        c = await H2Client.open(port, source)
        try:
            sids = [c.post(port, TOKEN, [("pin", f"{i:04d}")]) for i in range(50)]
            statuses = await c.wait(sids)
        finally:
            c.close()
        assert set(statuses) <= {403, 429} and statuses.count(403) <= 3, statuses
        assert node.wrong_pins_from(source) == statuses.count(403) >= 1
    finally:
        await svc.close()


async def test_forwarding_headers_from_a_client_neither_shield_it_nor_ban_others(
    node: PinNode, tmp_path: Path
) -> None:
    """Held: without trusted_proxies, X-Forwarded-For, X-Real-IP and Forwarded naming another
    address are the client's text: the guesser is banned, the address it named is not."""
    cfg = config(node, tmp_path, health_interval=CALM, maxretry=2, bantime=60)
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    guesser, innocent = "127.0.25.1", "127.0.25.2"
    spoof = (
        f'X-Forwarded-For: {innocent}\r\nX-Real-IP: {innocent}\r\nForwarded: for="{innocent}"\r\n'
    )
    try:
        for i in range(2):
            assert await attempt(port, f"000{i}", source=guesser, extra=spoof) == 403
        assert await attempt(port, "1234", source=guesser, extra=spoof) == 429
        assert await attempt(port, "1234", source=innocent) == 200
        assert {a[0] for a in node.attempts} == {guesser, innocent}  # the node's X-Real-IP
    finally:
        await svc.close()


async def test_rotating_addresses_inside_one_ipv6_64_behind_a_balancer(
    node: PinNode, tmp_path: Path
) -> None:
    """Held: a guesser behind a trusted balancer takes a new address of its /64 for every
    guess: prefix_maxretry failures ban the whole /64; the neighbouring /64 still joins."""
    cfg = config(node, tmp_path, health_interval=CALM, maxretry=3, prefix_maxretry=4, bantime=60)
    cfg = replace(cfg, proxy=replace(cfg.proxy, trusted_proxies=["127.0.0.1/32"]))
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    try:
        statuses = []
        for i in range(10):
            xff = f"X-Forwarded-For: 2001:db8:1:2::{i + 1:x}\r\n"
            (r,) = await send(port, [_raw(TOKEN, f"{i:04d}", extra=xff)])
            statuses.append((r[0], int(r[1].get("retry-after", 0))))
        assert statuses[:4] == [(403, 0)] * 4
        assert all(s == 429 and retry > 10 for s, retry in statuses[4:]), statuses
        assert sum(node.wrong_pins_from(f"2001:db8:1:2::{i + 1:x}") for i in range(10)) == 4
        neighbour = "X-Forwarded-For: 2001:db8:1:3::1\r\n"
        assert await attempt(port, "1234", extra=neighbour) == 200
    finally:
        await svc.close()
