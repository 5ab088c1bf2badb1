"""The canonical path (proxy/paths.py), sans-I/O: examples per rule, and properties.

The central property: whatever a path that the proxy accepts looks like, no lenient reading of
it (decoding once or twice, stripping ";" parameters, NFKC, "\\" as "/") holds a dot segment,
a control character or a separator the proxy did not see.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import quote, unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confedge.config import ConfigError, parse_config
from confedge.proxy.pages import error_response
from confedge.proxy.paths import BadPath, canonical_path, decode_segment


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/webapp/",
        "/api/client/v2/conferences/meet%40example.com/request_token",
        "/api/client/v2/conferences/meet@example.com/request_token",
        "/api/client/v2/conferences/%C3%A9t%C3%A9/conference_status",
        "/a%20b/c%2Bd",
        "/.well-known/acme-challenge/x",
        "/a.b/x..y/...",
        "/app;jsessionid=1/x",
        "/a/%3B/b",  # an encoded ";" alone: an empty name, not a dot segment
        "/%E2%82%AC",  # a euro sign
        "/a%E3%80%82b",  # U+3002 IDEOGRAPHIC FULL STOP is not a "." under NFKC
    ],
)
def test_canonical_paths_are_kept_as_sent(path: str) -> None:
    assert canonical_path(path) == path


@pytest.mark.parametrize(
    ("path", "canonical"),
    [
        ("/a/./b", "/a/b"),  # RFC 3986 §5.2.4
        ("/a/b/.", "/a/b/"),
        ("/a//b///c", "/a/b/c"),
        ("/%41%62%7e%2D%5f%2E", "/Ab~-_."),  # §6.2.2.2 unreserved decoded
        ("/a%3a%2c", "/a%3A%2C"),  # §6.2.2.1 hex upper-cased, reserved kept encoded
        ("/%2e/x", "/x"),  # decoded before dot removal (§6.2.2 order)
        ("/%77ebapp/", "/webapp/"),
    ],
)
def test_equivalent_spellings_normalise(path: str, canonical: str) -> None:
    assert canonical_path(path) == canonical


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/../x", "'..' segment"),
        ("/a/%2e%2E/x", "'..' segment"),
        ("/%252e%252e/x", "double percent-encoding"),
        ("/a/%25%32%65", "double percent-encoding"),
        ("/a%25", "double percent-encoding"),
        ("/..;/x", "dot segment hidden"),
        ("/a/.;/b", "dot segment hidden"),
        ("/a/..%3B/b", "dot segment hidden"),
        ("/a/%2e%2e%3bx/b", "dot segment hidden"),
        ("/%c0%ae%c0%ae/x", "not valid UTF-8"),
        ("/%e0%80%ae/x", "not valid UTF-8"),
        ("/a%c0%afb", "not valid UTF-8"),
        ("/%ff", "not valid UTF-8"),
        ("/%ed%b0%80", "not valid UTF-8"),
        ("/caf%e9", "not valid UTF-8"),
        ("/%ef%bc%8e%ef%bc%8e/x", "compatibility form of a dot segment"),
        ("/%ef%bc%8e/x", "compatibility form of a dot segment"),
        ("/%e2%80%a5", "compatibility form of a dot segment"),
        ("/..%ef%bc%9bx/b", "compatibility form of a dot segment"),  # fullwidth ";"
        ("/a%ef%bc%8fb", "compatibility form of '/'"),
        ("/a%ef%b9%a8b", "compatibility form of '/'"),  # U+FE68 SMALL REVERSE SOLIDUS
        ("/%ef%bc%85%32%65", "compatibility form of '/'"),  # fullwidth "%"
        ("/a%00", "encoded control"),
        ("/a%0d%0a", "encoded control"),
        ("/a%7F", "encoded control"),
        ("/a%c2%9b", "encoded control"),  # U+009B CSI
        ("/a%e2%80%a9", "encoded control"),  # U+2029
        ("/a%2fb", "encoded '/'"),
        ("/a%5Cb", "encoded '/'"),
        ("/a%", "bad percent-encoding"),
        ("/a%4", "bad percent-encoding"),
        ("/a%g0", "bad percent-encoding"),
        ("/a\\b", "invalid character"),
        ("/a b", "invalid character"),
        ("/é", "invalid character"),
        ("/a?b", "invalid character"),
        ("a/b", "does not start with '/'"),
    ],
)
def test_refused_with_reason(path: str, reason: str) -> None:
    with pytest.raises(BadPath) as exc:
        canonical_path(path)
    assert reason in exc.value.reason


def test_decode_segment_is_one_utf8_decode() -> None:
    assert decode_segment("a%20b") == "a b"
    assert decode_segment("%252e") == "%2e"  # once, never twice
    assert decode_segment("%C3%A9") == "é"
    assert decode_segment("plain") == "plain"
    with pytest.raises(BadPath):
        decode_segment("%c0%ae")


@given(st.text(max_size=20))
def test_decode_segment_inverts_percent_encoding(text: str) -> None:
    assert decode_segment(quote(text, safe="")) == text


_PLAIN = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="%;/\\?#."),
    min_size=1,
    max_size=8,
)


@given(st.lists(_PLAIN, max_size=6), st.booleans())
def test_plain_paths_take_the_fast_path_unchanged(segments: list[str], slash: bool) -> None:
    path = "/" + "/".join(segments) + ("/" if slash and segments else "")
    assert canonical_path(path) == path


_TOKENS = [
    "a",
    "b.c",
    ".",
    "..",
    "/",
    "//",
    ";",
    ";x=1",
    "%2e",
    "%2E%2e",
    "%252e",
    "%25",
    "%2f",
    "%5c",
    "%3b",
    "%3B",
    "%41",
    "%7e",
    "%20",
    "%40",
    "%c0%ae",
    "%c0%af",
    "%e0%80%ae",
    "%c3%a9",
    "%ef%bc%8e",
    "%ef%bc%8f",
    "%ef%bc%bc",
    "%ef%bc%85",
    "%ef%bc%9b",
    "%e2%80%a5",
    "%e2%80%a8",
    "%c2%85",
    "%0d",
    "%0a",
    "%00",
    "%ff",
]


def _lenient_readings(path: str) -> list[list[str]]:
    """The segments various back ends would see: raw, decoded once or twice (before
    splitting), each also NFKC-folded, with "\\" as a separator and ";" parameters stripped."""
    once = unquote(path, errors="replace")
    out = []
    for text in (path, once, unquote(once, errors="replace")):
        for form in (text, unicodedata.normalize("NFKC", text)):
            segs = form.replace("\\", "/").split("/")
            out.append([s.partition(";")[0] for s in segs])
    return out


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_TOKENS), max_size=10))
def test_no_lenient_reading_of_an_accepted_path_escapes(tokens: list[str]) -> None:
    path = "/" + "".join(tokens)
    try:
        out = canonical_path(path)
    except BadPath:
        return
    assert canonical_path(out) == out  # idempotent: a second proxy hop changes nothing
    for segs in _lenient_readings(out):
        assert not {".", ".."} & set(segs), (path, out, segs)
        joined = "/".join(segs)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in joined), (path, out)
    # One decode of the accepted path is the only reading: a second changes nothing.
    once = unquote(out)
    assert unquote(once) == once


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("path_allowlist", ["/%61pi/"], 'not in canonical form; write it as "/api/"'),
        ("path_allowlist", ["/a/./b/"], 'write it as "/a/b/"'),
        ("path_allowlist", ["/x%252e/"], "double percent-encoding"),
        ("path_allowlist", ["api/"], 'must start with "/"'),
        ("static", [{"prefix": "/%62/", "path": "/srv"}], 'write it as "/b/"'),
    ],
)
def test_configured_prefixes_must_be_canonical(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"turn": {"enabled": False}, "proxy": {"nodes": ["10.0.0.1"], key: value}})
    assert f"proxy.{key}[0]" in str(exc.value) and message in str(exc.value)


def test_refusal_body_names_the_rule_escaped() -> None:
    body = error_response(400, b"", detail="encoded control character in the path")
    assert b"Refused: encoded control character in the path." in body
    assert b"<x>" not in error_response(400, b"", detail="<x>")
