"""The access log's $remote_user and empty fields over real HTTPS (and port 80): the Basic-auth
user name as nginx logs it, never the password, for proxied requests, the proxy's own answers
and the port-80 redirect; the Authorization header itself still reaches the node."""

from __future__ import annotations

import asyncio
import base64

import pytest
import uvloop
from proxy_upstream import Upstream, get, proxy_config

from confedge.proxy.service import ProxyService
from ports import spare_port

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


def basic(userpass: bytes) -> str:
    return f"Authorization: Basic {base64.b64encode(userpass).decode()}\r\n"


async def test_remote_user_in_access_log_lines(tmp_path):
    node = await Upstream("n0").start()
    http_port = spare_port()
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), http_port=http_port, path_allowlist=["/ok/"])
    )
    await svc.start()
    try:
        r = await get(svc.https_port, "/ok/a", headers=basic(b"alice:s3cret-pw"))
        assert r.status == 200
        hdrs = {k.lower(): v for k, v in r.json()["headers"]}
        assert hdrs["authorization"] == basic(b"alice:s3cret-pw").split(": ", 1)[1].strip()
        r = await get(svc.https_port, "/denied", headers=basic(b'ev"il\\:pw'))
        assert r.status == 404  # the proxy's own answer (path_allowlist)
        r = await get(svc.https_port, "/ok/b", headers="User-Agent: \r\n" + basic(b":nouser"))
        assert r.status == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        writer.write(
            b"GET /ok/c HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            + basic(b"carol:pw").encode()
            + b"\r\n"
        )
        assert (await reader.read()).startswith(b"HTTP/1.1 301")
        writer.close()
    finally:
        await svc.close()
        await node.kill()
    text = (tmp_path / "access.log").read_text()
    assert "s3cret" not in text and "nouser" not in text and ":pw" not in text
    lines = {line.split('"')[1].split(" ")[1]: line for line in text.splitlines()}
    assert lines["/ok/a"].startswith("127.0.0.1 - alice [")
    assert lines["/denied"].startswith("127.0.0.1 - ev\\x22il\\x5C [")
    assert lines["/ok/b"].startswith("127.0.0.1 - - [")
    assert "200 " in lines["/ok/b"] and '"" "" "' in lines["/ok/b"]  # empty Referer and UA
    assert lines["/ok/c"].startswith("127.0.0.1 - carol [") and '" 301 0 ' in lines["/ok/c"]
