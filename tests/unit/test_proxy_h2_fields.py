"""`request.h2_fields_problem`: the HTTP/2 request header checks (RFC 9113 §8.2, §8.3) that the
adapter runs instead of hyper-h2's inbound validation. They must refuse exactly the header
blocks hyper-h2 4.4 refused (its `validate_headers` for a request received by a server), so
the two verdicts are compared on generated blocks: nearly valid requests with one thing
changed, and arbitrary ones."""

from __future__ import annotations

import h2.exceptions
import h2.utilities
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confedge.proxy.request import h2_fields_problem

REQUEST_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)

VALID = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"edge.example"),
    (b":path", b"/api/client/v2/status"),
    (b"accept", b"*/*"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
]

NAMES = [
    b":method", b":scheme", b":authority", b":path", b":protocol", b":status", b":x", b":",
    b"host", b"te", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
    b"upgrade", b"accept", b"cookie", b"x-a", b"X-A", b"a:b", b"", b"a b", b"a\x7f", b"\xc3\xa9",
    b"Host", b"content-length",
]  # fmt: skip
VALUES = [
    b"", b"GET", b"CONNECT", b"POST", b"https", b"/", b"/x", b"edge.example", b"other.example",
    b"trailers", b"TRAILERS", b"gzip", b"a b", b" a", b"a ", b"\ta", b"a\t", b"a\x00b", b"a\nb",
    b"a\rb", b"websocket", b"\xff",
]  # fmt: skip


def hyper_h2_refuses(headers: list[tuple[bytes, bytes]]) -> bool:
    try:
        list(h2.utilities.validate_headers(headers, REQUEST_FLAGS))
    except h2.exceptions.ProtocolError:
        return True
    return False


def test_a_valid_request_passes() -> None:
    assert h2_fields_problem(VALID) is None
    assert h2_fields_problem([*VALID, (b"host", b"edge.example"), (b"te", b"trailers")]) is None
    # Extended CONNECT's shape (RFC 8441) is well formed; the adapter answers CONNECT with 405.
    ext = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *VALID[1:4]]
    assert h2_fields_problem(ext) is None
    assert h2_fields_problem([(b":method", b"CONNECT"), (b":authority", b"a:443")]) is None


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ([*VALID, (b"X-Upper", b"1")], "invalid character in field name b'X-Upper'"),
        ([*VALID, (b"connection", b"close")], "connection-specific field b'connection'"),
        ([*VALID, (b"te", b"gzip")], "TE other than trailers: b'gzip'"),
        ([*VALID[:2], (b"accept", b"*/*"), *VALID[2:4]], "pseudo-header field b':authority' after regular fields"),
        ([*VALID, (b":path", b"/again")], "pseudo-header field b':path' after regular fields"),
        ([*VALID[:4], (b":path", b"/again")], "duplicate pseudo-header field b':path'"),
        ([*VALID[:4], (b":status", b"200")], "pseudo-header field b':status' not allowed in a request"),
        ([*VALID, (b"x-a", b"a\x00b")], "invalid character in the value of b'x-a'"),
        ([*VALID, (b"x-a", b" padded")], "whitespace around the value of b'x-a'"),
        (VALID[:3], "no :scheme or no :path"),
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")], "neither :authority nor Host"),
        ([*VALID, (b"host", b"other.example")], ":authority and Host differ"),
        ([*VALID, (b"host", b"a"), (b"host", b"a")], "more than one Host field"),
        ([*VALID[:3], (b":path", b"")], "empty :path"),
        ([(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")], "CONNECT with :scheme or :path"),
        ([*VALID[:4], (b":protocol", b"websocket")], ":protocol in a request other than CONNECT"),
        ([], "no :method"),
    ],
)  # fmt: skip
def test_each_rule_names_what_is_wrong(headers: list[tuple[bytes, bytes]], problem: str) -> None:
    assert h2_fields_problem(headers) == problem
    assert hyper_h2_refuses(headers)


@st.composite
def nearly_valid(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """A valid request with up to three edits: a field replaced, inserted or dropped."""
    headers = list(VALID)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["replace", "insert", "drop"]))
        field = (draw(st.sampled_from(NAMES)), draw(st.sampled_from(VALUES)))
        if kind == "drop" and headers:
            headers.pop(draw(st.integers(0, len(headers) - 1)))
        elif kind == "replace" and headers:
            headers[draw(st.integers(0, len(headers) - 1))] = field
        else:
            headers.insert(draw(st.integers(0, len(headers))), field)
    return headers


@settings(max_examples=3000, deadline=None)
@given(nearly_valid())
def test_same_verdict_as_hyper_h2_on_nearly_valid_requests(
    headers: list[tuple[bytes, bytes]],
) -> None:
    assert (h2_fields_problem(headers) is not None) == hyper_h2_refuses(headers), headers


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(NAMES), st.binary(max_size=5)),
            st.one_of(st.sampled_from(VALUES), st.binary(max_size=5)),
        ),
        max_size=8,
    )
)
def test_same_verdict_as_hyper_h2_on_arbitrary_blocks(headers: list[tuple[bytes, bytes]]) -> None:
    assert (h2_fields_problem(headers) is not None) == hyper_h2_refuses(headers), headers
