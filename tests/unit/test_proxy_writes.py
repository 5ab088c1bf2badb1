"""Syscall economy of the proxy's hot path, with counting fake transports: one write to the node
per request (head and buffered body together) and one write to the client per small response
(head and body together), which is one TLS record and one write(2) each (issue 3); small writes
are coalesced to the end of the event-loop iteration, in order, and never reordered with a
close or a large write (WorkerRuntime "Write coalescing")."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from confedge.config import parse_config
from confedge.proxy.core import WorkerRuntime
from confedge.proxy.server import ClientConnection
from confedge.proxy.upstream import UpstreamConnection


class CountingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.writes.append(b"".join(chunks))  # one writev(2)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def feed(client: ClientConnection, data: bytes) -> None:
    """What the TLS transport does for a BufferedProtocol."""
    buf = client.get_buffer(len(data))
    buf[: len(data)] = data
    client.buffer_updated(len(data))


def _core(tmp_path: Path) -> WorkerRuntime:
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "turn": {"enabled": False},
            "proxy": {"nodes": ["http://127.0.0.1:9"]},
        }
    )
    return WorkerRuntime(cfg, asyncio.get_running_loop())


async def test_one_write_each_way(tmp_path: Path) -> None:
    core = _core(tmp_path)
    client = ClientConnection(core)
    ct = CountingTransport()
    client.connection_made(ct)  # type: ignore[arg-type]
    up = UpstreamConnection(core.pools[0])
    ut = CountingTransport()
    up.connection_made(ut)  # type: ignore[arg-type]
    core.pools[0].idle.append(up)
    body = b'{"status": "success"}'
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    requests = [
        b"GET /api/client/v2/status HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    ]
    for n, raw in enumerate(requests, start=1):
        feed(client, raw)
        assert len(ut.writes) == n - 1  # queued until the end of this loop iteration
        await asyncio.sleep(0)
        assert len(ut.writes) == n  # head (+ body) in one write to the node
        assert ut.writes[-1].startswith(raw.split(b" ", 1)[0])
        assert raw.endswith(b"hello") == ut.writes[-1].endswith(b"\r\n\r\nhello")
        up.data_received(answer)
        await asyncio.sleep(0)
        assert len(ct.writes) == n  # head and body in one write to the client
        assert ct.writes[-1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert ct.writes[-1].endswith(b"\r\n\r\n" + body)
        assert up in core.pools[0].idle  # kept alive for the next request
    # Reads land in one buffer per worker, not a fresh allocation per read or per connection.
    other = ClientConnection(core)
    assert client.get_buffer(1) is other.get_buffer(65536) is core.read_view
    await core.close()


class LoggingTransport(CountingTransport):
    """Records writes and closes of several transports in one shared, ordered journal."""

    def __init__(self, name: str, journal: list[tuple[str, str, bytes]]) -> None:
        super().__init__()
        self.name = name
        self.journal = journal

    def write(self, data: bytes) -> None:
        super().write(data)
        self.journal.append((self.name, "write", bytes(data)))

    def close(self) -> None:
        super().close()
        self.journal.append((self.name, "close", b""))


async def test_writes_of_one_iteration_go_out_together_in_order(tmp_path: Path) -> None:
    core = _core(tmp_path)
    journal: list[tuple[str, str, bytes]] = []
    a, b = LoggingTransport("a", journal), LoggingTransport("b", journal)
    core.send(a, b"a1")  # type: ignore[arg-type]
    core.send(b, b"b1")  # type: ignore[arg-type]
    core.send(a, b"a2")  # type: ignore[arg-type]
    assert journal == []  # nothing written yet: the peers are not woken one by one
    await asyncio.sleep(0)
    assert journal == [("a", "write", b"a1"), ("b", "write", b"b1"), ("a", "write", b"a2")]
    await core.close()


async def test_a_large_write_flushes_the_queue_first_and_goes_straight_out(
    tmp_path: Path,
) -> None:
    from confedge.proxy.core import COALESCE_MAX

    core = _core(tmp_path)
    journal: list[tuple[str, str, bytes]] = []
    a = LoggingTransport("a", journal)
    big = b"x" * (COALESCE_MAX + 1)
    core.send(a, b"head")  # type: ignore[arg-type]
    core.send(a, big)  # type: ignore[arg-type]
    # Written now (so backpressure acts per chunk), after what was queued before it.
    assert journal == [("a", "write", b"head"), ("a", "write", big)]
    await asyncio.sleep(0)
    assert len(journal) == 2
    await core.close()


async def test_queued_writes_to_a_closed_transport_are_dropped(tmp_path: Path) -> None:
    core = _core(tmp_path)
    journal: list[tuple[str, str, bytes]] = []
    a, b = LoggingTransport("a", journal), LoggingTransport("b", journal)
    core.send(a, b"lost")  # type: ignore[arg-type]
    core.send(b, b"kept")  # type: ignore[arg-type]
    a.abort()  # the client went away meanwhile
    await asyncio.sleep(0)
    assert journal == [("b", "write", b"kept")]
    await core.close()


async def test_a_response_queued_before_connection_close_is_written_before_the_close(
    tmp_path: Path,
) -> None:
    """HTTP/1.0 without keep-alive: the response is queued, then finished() closes; the close
    must not overtake the queued response (it would truncate it to nothing)."""
    core = _core(tmp_path)
    journal: list[tuple[str, str, bytes]] = []
    client = ClientConnection(core)
    ct = LoggingTransport("client", journal)
    client.connection_made(ct)  # type: ignore[arg-type]
    up = UpstreamConnection(core.pools[0])
    up.connection_made(CountingTransport())  # type: ignore[arg-type]
    core.pools[0].idle.append(up)
    feed(client, b"GET /x HTTP/1.0\r\n\r\n")
    await asyncio.sleep(0)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [(n, op) for n, op, _ in journal] == [("client", "write"), ("client", "close")]
    assert journal[0][2].endswith(b"Connection: close\r\n\r\nok")
    await core.close()


async def test_the_queue_is_flushed_early_once_it_holds_a_batch(tmp_path: Path) -> None:
    """Many small writes in one iteration (a node's body in 1 KiB chunks, read 256 KiB at a
    time by libuv, up to 32 reads per iteration) reach the transport every COALESCE_BATCH
    bytes, so its pause_writing can stop the reading before the proxy holds megabytes."""
    from confedge.proxy.core import COALESCE_BATCH

    core = _core(tmp_path)
    journal: list[tuple[str, str, bytes]] = []
    a = LoggingTransport("a", journal)
    piece = b"y" * 1024
    for _ in range(COALESCE_BATCH // 1024):
        core.send(a, piece)  # type: ignore[arg-type]
    assert journal == []  # exactly one batch: still queued
    core.send(a, piece)  # type: ignore[arg-type]
    assert len(journal) == COALESCE_BATCH // 1024 + 1  # over the batch: written now, in order
    assert core.out == [] and core.out_bytes == 0
    core.send(a, b"next")  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert journal[-1] == ("a", "write", b"next")
    await core.close()
