"""Path spellings and forwarding headers, through the proxy over real HTTPS (issue 11).

Each hostile class is one test: every spelling in it used to reach the node unchanged, and now
gets 400 with the rule it broke in the body, a log line saying why, and no request at the
recording node. Legitimate spellings (percent-encoded "@" and spaces, a raw "@", UTF-8 aliases,
a query holding "%2e") reach the node byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from proxy_upstream import (
    Response,
    Upstream,
    client_ssl,
    get,
    guarded_config,
    proxy_config,
    read_response,
)

from confedge.guard import create_guard
from confedge.proxy.service import ProxyService


@pytest.fixture
async def node() -> Any:
    u = await Upstream("n0").start()
    yield u
    await u.kill()


@pytest.fixture
async def proxy(node: Upstream, tmp_path: Path) -> Any:
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), health_interval=30, trusted_proxies=[])
    )
    await svc.start()
    yield svc
    await svc.close()


# Each class of spelling: the words its 400 says, and spellings that reached the node on main.
HOSTILE: dict[str, tuple[str, list[str]]] = {
    "double-encoding": (
        "double percent-encoding",
        [
            "/%252e%252e/%252e%252e/etc/passwd",  # %25 2e: "." to a back end decoding twice
            "/webapp/%252e%252e/api/admin",
            "/a/%25%32%65%25%32%65/b",  # "%", "2", "e" each encoded: still a second layer
            "/api/%252fadmin",
            "/x%2500.html",
        ],
    ),
    "path-parameters": (
        "dot segment hidden",
        [
            "/..;/admin",  # Tomcat/Jetty strip ";..." and then resolve ".."
            "/webapp/..;/api/admin",
            "/webapp/..;x=1/api/admin",
            "/a/..%3B/b",  # the parameter delimiter encoded
            "/a/..%3bfoo/b",
            "/a/.;/b",
            "/a/%2e%2e;/b",
        ],
    ),
    "overlong-utf8": (
        "not valid UTF-8",
        [
            "/%c0%ae%c0%ae/etc/passwd",  # 2-byte overlong "."
            "/webapp/%C0%AE%C0%AE%C0%AFapi",  # ... and "/"
            "/a%c0%afb",
            "/%e0%80%ae%e0%80%ae/x",  # 3-byte overlong "."
            "/a%e0%80%afb",
            "/%f0%80%80%ae/x",  # 4-byte overlong "."
        ],
    ),
    "fullwidth-dot": (
        "compatibility form of a dot segment",
        [
            "/%ef%bc%8e%ef%bc%8e/etc/passwd",  # U+FF0E FULLWIDTH FULL STOP, twice
            "/a/%EF%BC%8E/b",
            "/a/.%ef%bc%8e/b",  # "." + fullwidth dot
            "/%e2%80%a5/etc",  # U+2025 TWO DOT LEADER (NFKC: "..")
            "/%ef%b9%92%ef%b9%92/x",  # U+FE52 SMALL FULL STOP, twice
        ],
    ),
    "compatibility-separator": (
        "compatibility form of '/'",
        [
            "/a%ef%bc%8f..%ef%bc%8fb",  # U+FF0F FULLWIDTH SOLIDUS
            "/a%ef%bc%bc..",  # U+FF3C FULLWIDTH REVERSE SOLIDUS
            "/a%ef%bc%85%ef%bc%92%ef%bd%85",  # fullwidth "%2e"
        ],
    ),
    "invalid-utf8": (
        "not valid UTF-8",
        [
            "/%ff%fe/x",
            "/a%c3",  # truncated sequence
            "/a%c3%28",  # bad continuation byte
            "/caf%e9",  # Latin-1 "é"
            "/%ed%a0%80",  # a UTF-16 surrogate (CESU-8)
            "/api/client/v2/conferences/%80/request_token",  # lone continuation byte
        ],
    ),
    "encoded-controls": (
        "encoded control character",
        [
            "/a%0d%0aSet-Cookie:%20x=1",  # CR LF
            "/a%0a",
            "/a%0D",
            "/a%09b",  # TAB
            "/a%1b[31m",  # ESC: terminal escapes in whoever reads the logs
            "/a%7f",  # DEL
            "/a%c2%85",  # U+0085 NEL (a C1 control, a line end to some parsers)
            "/a%e2%80%a8",  # U+2028 LINE SEPARATOR
        ],
    ),
}
CASES = [(cls, target) for cls, (_, targets) in HOSTILE.items() for target in targets]


@pytest.mark.parametrize(("cls", "target"), CASES, ids=[f"{c}:{t}" for c, t in CASES])
async def test_hostile_spelling_refused_and_never_forwarded(
    proxy: ProxyService,
    node: Upstream,
    cls: str,
    target: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """400 naming the rule in body and log; the node records nothing."""
    reason = HOSTILE[cls][0]
    before = len(node.requests())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="confedge.proxy"):
        r = await get(proxy.https_port, target)
    assert r.status == 400, f"{target}: {r.status} {r.body[:200]!r}"
    assert r.header("Connection") == "close"
    assert reason in r.body.decode(), f"{target}: {r.body!r}"
    logged = [m.getMessage() for m in caplog.records if m.getMessage().startswith("refused 400")]
    assert logged and reason in logged[-1], logged
    await asyncio.sleep(0.05)
    assert len(node.requests()) == before, f"{target} reached the node: {node.requests()[-1]}"


FORWARDING = (
    "X-Forwarded-Host: evil.example\r\n"
    "Forwarded: for=198.51.100.1;host=evil.example;proto=http\r\n"
    "X-Forwarded-Port: 80\r\n"
    "X-Forwarded-Prefix: /admin\r\n"
    "X-Original-URL: /admin/\r\n"
    "X-Rewrite-URL: /admin/\r\n"
)
FORWARDING_NAMES = {
    "x-forwarded-host",
    "forwarded",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-original-url",
    "x-rewrite-url",
}


async def _from(port: int, source: str, target: str, headers: str) -> Response:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ssl(), local_addr=(source, 0)
    )
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n".encode()
        )
        return await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()


async def test_forwarding_headers_from_untrusted_client_are_stripped(
    node: Upstream, tmp_path: Path
) -> None:
    svc = ProxyService(
        proxy_config(
            [node.address], str(tmp_path), health_interval=30, trusted_proxies=["127.0.0.2/32"]
        )
    )
    await svc.start()
    try:
        r = await _from(svc.https_port, "127.0.0.1", "/echo", FORWARDING + "X-Keep: 1\r\n")
        assert r.status == 200
        rec = node.requests()[-1]
        got = {k.lower() for k, _ in rec.headers}
        assert not got & FORWARDING_NAMES, rec.headers
        assert rec.header("X-Keep") == "1"  # other headers pass
        assert rec.header("X-Real-IP") == "127.0.0.1"
        assert rec.header("X-Forwarded-Proto") == "https"
        # From the trusted balancer they are its report about the client: passed as sent.
        r = await _from(svc.https_port, "127.0.0.2", "/echo", FORWARDING)
        assert r.status == 200
        rec = node.requests()[-1]
        assert rec.header("X-Forwarded-Host") == "evil.example"
        assert rec.header("Forwarded") == "for=198.51.100.1;host=evil.example;proto=http"
    finally:
        await svc.close()


async def test_forwarding_headers_stripped_without_trusted_proxies(
    proxy: ProxyService, node: Upstream
) -> None:
    r = await get(proxy.https_port, "/echo", headers=FORWARDING)
    assert r.status == 200
    got = {k.lower() for k, _ in node.requests()[-1].headers}
    assert not got & FORWARDING_NAMES


@pytest.mark.parametrize(
    "target",
    [
        "/api/client/v2/conferences/meet%40example.com/conference_status",
        "/api/client/v2/conferences/meet@example.com/conference_status",  # a raw "@" alias
        "/api/client/v2/conferences/%C3%A9t%C3%A9/conference_status",  # UTF-8 alias "été"
        "/webapp/",
        "/webapp/conference/My%20Room%20(2)/index.html",
        "/api/client/v2/conferences/meet/participants?next=%2e%2e%2f&x=%252e",  # query as is
        "/webapp/a.b/x..y/.well-known/c",  # dots inside segments are not dot segments
        "/app;jsessionid=1/x",  # a harmless ";" parameter
    ],
)
async def test_legitimate_paths_reach_the_node_unchanged(
    proxy: ProxyService, node: Upstream, target: str
) -> None:
    r = await get(proxy.https_port, target)
    assert r.status == 200, r.body
    assert r.json()["target"] == target


async def test_request_token_with_percent_encoded_alias_unchanged(
    proxy: ProxyService, node: Upstream
) -> None:
    target = "/api/client/v2/conferences/meet%40example.com/request_token"
    r = await get(proxy.https_port, target, method="POST", headers="pin: 1234\r\n", body=b"{}")
    assert r.status == 200
    assert node.requests()[-1].target == target


async def test_equivalent_spellings_are_forwarded_in_canonical_form(
    proxy: ProxyService, node: Upstream
) -> None:
    # RFC 3986 §6.2.2: hex case, unreserved decoded, "." removed; nothing else re-encoded.
    r = await get(proxy.https_port, "/%77ebapp/./a%3ab%7e/c%40d")
    assert r.status == 200
    assert r.json()["target"] == "/webapp/a%3Ab~/c%40d"


async def test_allowlist_and_static_read_the_canonical_path(node: Upstream, tmp_path: Path) -> None:
    www = tmp_path / "branding"
    www.mkdir()
    (www / "logo.txt").write_bytes(b"LOGO")
    svc = ProxyService(
        proxy_config(
            [node.address],
            str(tmp_path),
            health_interval=30,
            path_allowlist=["/api/", "/webapp/"],
            static=[{"prefix": "/branding/", "path": str(www)}],
        )
    )
    await svc.start()
    try:
        port = svc.https_port
        # Spelled differently, the same path: allowed, and forwarded as the canonical one.
        r = await get(port, "/%61pi/x")
        assert r.status == 200 and r.json()["target"] == "/api/x"
        r = await get(port, "/br%61nding/./logo%2Etxt")
        assert r.status == 200 and r.body == b"LOGO"
        before = len(node.requests())
        assert (await get(port, "/admin/")).status == 404  # outside the allowlist
        assert (await get(port, "/webapp/..;/admin/")).status == 400
        assert (await get(port, "/branding/%252e%252e/x")).status == 400
        assert len(node.requests()) == before
    finally:
        await svc.close()


async def test_pin_guesses_with_path_parameters_are_counted(node: Upstream, tmp_path: Path) -> None:
    """A node that strips ";" parameters reads `request_token;x` as `request_token`: such
    guesses count against the guesser like any other spelling."""
    cfg = guarded_config([node.address], str(tmp_path), jitter=0.0)
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    try:
        base = "/api/client/v2/conferences/meet"
        for target in (
            f"{base};v=1/request_token",
            f"{base}/request_token;x",
            f"{base}/request_token;",
        ):
            r = await get(
                svc.https_port, target, method="POST", headers="pin: 9999\r\n", body=b"{}"
            )
            assert r.status == 403, target  # the node read each as a wrong PIN
        for _ in range(40):  # the guard's verdict is asynchronous: poll with harmless requests
            r = await get(svc.https_port, "/echo")
            if r.status == 429:
                break
            await asyncio.sleep(0.05)
        assert r.status == 429
    finally:
        await svc.close()
