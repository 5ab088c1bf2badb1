"""Static mounts served by the running proxy over TLS (SPEC §2 "Custom web-app content").

tests/unit/test_proxy_static.py covers StaticSite's decisions; this file checks the wiring:
the proxy answers mounted prefixes itself (directory and zip), keeps the connection alive across
static and proxied requests, streams a file larger than any socket buffer intact, honours HEAD,
ranges and conditionals end to end, never forwards a mounted path to a node, and logs the
request with "-" as upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import uvloop
from proxy_upstream import Upstream, client_ssl, get, proxy_config, read_response

from confedge.proxy.service import ProxyService

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)

BIG = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, bigger than the socket buffers


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


@pytest.fixture
async def node():
    up = await Upstream("n0").start()
    yield up
    await up.kill()


@pytest.fixture
async def proxy(node, tmp_path: Path):
    www = tmp_path / "www"
    (www / "js").mkdir(parents=True)
    (www / "index.html").write_bytes(b"<!doctype html><title>brand</title>")
    (www / "js" / "app.mjs").write_bytes(b"export const x = 1;\n")
    (www / "big.bin").write_bytes(BIG)
    (tmp_path / "secret.txt").write_bytes(b"SECRET")
    zpath = tmp_path / "webapp.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("index.html", b"<!doctype html><title>zip app</title>")
        zf.writestr("app.wasm", b"\0asm" + bytes(2000))
    cfg = proxy_config(
        [node.address],
        str(tmp_path),
        static=[
            {"prefix": "/branding/", "path": str(www)},
            {"prefix": "/webapp3/", "path": str(zpath), "cache_control": "no-cache"},
        ],
    )
    svc = ProxyService(cfg)
    await svc.start()
    yield svc
    await svc.close()


async def test_directory_and_zip_over_one_keepalive_connection(proxy, node) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port, ssl=client_ssl())
    try:
        for target, ctype, needle in [
            ("/branding/", "text/html; charset=utf-8", b"<title>brand</title>"),
            ("/branding/js/app.mjs", "text/javascript; charset=utf-8", b"export const"),
            ("/webapp3/", "text/html; charset=utf-8", b"zip app"),
            ("/webapp3/app.wasm", "application/wasm", b"\0asm"),
            ("/echo", None, None),  # proxied, on the same connection
            ("/branding/big.bin", "application/octet-stream", None),
        ]:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            r = await asyncio.wait_for(read_response(reader), 10)
            assert r.status == 200, target
            if ctype is not None:
                assert r.header("Content-Type") == ctype
                assert r.header("ETag") and r.header("Last-Modified")
            if needle is not None:
                assert needle in r.body
            if target.endswith("big.bin"):
                assert hashlib.sha256(r.body).digest() == hashlib.sha256(BIG).digest()
    finally:
        writer.close()
    assert [r.target for r in node.requests()] == ["/echo"]  # mounted paths never reach a node


async def test_head_range_conditional_and_refusals(proxy, node) -> None:
    port = proxy.https_port
    head = await get(port, "/branding/big.bin", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == str(len(BIG))
    etag = head.header("ETag")
    assert etag
    r = await get(port, "/branding/big.bin", headers="Range: bytes=1000000-1000099\r\n")
    assert r.status == 206 and r.body == BIG[1000000:1000100]
    assert r.header("Content-Range") == f"bytes 1000000-1000099/{len(BIG)}"
    r = await get(port, "/branding/big.bin", headers="Range: bytes=99999999-\r\n")
    assert r.status == 416
    r = await get(port, "/branding/big.bin", headers=f"If-None-Match: {etag}\r\n")
    assert r.status == 304 and r.body == b""
    r = await get(port, "/webapp3/index.html")
    assert r.header("Cache-Control") == "no-cache"
    r = await get(port, "/branding/index.html", method="POST", body=b"x")
    assert r.status == 405 and r.header("Allow") == "GET, HEAD"
    r = await get(port, "/branding/js")
    assert r.status == 301 and r.header("Location") == "/branding/js/"
    for evil in [
        "/branding/..%2fsecret.txt",
        "/branding/.%2e/secret.txt",
        "/branding/%2e%2e/secret.txt",
    ]:
        r = await get(port, evil)
        assert r.status in (400, 404) and b"SECRET" not in r.body, evil
    assert node.requests() == []


async def test_static_requests_are_logged_without_upstream(proxy, tmp_path: Path) -> None:
    await get(proxy.https_port, "/branding/index.html?pin=1234", headers="User-Agent: t/1\r\n")
    await proxy.close()
    line = next(
        x for x in (tmp_path / "access.log").read_text().splitlines() if "/branding/index" in x
    )
    assert '"GET /branding/index.html?pin=[FILTERED] HTTP/1.1" 200 ' in line
    assert line.endswith('"t/1" "-" "-" "-"')
