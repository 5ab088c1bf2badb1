"""ACME HTTP-01 on the HTTP port (proxy.acme_webroot, proxy/acme.py): what a CA's validator, a
scanner and a reload meet on port 80.

The end to end run with a real ACME server and certbot is tests/e2e/test_acme_certbot.py; here
the listener's answers byte by byte: the file for a token, nothing for anything else, the
redirect unchanged for every other path, and the access-log lines.
"""

from __future__ import annotations

import asyncio
import os
import re
import tomllib
from pathlib import Path

import pytest
import uvloop
from proxy_upstream import proxy_config, read_response

from confedge.config import ConfigError, parse_config
from confedge.proxy.service import ProxyService
from ports import spare_port

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEY_AUTHZ = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


def _webroot(tmp_path: Path) -> Path:
    """A webroot as certbot --webroot leaves it during a validation."""
    root = tmp_path / "acme"
    challenges = root / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / TOKEN).write_text(KEY_AUTHZ)
    return root


async def _ask(port: int, raw: bytes, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        r = await asyncio.wait_for(read_response(reader, head=head), 5)
        return r.status, {k.lower(): v for k, v in r.headers}, r.body
    finally:
        writer.close()


async def test_challenges_are_answered_and_everything_else_redirected(tmp_path: Path) -> None:
    root = _webroot(tmp_path)
    challenges = root / ".well-known" / "acme-challenge"
    (challenges / "big").write_bytes(b"x" * 5000)  # over MAX_BYTES: not a key authorization
    (challenges / "adir").mkdir()
    (tmp_path / "secret").write_text("not for the Internet")
    os.symlink(tmp_path / "secret", challenges / "link")
    svc = ProxyService(
        proxy_config(["127.0.0.1:9"], str(tmp_path), http_port=spare_port(), acme_webroot=str(root))
    )
    await svc.start()
    try:
        port = svc.http_port
        prefix = "/.well-known/acme-challenge/"
        # The validator's request (RFC 8555 §8.3), then a redirect on the same connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {prefix}{TOKEN} HTTP/1.1\r\nHost: edge.example.com\r\n\r\n".encode())
        r = await read_response(reader)
        assert r.status == 200 and r.body == KEY_AUTHZ.encode()
        assert r.header("Content-Length") == str(len(KEY_AUTHZ))
        assert r.header("Content-Type") == "text/plain"
        writer.write(b"GET /webapp/ HTTP/1.1\r\nHost: edge.localdomain\r\n\r\n")
        r = await read_response(reader)
        assert r.status == 301, r
        writer.close()

        status, headers, body = await _ask(
            port, f"HEAD {prefix}{TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), head=True
        )
        assert (status, headers["content-length"], body) == (200, str(len(KEY_AUTHZ)), b"")
        status, headers, _ = await _ask(
            port, f"POST {prefix}{TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        )
        assert status == 405 and headers["allow"] == "GET, HEAD"
        # HTTP/1.0 keeps its connection only when asked, and says so (RFC 9112 §9.3).
        status, headers, body = await _ask(port, f"GET {prefix}{TOKEN} HTTP/1.0\r\n\r\n".encode())
        assert status == 200 and body == KEY_AUTHZ.encode()
        assert headers["connection"] == "close"
        # No file, not a token, not a regular file, too big, a link out, a query: 404, never
        # a byte of anything else.
        for target in (
            "missing",
            "..%2fsecret",
            "../../secret",
            "a.b",
            f"{TOKEN}?x=1",
            "adir",
            "big",
            "link",
            "",
            "x" * 300,
        ):
            status, _, body = await _ask(
                port, f"GET {prefix}{target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert status == 404 and body == b"", target
        # A path that only looks like the prefix is redirected as before.
        status, headers, _ = await _ask(
            port, b"GET /.well-known/acme-challengeX HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        assert status == 301, headers
    finally:
        await svc.close()
    # Each answer has its access-log line, the body's bytes counted (HEAD: none).
    lines = (tmp_path / "access.log").read_text().splitlines()
    fields = [re.search(r'"([A-Z]+) (\S+) HTTP/1\.[01]" (\d{3}) (\d+)', ln) for ln in lines]
    assert all(fields), lines
    got = [(m[1], m[3], m[4]) for m in fields if m is not None]
    assert got[:5] == [
        ("GET", "200", str(len(KEY_AUTHZ))),
        ("GET", "301", "0"),
        ("HEAD", "200", "0"),
        ("POST", "405", "0"),
        ("GET", "200", str(len(KEY_AUTHZ))),
    ]
    assert all(status == "404" for _, status, _ in got[5:-1]) and got[-1][1] == "301"


async def test_off_by_default_and_turned_on_by_a_reload(tmp_path: Path) -> None:
    root = _webroot(tmp_path)
    cfg = proxy_config(["127.0.0.1:9"], str(tmp_path), http_port=spare_port())
    assert cfg.proxy.acme_webroot == ""
    svc = ProxyService(cfg)
    await svc.start()
    try:
        raw = f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        status, headers, _ = await _ask(svc.http_port, raw.encode())
        assert status == 301 and headers["location"].startswith("https://localhost")
        svc.reload_config(
            proxy_config(
                ["127.0.0.1:9"], str(tmp_path), http_port=svc.http_port, acme_webroot=str(root)
            )
        )
        status, _, body = await _ask(svc.http_port, raw.encode())
        assert status == 200 and body == KEY_AUTHZ.encode()
    finally:
        await svc.close()


async def test_with_two_workers(tmp_path: Path) -> None:
    """The worker processes read the key from the configuration they are given."""
    root = _webroot(tmp_path)
    svc = ProxyService(
        proxy_config(
            ["127.0.0.1:9"], str(tmp_path), http_port=spare_port(), https_port=spare_port(),
            workers=2, acme_webroot=str(root),
        )
    )  # fmt: skip
    await svc.start()
    try:
        for _ in range(6):  # (the kernel spreads connections over both)
            status, _, body = await _ask(
                svc.http_port,
                f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            )
            assert status == 200 and body == KEY_AUTHZ.encode()
    finally:
        await svc.close()


@pytest.mark.parametrize(
    ("proxy", "problem"),
    [
        (
            'acme_webroot = "var/acme"',
            'proxy.acme_webroot: "var/acme" is not an absolute directory path',
        ),
        (
            'acme_webroot = "/var/lib/confedge/acme"\nhttp_port = 0',
            'proxy.acme_webroot: "/var/lib/confedge/acme" is set, but proxy.http_port = 0 turns '
            "the HTTP port off",
        ),
    ],
)
def test_configuration_mistakes_are_named(proxy: str, problem: str) -> None:
    text = f'[turn]\nenabled = false\n[proxy]\nnodes = ["10.0.0.1"]\n{proxy}\n'
    with pytest.raises(ConfigError) as err:
        parse_config(tomllib.loads(text))
    assert problem in str(err.value)


def test_the_directory_is_written_normalised() -> None:
    text = '[turn]\nenabled = false\n[proxy]\nnodes = ["10.0.0.1"]\nacme_webroot = "/srv/acme/"\n'
    assert parse_config(tomllib.loads(text)).proxy.acme_webroot == "/srv/acme"
