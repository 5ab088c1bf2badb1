"""The HTTP/2 framing engines under proxy/h2.py: libnghttp2 (native) or hyper-h2 (pure Python).

Why two: hyper-h2 costs about 60 µs of CPU per request on the benchmark machine before any of
the proxy's own work (bench/proxy/h2floor.py), most of an HTTP/2 request's cost. libnghttp2, the
C library curl and h2load are built on, does the same framing, HPACK and flow control for a few
µs. It is used when the extension `confedge.proxy._h2native` was built (a C compiler and
Debian's libnghttp2-dev when confedge is installed); hyper-h2 remains the fallback and the
reference, and both pass the same tests (the suites run once per engine).

The interface is the one the adapter needs, sans I/O: bytes in (`receive`), event tuples out,
bytes to send pulled out in one piece (`output`). Events are ``(kind, stream id, a, b)``:

    (REQUEST, sid, headers, ended)   the request's fields as received, pseudo-headers first;
                                     ended: the stream's END_STREAM came with them
    (DATA, sid, data, flow)          request body; `flow` bytes to give back with `consume`
    (END, sid, None, None)           the client's side of the stream ended
    (RESET, sid, remote, code)       the stream was reset (remote: by the client)
    (CLOSED, 0, last_sid, code)      the client sent GOAWAY
    (WINDOW, 0, None, None)          flow-control windows opened or settings changed

Request fields are not validated by either engine (RFC 9113 §8.2, §8.3 are checked by
`request.h2_fields_problem` in the adapter, so a malformed request gets the same GOAWAY from
both); both enforce SETTINGS_MAX_HEADER_LIST_SIZE as a connection error and bound CONTINUATION
frames.

Response bodies are handed over at most `window(sid)` bytes at a time, so neither engine holds
more than the client's windows take (nghttp2 queues what it is given until its next `output`).
Errors: `EngineError` for a connection error (GOAWAY is queued: flush `output()`, then close),
`StreamGone` (a subclass) when the stream is already closed. libnghttp2 answers many connection
errors itself (GOAWAY queued, no exception); `want_io()` turns False then, and the adapter closes
after sending what is queued.

``proxy.http2_engine`` ("auto", "native", "python") chooses; the environment variable
CONFEDGE_H2_ENGINE overrides it (the test suites run once per engine with it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Final, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from confedge import backends

log = logging.getLogger("confedge.proxy")

ENV: Final = "CONFEDGE_H2_ENGINE"

REQUEST: Final = 0
DATA: Final = 1
END: Final = 2
RESET: Final = 3
CLOSED: Final = 4
WINDOW: Final = 5

# RFC 9113 §7 error codes used by the adapter
NO_ERROR: Final = 0
PROTOCOL_ERROR: Final = 1
INTERNAL_ERROR: Final = 2
ENHANCE_YOUR_CALM: Final = 11

Event = tuple[int, int, Any, Any]

HEADER_TABLE_MAX: Final = 4096  # bytes of HPACK table the response encoder uses at most

_h2native: ModuleType | None
try:
    from confedge.proxy import _h2native as _built

    _h2native = _built
    EngineError: type[Exception] = _built.H2Error
    StreamGone: type[Exception] = _built.StreamClosed
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built: no compiler or no libnghttp2-dev at install time
    _h2native = None
    _IMPORT_ERROR = f" ({exc})"

    class _EngineError(Exception):
        """A connection error: GOAWAY is queued (flush output(), then close)."""

    class _StreamGone(_EngineError):
        """The stream is closed: nothing more can be sent on it."""

    EngineError = _EngineError
    StreamGone = _StreamGone


class Engine(Protocol):
    """What the adapter (proxy/h2.py) calls; see the module docstring."""

    def initiate(self) -> None: ...
    def receive(self, data: bytes) -> list[Event]: ...
    def output(self) -> bytes: ...
    def respond(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None: ...
    def send(self, sid: int, data: bytes, end_stream: bool) -> None: ...
    def end(self, sid: int) -> None: ...
    def window(self, sid: int) -> int: ...
    def max_frame(self) -> int: ...
    def buffered(self, sid: int) -> int: ...
    def reset(self, sid: int, code: int) -> None: ...
    def goaway(self, code: int) -> None: ...
    def consume(self, sid: int, n: int) -> None: ...
    def want_io(self) -> bool: ...


def native_available() -> tuple[bool, str]:
    """(the libnghttp2 engine is built, why not)."""
    if _h2native is None:
        return False, (
            f"the extension confedge.proxy._h2native is not built{_IMPORT_ERROR}; install "
            "confedge with a C compiler and libnghttp2-dev (apt install libnghttp2-dev; "
            "`make native`, `pip install .`)"
        )
    return True, ""


def choose(setting: str) -> str:
    """The engine, "native" or "python", for ``proxy.http2_engine`` (or CONFEDGE_H2_ENGINE).

    Raises ValueError naming the key when "native" is asked for and not built."""
    return backends.choose(setting, env=ENV, key="proxy.http2_engine", available=native_available)


def describe(kind: str) -> str:
    """What frames HTTP/2 for engine `kind` (from `choose`), for the start-up log, `confedge
    check` and bench/proxy/h2floor.py."""
    if kind == "native" and _h2native is not None:
        return f"libnghttp2 {_h2native.library_version()}"
    return "hyper-h2 (pure Python)"


def new_engine(kind: str, *, max_streams: int, max_header_list: int) -> Engine:
    """An engine for one client connection: `kind` from `choose`."""
    if kind == "native":
        assert _h2native is not None
        session: Engine = _h2native.Session(
            max_streams=max_streams, max_header_list=max_header_list
        )
        return session
    return PyEngine(max_streams=max_streams, max_header_list=max_header_list)


def server_config() -> h2.config.H2Configuration:
    """hyper-h2's settings for a client connection (also bench/proxy/h2floor.py's).

    Inbound request headers are validated by `request.h2_fields_problem` in the adapter
    (RFC 9113 §8.2, §8.3: the same rules hyper-h2 checks, without its Python loop over every
    byte, a sixth of its CPU per request); hyper-h2 still normalises them (Cookie fields joined)
    and enforces the header list size and CONTINUATION limits. Outbound ones are built by the
    adapter already lower-case from values httptools parsed, so its outbound checks are
    skipped too. Trailers are not validated by either: the adapter drops them unread."""
    return h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


@contextlib.contextmanager
def _stream_errors(sid: int) -> Iterator[None]:
    """hyper-h2's exceptions as the engine interface's: StreamGone for a closed stream,
    EngineError for any other protocol error."""
    try:
        yield
    except h2.exceptions.StreamClosedError as exc:
        raise StreamGone(f"stream {sid} is closed") from exc
    except h2.exceptions.ProtocolError as exc:
        raise EngineError(str(exc)) from exc


class PyEngine:
    """The `Engine` on hyper-h2 (pure Python): the reference and the fallback."""

    def __init__(self, *, max_streams: int, max_header_list: int) -> None:
        self.conn = h2.connection.H2Connection(config=server_config())
        self.max_streams = max_streams
        self.max_header_list = max_header_list

    def initiate(self) -> None:
        conn = self.conn
        s = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                s.MAX_CONCURRENT_STREAMS: self.max_streams,
                s.MAX_HEADER_LIST_SIZE: self.max_header_list,
                s.ENABLE_PUSH: 0,
            },
        )
        # hpack refuses a header block that decodes to more than this (RFC 9113 §6.5.2).
        conn.decoder.max_header_list_size = self.max_header_list
        conn.initiate_connection()

    def receive(self, data: bytes) -> list[Event]:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # hyper-h2 has queued the GOAWAY
            raise EngineError(str(exc) or type(exc).__name__) from exc
        out: list[Event] = []
        window = False
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                out.append(
                    (REQUEST, ev.stream_id or 0, ev.headers or [], ev.stream_ended is not None)
                )
            elif isinstance(ev, h2.events.DataReceived):
                out.append(
                    (DATA, ev.stream_id or 0, ev.data or b"", ev.flow_controlled_length or 0)
                )
            elif isinstance(ev, h2.events.StreamEnded):
                out.append((END, ev.stream_id or 0, None, None))
            elif isinstance(ev, h2.events.StreamReset):
                out.append(
                    (RESET, ev.stream_id or 0, bool(ev.remote_reset), int(ev.error_code or 0))
                )
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    self._cap_table(ev)
                if not window:
                    window = True
                    out.append((WINDOW, 0, None, None))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out.append((CLOSED, 0, ev.last_stream_id, int(ev.error_code or 0)))
        return out

    def _cap_table(self, ev: h2.events.RemoteSettingsChanged) -> None:
        """The client's SETTINGS_HEADER_TABLE_SIZE is the most the response encoder may use
        (RFC 9113 §6.5.2, RFC 7541 §4.2); hyper-h2 takes all of it, so a client announcing
        2^32-1 made the proxy keep every field it sent for the life of the connection. Capped
        at the default, as libnghttp2 does."""
        changed = ev.changed_settings.get(h2.settings.SettingCodes.HEADER_TABLE_SIZE)
        if changed is not None and changed.new_value > HEADER_TABLE_MAX:
            self.conn.encoder.header_table_size = HEADER_TABLE_MAX

    def output(self) -> bytes:
        return self.conn.data_to_send()

    def respond(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        with _stream_errors(sid):
            self.conn.send_headers(sid, headers, end_stream=end_stream)

    def send(self, sid: int, data: bytes, end_stream: bool) -> None:
        with _stream_errors(sid):
            self.conn.send_data(sid, data, end_stream=end_stream)

    def end(self, sid: int) -> None:
        with _stream_errors(sid):
            self.conn.end_stream(sid)

    def window(self, sid: int) -> int:
        stream = self.conn.streams.get(sid)
        if stream is None or stream.closed:
            return 0
        try:
            return max(0, self.conn.local_flow_control_window(sid))
        except h2.exceptions.ProtocolError:  # (closed meanwhile)
            return 0

    def max_frame(self) -> int:
        return int(self.conn.max_outbound_frame_size)

    def buffered(self, sid: int) -> int:
        return 0  # hyper-h2 frames whatever it is given at once

    def reset(self, sid: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # (already closed)
            self.conn.reset_stream(sid, error_code=code)

    def goaway(self, code: int) -> None:
        self.conn.close_connection(error_code=code)

    def want_io(self) -> bool:
        return bool(self.conn.state_machine.state != h2.connection.ConnectionState.CLOSED)

    def consume(self, sid: int, n: int) -> None:
        if n <= 0:
            return
        conn = self.conn
        try:
            conn.acknowledge_received_data(n, sid)
        except h2.exceptions.ProtocolError:  # the stream is closed: the connection's share
            conn.increment_flow_control_window(n)
