#!/usr/bin/env python3
"""hyper-h2's own CPU per HTTP/2 request on the server side: the floor under proxy/h2.py.

`run.py --scenarios h2-status` measures confedge's whole HTTP/2 path (TLS, the adapter, the
exchange core, the node connection). This measures only the framing library the adapter is
built on, with no sockets, no TLS and no proxy code: a hyper-h2 server connection configured
exactly as `proxy.h2.server_config()` configures a client's, fed what h2load sends (a batch of
`--streams` GET requests on one connection, then the WINDOW_UPDATEs a client returns for the
DATA it read) and answering each stream with HEADERS and one DATA frame that ends it, as
`H2Stream.pump` does for a small response. Each request's header block is checked by
`proxy.request.h2_fields_problem`, as `H2Client.event` does (RFC 9113 §8.2, §8.3). Only the
server side's calls are timed.

It then runs the same load through `proxy.h2engine`, the interface the adapter calls, once on
each engine: hyper-h2 ("python") and libnghttp2 ("native", when built), so the two framing
costs can be compared directly.

Whatever this prints per request is CPU that confedge spends on HTTP/2 before any of its own
work, so it bounds from below what tuning the adapter can reach. `--hyper-h2-validation` also
measures the way the adapter validated requests before: hyper-h2's own inbound validation,
which loops over every byte of every field in Python.

Usage:
    .venv/bin/python bench/proxy/h2floor.py [--requests N] [--streams M] [--body BYTES]
        [--hyper-h2-validation]
"""

from __future__ import annotations

import argparse
import sys
import time

import h2.config
import h2.connection
import h2.events

from confedge.proxy import h2engine
from confedge.proxy.h2engine import describe, native_available, new_engine, server_config
from confedge.proxy.request import h2_fields_problem

# What h2load sends (nghttp2 1.52, Debian 12) and what a node's status answer carries on the
# way back, as the adapter turns it into HEADERS (lower-case, hop-by-hop fields dropped).
REQUEST = [
    (b":method", b"GET"),
    (b":path", b"/api/client/v2/status"),
    (b":scheme", b"https"),
    (b":authority", b"127.0.0.1:8443"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
RESPONSE = [
    (b":status", b"200"),
    (b"server", b"nginx"),
    (b"date", b"Sun, 06 Dec 2026 17:00:00 GMT"),
    (b"content-type", b"application/json"),
]


def _client_reads(client: h2.connection.H2Connection, wire: bytes, streams: int) -> bytes:
    """The client's side of one batch (not timed): read the `streams` responses, check that
    each ended, give back the window their DATA used; returns the WINDOW_UPDATEs to send."""
    ended = 0
    for ev in client.receive_data(wire):
        ended += isinstance(ev, h2.events.StreamEnded)
        if isinstance(ev, h2.events.DataReceived):
            client.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
    if ended != streams:
        raise SystemExit(f"the client saw {ended} of {streams} responses end")
    return client.data_to_send()


def run(requests: int, streams: int, body: bytes, in_hyper_h2: bool) -> float:
    """Server-side µs per request, best of 5 passes of `requests` requests; `in_hyper_h2`:
    requests validated by hyper-h2 itself instead of h2_fields_problem."""
    cfg = server_config()
    if in_hyper_h2:
        cfg = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=cfg.validate_outbound_headers,
            normalize_outbound_headers=cfg.normalize_outbound_headers,
        )
    response = [*RESPONSE, (b"content-length", b"%d" % len(body))]
    best = float("inf")
    for _ in range(5):
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        server = h2.connection.H2Connection(config=cfg)
        client.initiate_connection()
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
        spent = 0.0
        for _batch in range(max(1, requests // streams)):
            sids = []
            for _ in range(streams):
                sid = client.get_next_available_stream_id()
                client.send_headers(sid, REQUEST, end_stream=True)
                sids.append(sid)
            wire = client.data_to_send()
            t0 = time.perf_counter()
            events = server.receive_data(wire)
            out = []
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    if not in_hyper_h2 and h2_fields_problem(ev.headers or []) is not None:
                        raise SystemExit(f"a request refused: {ev.headers!r}")
                    sid = ev.stream_id or 0
                    server.send_headers(sid, response)
                    window = server.local_flow_control_window(sid)
                    if min(window, server.max_outbound_frame_size) < len(body):
                        raise SystemExit(f"stream {sid}: send window {window} < {len(body)} B")
                    server.send_data(sid, body, end_stream=True)
                    out.append(server.data_to_send())
            spent += time.perf_counter() - t0
            if len(out) != streams:
                raise SystemExit(f"hyper-h2 answered {len(out)} of {streams} requests")
            acks = _client_reads(client, b"".join(out), streams)
            t0 = time.perf_counter()
            server.receive_data(acks)
            server.data_to_send()
            spent += time.perf_counter() - t0
        best = min(best, spent / (max(1, requests // streams) * streams))
    return best * 1e6


def run_engine(kind: str, requests: int, streams: int, body: bytes) -> float:
    """The same load through `proxy.h2engine` (what the adapter calls), engine `kind`
    ("python": hyper-h2, "native": libnghttp2): server-side µs per request, best of 5."""
    response = [*RESPONSE, (b"content-length", b"%d" % len(body))]
    best = float("inf")
    for _ in range(5):
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        server = new_engine(kind, max_streams=100, max_header_list=32768)
        client.initiate_connection()
        server.initiate()
        server.receive(client.data_to_send())
        client.receive_data(server.output())
        server.receive(client.data_to_send())
        spent = 0.0
        for _batch in range(max(1, requests // streams)):
            for _ in range(streams):
                client.send_headers(client.get_next_available_stream_id(), REQUEST, end_stream=True)
            wire = client.data_to_send()
            t0 = time.perf_counter()
            answered = 0
            for kind_, sid, headers, _ended in server.receive(wire):
                if kind_ == h2engine.REQUEST:
                    if h2_fields_problem(headers) is not None:
                        raise SystemExit(f"a request refused: {headers!r}")
                    server.respond(sid, response, False)
                    if min(server.window(sid), server.max_frame()) < len(body):
                        raise SystemExit(f"stream {sid}: send window < {len(body)} B")
                    server.send(sid, body, True)
                    answered += 1
            out = server.output()
            spent += time.perf_counter() - t0
            if answered != streams:
                raise SystemExit(f"the {kind} engine answered {answered} of {streams} requests")
            acks = _client_reads(client, out, streams)
            t0 = time.perf_counter()
            server.receive(acks)
            server.output()
            spent += time.perf_counter() - t0
        best = min(best, spent / (max(1, requests // streams) * streams))
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--streams", type=int, default=10, help="requests in flight (h2load -m)")
    ap.add_argument("--body", type=int, default=40, help="response body bytes")
    ap.add_argument(
        "--hyper-h2-validation",
        action="store_true",
        help="also measure with hyper-h2 validating requests itself (the adapter before)",
    )
    args = ap.parse_args(argv)
    if not 1 <= args.streams <= 100 or args.body < 0 or args.body > 16384 or args.requests < 1:
        ap.error("--streams must be 1-100, --body 0-16384, --requests at least 1")
    if args.streams * args.body > 32767:
        # One batch's DATA must fit what is left of the connection's window (65,535 bytes,
        # RFC 9113 §6.9.2): the client returns window only once half of it is used (as
        # nghttp2 does), so up to half can be outstanding when a batch starts.
        ap.error("--streams x --body must be at most 32,767 (half the connection window)")
    body = b"x" * args.body
    us = run(args.requests, args.streams, body, in_hyper_h2=False)
    print(
        f"hyper-h2 server side: {us:.1f} us per request "
        f"({args.streams} streams in flight, {args.body} B body; best of 5 x {args.requests})"
    )
    if args.hyper_h2_validation:
        old = run(args.requests, args.streams, body, in_hyper_h2=True)
        print(f"  validated by hyper-h2 itself instead: {old:.1f} us per request")
    for kind in ("python", "native"):
        ok, why = native_available()
        if kind == "native" and not ok:
            print(f"engine native: not built ({why})")
            continue
        us = run_engine(kind, args.requests, args.streams, body)
        name = describe(kind) if kind == "native" else "hyper-h2"
        print(f"engine {kind} ({name}), through proxy.h2engine: {us:.1f} us per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
