"""Request vetting (sans-I/O): target normalisation, Host checks, allowlist, PIN path matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confedge.proxy.request import (
    Refused,
    host_allowed,
    normalise_target,
    path_allowed,
    pin_alias,
    split_host,
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", "/"),
        ("/a/b?x=1", "/a/b?x=1"),
        ("/a/./b", "/a/b"),
        ("/a/../b", None),
        ("/a//b///c", "/a/b/c"),
        ("/a/b/", "/a/b/"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/..", None),
        ("/a/..", None),
        ("/%41%62%7e%2D%5f%2E", "/Ab~-_."),
        ("/a%20b%3a", "/a%20b%3A"),
        ("/%2e/x", "/x"),
        ("/a/%2E%2e/b", None),
        ("/.well-known/x", "/.well-known/x"),
        ("/x?next=/../../etc&p=%2F", "/x?next=/../../etc&p=%2F"),
        ("/webapp/#", None),
    ],
)
def test_normalise(target: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(Refused):
            normalise_target(target)
    else:
        assert normalise_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "http://evil/",
        "evil:443",
        "*",
        "/../x",
        "/%2e%2e/x",
        "/a/../../x",
        "/a%2fb",
        "/a%2Fb",
        "/a%5cb",
        "/a\\b",
        "/a%00",
        "/a%",
        "/a%4",
        "/a%g0",
        "/a b",
        "/\x7f",
    ],
)
def test_refused(target: str) -> None:
    with pytest.raises(Refused) as exc:
        normalise_target(target)
    assert exc.value.status == 400


@given(st.lists(st.sampled_from(["a", "..", ".", "", "%2e", "%2E%2e", "b%41", "~"]), max_size=8))
def test_normalised_never_escapes_and_is_stable(segments: list[str]) -> None:
    target = "/" + "/".join(segments)
    try:
        out = normalise_target(target)
    except Refused as exc:
        assert exc.status == 400
        return
    assert out.startswith("/")
    assert "//" not in out
    assert all(seg not in (".", "..") for seg in out.split("/"))
    assert normalise_target(out) == out  # idempotent: a second proxy hop changes nothing


ALLOWED = frozenset({"edge.example.com", "edge", "10.0.0.5", "::1", "localhost"})


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("edge.example.com", True),
        ("EDGE.example.com:443", True),
        ("edge.example.com.", True),
        ("10.0.0.5:8443", True),
        ("[::1]:443", True),
        ("[::1]", True),
        ("evil.example", False),
        ("edge.example.com.evil", False),
        ("edge.example.com:x", False),
        ("[::1]x", False),
        ("[::2]", False),
        ("", False),
        # RFC 9110 §4.2.1: port = *DIGIT, ASCII digits only; str.isdigit() also accepts the
        # Latin-1 superscripts a Host value decodes to (was: forwarded as this server's name)
        ("edge.example.com:\u00b2", False),
        ("[::1]:\u00b2\u00b3", False),
        ("localhost:\u00b9", False),
    ],
)
def test_host_allowed(host: str, ok: bool) -> None:
    assert host_allowed(host, ALLOWED) is ok


def test_split_host() -> None:
    assert split_host("a.b:80") == "a.b"
    assert split_host("[::1]:80") == "[::1]"
    assert split_host("a.b") == "a.b"
    assert split_host("a.b:\u00b2") == "a.b:\u00b2"


def test_allowlist() -> None:
    assert path_allowed("/anything", ())
    assert path_allowed("/api/x?y", ("/api/",))
    assert not path_allowed("/admin", ("/api/", "/webapp/"))


def test_pin_alias() -> None:
    assert pin_alias("/api/client/v2/conferences/Meet%2Eme/request_token") == "meet.me"
    assert pin_alias("/API/client/v2/conferences/x/REQUEST_TOKEN/?a=1") == "x"
    assert pin_alias("/api/client/v2/conferences/x/refresh_token") is None
    assert pin_alias("/api/client/v2/conferences/x/y/request_token") is None
    # ";" parameters, which servlet-style nodes strip, neither hide a guess nor rename its alias
    assert pin_alias("/api/client/v2/conferences/meet;v=1/request_token;x") == "meet"
    assert pin_alias("/api/client/v2/conferences/meet/request_token%3B") == "meet"
