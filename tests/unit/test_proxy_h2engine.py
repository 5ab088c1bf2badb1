"""The HTTP/2 engines (proxy/h2engine.py) side by side: libnghttp2 (`native`) and hyper-h2
(`python`) driven by a hyper-h2 client through memory, no sockets. Every test runs on both, so
the adapter (proxy/h2.py) can rely on the same events and the same errors from either; the
adapter's own behaviour over real sockets is in test_proxy_h2_adapter.py and
tests/integration/test_proxy_h2.py, which `make test` runs once per engine
(CONFEDGE_H2_ENGINE). The native cases skip where the extension is not built, except when
CONFEDGE_H2_ENGINE=native asks for it (then its absence fails)."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from confedge.proxy import h2engine
from confedge.proxy.h2engine import (
    DATA,
    END,
    NO_ERROR,
    PROTOCOL_ERROR,
    REQUEST,
    RESET,
    WINDOW,
    EngineError,
    StreamGone,
    new_engine,
)


@pytest.fixture(params=["python", "native"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "native":
        ok, why = h2engine.native_available()
        if not ok:
            if os.environ.get(h2engine.ENV) == "native":
                pytest.fail(why)
            pytest.skip(why)
    return str(request.param)


class Pair:
    """An engine and a hyper-h2 client wired together through memory."""

    def __init__(self, kind: str, *, max_streams: int = 100, max_header_list: int = 16384) -> None:
        self.engine = new_engine(kind, max_streams=max_streams, max_header_list=max_header_list)
        self.engine.initiate()
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        )
        self.client.initiate_connection()
        self.client_events: list[Any] = []
        self.to_server()
        self.to_client()
        self.to_server()  # the client's SETTINGS ACK

    def to_server(self) -> list[tuple[int, int, Any, Any]]:
        return self.engine.receive(self.client.data_to_send())

    def to_client(self) -> list[Any]:
        events = self.client.receive_data(self.engine.output())
        self.client_events += events
        return events

    def get(self, sid: int, path: str = "/x", *, end: bool = True) -> list[Any]:
        self.client.send_headers(
            sid,
            [
                (":method", "GET" if end else "POST"),
                (":scheme", "https"),
                (":authority", "edge.example"),
                (":path", path),
            ],
            end_stream=end,
        )
        return self.to_server()


def _kinds(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


def test_settings_and_a_request(kind: str) -> None:
    p = Pair(kind, max_streams=7, max_header_list=8192)
    (changed,) = [e for e in p.client_events if isinstance(e, h2.events.RemoteSettingsChanged)]
    s = {k: v.new_value for k, v in changed.changed_settings.items()}
    codes = h2.settings.SettingCodes
    assert s[codes.MAX_CONCURRENT_STREAMS] == 7
    assert s[codes.MAX_HEADER_LIST_SIZE] == 8192
    assert s[codes.ENABLE_PUSH] == 0
    events = p.get(1, "/api/client/v2/status")
    (req,) = [e for e in events if e[0] == REQUEST]
    assert req[1] == 1
    assert req[2] == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"edge.example"),
        (b":path", b"/api/client/v2/status"),
    ]
    assert req[3] is True  # END_STREAM came with the head


def test_response_head_and_body(kind: str) -> None:
    p = Pair(kind)
    p.get(1)
    p.engine.respond(1, [(b":status", b"200"), (b"content-type", b"text/plain")], False)
    p.engine.send(1, b"hello ", False)
    p.engine.send(1, b"world", True)
    events = p.to_client()
    assert _kinds(events) == ["ResponseReceived", "DataReceived", "StreamEnded"] or _kinds(
        events
    ) == ["ResponseReceived", "DataReceived", "DataReceived", "StreamEnded"]
    assert dict(events[0].headers)[b":status"] == b"200"
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert body == b"hello world"


def test_response_without_body_and_end_after_data(kind: str) -> None:
    p = Pair(kind)
    p.get(1)
    p.get(3)
    p.engine.respond(1, [(b":status", b"204")], True)
    p.engine.respond(3, [(b":status", b"200")], False)
    p.engine.send(3, b"abc", False)
    p.engine.end(3)
    events = p.to_client()
    ended = {e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)}
    assert ended == {1, 3}


def test_window_limits_what_the_engine_takes(kind: str) -> None:
    p = Pair(kind)
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    events = p.to_server()
    assert any(e[0] == WINDOW for e in events)
    p.to_client()  # SETTINGS ACK
    p.get(1)
    p.engine.respond(1, [(b":status", b"200")], False)
    assert p.engine.window(1) == 100
    assert p.engine.max_frame() == 16384
    p.engine.send(1, b"x" * 100, False)
    assert p.engine.window(1) == 0  # taken (queued or framed), nothing more fits
    got = p.to_client()
    data = [e for e in got if isinstance(e, h2.events.DataReceived)]
    assert sum(len(e.data) for e in data) == 100
    assert p.engine.buffered(1) == 0 and p.engine.buffered(0) == 0
    p.client.acknowledge_received_data(100, 1)
    events = p.to_server()
    assert any(e[0] == WINDOW for e in events)
    assert p.engine.window(1) == 100
    p.engine.send(1, b"y" * 50, True)
    got = p.to_client()
    assert any(isinstance(e, h2.events.StreamEnded) for e in got)


def test_request_body_windows_come_back_only_when_consumed(kind: str) -> None:
    p = Pair(kind)
    p.get(1, end=False)
    start = p.client.outbound_flow_control_window
    for _ in range(4):  # more than half the window: both engines then send WINDOW_UPDATE
        p.client.send_data(1, b"b" * 10000, pad_length=9)
    p.client.end_stream(1)
    events = p.to_server()
    data = [e for e in events if e[0] == DATA]
    assert b"".join(e[2] for e in data) == b"b" * 40000
    assert any(e[0] == END and e[1] == 1 for e in events)
    p.to_client()
    assert p.client.outbound_flow_control_window == start - 40040  # nothing given back yet
    for e in data:
        p.engine.consume(1, e[3])
    p.to_client()
    # everything back, padding included (the engine accounts for it either way)
    assert p.client.outbound_flow_control_window == start


def test_client_reset_is_reported_as_remote(kind: str) -> None:
    p = Pair(kind)
    p.get(1, end=False)
    p.client.reset_stream(1, error_code=h2.errors.ErrorCodes.CANCEL)
    events = p.to_server()
    assert (RESET, 1, True, h2.errors.ErrorCodes.CANCEL) in events
    with pytest.raises(StreamGone):
        p.engine.respond(1, [(b":status", b"200")], True)
    assert p.engine.window(1) == 0


def test_no_error_reset_follows_the_whole_response(kind: str) -> None:
    """RFC 9113 §8.1: a response complete before the request body is, then RST_STREAM
    NO_ERROR; the reset must never overtake the response."""
    p = Pair(kind)
    p.get(1, end=False)
    p.engine.respond(1, [(b":status", b"413")], False)
    p.engine.send(1, b"too large", True)
    p.engine.reset(1, NO_ERROR)
    events = p.to_client()
    assert _kinds(events) == ["ResponseReceived", "DataReceived", "StreamEnded", "StreamReset"]
    assert events[-1].error_code == NO_ERROR


def test_oversized_header_list_is_a_connection_error(kind: str) -> None:
    p = Pair(kind, max_header_list=1000)
    p.client.send_headers(
        1,
        [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "a"),
            (":path", "/"),
            *[(f"x-{i}", "v" * 40) for i in range(40)],
        ],
        end_stream=True,
    )
    with pytest.raises(EngineError):
        p.to_server()
    events = p.client.receive_data(p.engine.output())
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


def test_trailers_end_the_stream_and_count_against_the_limit(kind: str) -> None:
    """Request trailers are not passed on (the adapter drops them), but they end the stream
    and their block is held to SETTINGS_MAX_HEADER_LIST_SIZE like the head's."""
    p = Pair(kind, max_header_list=1000)
    p.get(1, end=False)
    p.client.send_data(1, b"x")
    p.client.send_headers(1, [("x-checksum", "abc")], end_stream=True)
    got = p.to_server()
    assert [e[0] for e in got if e[1] == 1] == [DATA, END]
    p.get(3, end=False)
    p.client.send_headers(3, [(f"x-t{i}", "v" * 40) for i in range(40)], end_stream=True)
    with pytest.raises(EngineError):
        p.to_server()
    events = p.client.receive_data(p.engine.output())
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


def test_a_connection_error_ends_the_session(kind: str) -> None:
    """A WINDOW_UPDATE of 0 on the connection (RFC 9113 §6.9): hyper-h2 raises, libnghttp2
    queues GOAWAY itself; either way GOAWAY PROTOCOL_ERROR goes out and want_io() is False."""
    p = Pair(kind)
    assert p.engine.want_io()
    with contextlib.suppress(EngineError):
        p.engine.receive(bytes.fromhex("000004080000000000") + bytes(4))
    events = p.client.receive_data(p.engine.output())
    (term,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert term.error_code == PROTOCOL_ERROR
    assert not p.engine.want_io()


def test_a_bad_preface_is_an_error(kind: str) -> None:
    engine = new_engine(kind, max_streams=10, max_header_list=8192)
    engine.initiate()
    with pytest.raises(EngineError):
        engine.receive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


def test_goaway(kind: str) -> None:
    p = Pair(kind)
    p.get(1)
    p.engine.goaway(PROTOCOL_ERROR)
    events = p.to_client()
    (term,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert term.error_code == PROTOCOL_ERROR
    assert term.last_stream_id == 1


def test_streams_over_the_limit_never_become_requests(kind: str) -> None:
    """RFC 9113 §5.1.2: past SETTINGS_MAX_CONCURRENT_STREAMS a stream is refused (libnghttp2:
    RST_STREAM REFUSED_STREAM; hyper-h2: a connection error); either way no request starts."""
    p = Pair(kind, max_streams=2)
    # (the hyper-h2 client would refuse to open the third itself: make it believe in 1000)
    limits = p.client.remote_settings
    limits[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
    limits.acknowledge()
    seen: list[int] = []
    for sid in (1, 3, 5):
        try:
            seen += [e[1] for e in p.get(sid, end=False) if e[0] == REQUEST]
        except EngineError:
            break
    assert seen == [1, 3]


def _fuzz(kind: str, sessions: int, seed: int) -> tuple[int, int]:
    """`sessions` fresh engines, each fed a real client's preface and then its frames (a GET, a
    padded POST body, WINDOW_UPDATE, RST_STREAM, PING, a request ended by an empty DATA) with a
    few bytes changed, or random bytes, split at random points; the adapter's calls (respond,
    send up to 70,000 bytes, end, reset, consume, window, buffered, goaway) are made at random
    on the streams that come out. Returns (events, connection errors)."""
    rng = random.Random(seed)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    preface = c.data_to_send()
    get = [(":method", "GET"), (":scheme", "https"), (":authority", "a"), (":path", "/x")]
    c.send_headers(1, get, end_stream=True)
    c.send_headers(3, [*get[1:], (":method", "POST"), ("x-a", "b" * 50)])
    c.send_data(3, b"d" * 700, pad_length=20)
    c.increment_flow_control_window(1000)
    c.reset_stream(3)
    c.ping(b"12345678")
    c.send_headers(5, get)
    c.end_stream(5)
    frames = c.data_to_send()
    events = errors = 0
    for _ in range(sessions):
        engine = new_engine(
            kind, max_streams=rng.choice([1, 2, 100]), max_header_list=rng.choice([64, 16384])
        )
        engine.initiate()
        if rng.random() < 0.2:
            body = bytearray(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
        else:
            body = bytearray(frames)
            for _ in range(rng.randrange(0, 10)):
                body[rng.randrange(len(body))] = rng.getrandbits(8)
        cuts = sorted(rng.sample(range(1, len(body)), min(3, len(body) - 1)))
        pieces = [preface] + [
            bytes(body[a:b]) for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)
        ]
        for piece in pieces:
            try:
                got = engine.receive(piece)
            except EngineError:
                errors += 1
                engine.output()
                break
            events += len(got)
            for ev in got:
                assert isinstance(ev, tuple) and len(ev) == 4
                sid, op = ev[1], rng.random()
                try:
                    if ev[0] == REQUEST and op < 0.5:
                        engine.respond(sid, [(b":status", b"200")], False)
                        engine.send(sid, b"z" * rng.randrange(0, 70000), rng.random() < 0.5)
                        if rng.random() < 0.3:
                            engine.end(sid)
                    elif ev[0] == REQUEST and op < 0.7:
                        engine.respond(sid, [(b":status", b"204")], True)
                    elif ev[0] == REQUEST and op < 0.8:
                        engine.reset(sid, rng.choice([0, 2, 8]))
                    elif ev[0] == DATA:
                        engine.consume(sid, ev[3])
                    engine.window(sid)
                    engine.buffered(sid)
                    if rng.random() < 0.01:
                        engine.goaway(0)
                except EngineError:
                    pass
            assert isinstance(engine.output(), bytes)
    return events, errors


def test_hostile_bytes_never_crash_either_engine(kind: str) -> None:
    """Mutated and random frames with the adapter's calls in between: events or EngineError,
    nothing else (a crash here would be a crash of the worker)."""
    events, errors = _fuzz(kind, 1500, 1616)
    assert events > 1000 and errors > 50  # (the inputs reach both the good and the bad paths)


@pytest.mark.slow
def test_native_engine_fuzz_a_million_sessions() -> None:
    """10^6 sessions of `_fuzz` on libnghttp2 (about a minute; docs/PROXY.md has the run under
    AddressSanitizer)."""
    ok, why = h2engine.native_available()
    if not ok:
        pytest.skip(why)
    events, _ = _fuzz("native", 1_000_000, 2)
    assert events > 1_000_000


# -- choosing the engine (proxy.http2_engine, CONFEDGE_H2_ENGINE) ----------------------------------


def test_choose_falls_back_and_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(h2engine.ENV, raising=False)
    monkeypatch.setattr(h2engine, "_h2native", None)
    assert h2engine.choose("auto") == "python"
    assert h2engine.choose("python") == "python"
    with pytest.raises(ValueError, match=r'^proxy\.http2_engine = "native": .*libnghttp2-dev'):
        h2engine.choose("native")
    monkeypatch.setenv(h2engine.ENV, "native")
    with pytest.raises(ValueError, match=r'^CONFEDGE_H2_ENGINE = "native"'):
        h2engine.choose("auto")
    monkeypatch.setenv(h2engine.ENV, "fast")
    with pytest.raises(ValueError, match="expected"):
        h2engine.choose("auto")
    monkeypatch.setenv(h2engine.ENV, "python")
    assert h2engine.choose("native") == "python"  # (the environment wins: the test suites)


def test_check_reports_the_engine_and_refuses_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from confedge.cli import main

    monkeypatch.delenv(h2engine.ENV, raising=False)
    path = tmp_path / "c.toml"
    path.write_text(
        '[proxy]\nnodes = ["10.0.0.11"]\nhttp2_engine = "native"\n[turn]\nenabled = false\n'
    )
    if h2engine.native_available()[0]:
        assert main(["check", "--config", str(path)]) == 0
        assert "# HTTP/2 framing: libnghttp2 1." in capsys.readouterr().out
    monkeypatch.setattr(h2engine, "_h2native", None)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('confedge: proxy.http2_engine = "native": the extension')
    path.write_text(
        '[proxy]\nnodes = ["10.0.0.11"]\nhttp2_engine = "fast"\n[turn]\nenabled = false\n'
    )
    with pytest.raises(SystemExit) as stop:
        main(["check", "--config", str(path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "confedge: proxy.http2_engine: \"fast\" is not valid: input should be 'auto', 'native' "
        "or 'python'\n"
    )


def test_the_response_header_table_stays_small_whatever_the_client_allows(kind: str) -> None:
    """SETTINGS_HEADER_TABLE_SIZE is the most the client lets the proxy's HPACK encoder use
    (RFC 9113 §6.5.2, RFC 7541 §4.2), not a size to take: a client announcing 2^32-1 must not
    make the proxy keep every field it ever sent for the life of the connection. Both engines
    stay at the default 4096 bytes (libnghttp2's own cap)."""
    p = Pair(kind)
    p.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**32 - 1})
    p.to_server()
    p.to_client()
    p.to_server()
    for sid in (1, 3, 5):
        p.get(sid)
        p.engine.respond(sid, [(b":status", b"200"), (b"x-n", b"%d" % sid * 1500)], True)
        p.to_client()
    # what the proxy's encoder keeps is what the client's decoder mirrors (RFC 7541 §2.3.2)
    assert p.client.decoder.header_table._current_size <= 4096
    assert [e.stream_id for e in p.client_events if isinstance(e, h2.events.StreamEnded)] == [
        1,
        3,
        5,
    ]
