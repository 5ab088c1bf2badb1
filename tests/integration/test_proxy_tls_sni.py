"""Several certificates chosen by SNI (SPEC §5, [[tls.certificates]]): each name gets its own
certificate, wildcards cover one label, anything else (or no SNI at all) gets the default; a
reload swaps them without dropping connections; a bad entry is named in the error."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from proxy_upstream import Upstream, proxy_config, read_response

from confedge.config import parse_config, to_builtins
from confedge.proxy.service import ProxyService
from confedge.tls.certs import CertificateError, check_tls_config, generate_self_signed

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)

OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


def _pem(path: Path, name: str, extra: list[str] | None = None, **kw: Any) -> str:
    now = kw.pop("now", dt.datetime.now(dt.UTC))
    path.write_bytes(generate_self_signed(name, extra or [], now, **kw))
    return str(path)


def _config(tmp_path: Path, node: Upstream, tls: dict[str, Any]) -> Any:
    data = to_builtins(proxy_config([node.address], str(tmp_path), health_interval=30))
    data["tls"] = tls
    return parse_config(data)


async def _served(port: int, sni: str | None) -> tuple[str, asyncio.StreamReader, Any]:
    """The subject CN the server presents for `sni` (None: no SNI extension at all)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=sni or ""
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    cn = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    return cn, reader, writer


async def test_certificate_chosen_by_sni(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = await Upstream("n0").start()
    tls = {
        "cert": _pem(tmp_path / "default.pem", "edge.example.com", ["localhost"]),
        "certificates": [
            {"cert": _pem(tmp_path / "meet.pem", "meet.example.com", ["join.example.org"])},
            {"cert": _pem(tmp_path / "wild.pem", "*.video.example.com")},
            # Names the default already serves: the default keeps them (and a warning says so).
            {"cert": _pem(tmp_path / "dup.pem", "edge.example.com")},
        ],
    }
    svc = ProxyService(_config(tmp_path, node, tls))
    await svc.start()
    port = svc.https_port
    assert "edge.example.com is already served by the default certificate" in caplog.text
    try:
        cases = {
            "meet.example.com": "CN=meet.example.com",
            "MEET.Example.COM": "CN=meet.example.com",  # DNS names are case-insensitive
            "join.example.org": "CN=meet.example.com",  # any SAN of the certificate
            "a.video.example.com": "CN=*.video.example.com",
            "a.b.video.example.com": "CN=edge.example.com",  # a wildcard covers one label only
            "video.example.com": "CN=edge.example.com",
            "edge.example.com": "CN=edge.example.com",
            "other.example.net": "CN=edge.example.com",  # unknown: the default
            None: "CN=edge.example.com",  # no SNI: the default
        }
        for sni, want in cases.items():
            cn, reader, writer = await _served(port, sni)
            assert cn == want, sni
            # The proxy behind each certificate is the same.
            writer.write(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert (await read_response(reader)).status == 200
            writer.close()
        if OPENSSL is not None:  # the same through another TLS stack's client
            proc = await asyncio.create_subprocess_exec(
                OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}",
                "-servername", "x.video.example.com",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
            assert "subject=CN = *.video.example.com" in out, out[-2000:]

        # Reload: a renewed SNI certificate is served to new handshakes, open ones continue.
        cn, reader, writer = await _served(port, "meet.example.com")
        _pem(tmp_path / "meet.pem", "meet.example.com", ["meet2.example.com"])
        await svc.reload_tls()
        cn2, _, w2 = await _served(port, "meet2.example.com")
        assert cn2 == "CN=meet.example.com"
        w2.close()
        writer.write(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await read_response(reader)).status == 200
        writer.close()
    finally:
        await svc.close()
        await node.kill()


def test_bad_sni_certificates_are_named(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    default = _pem(tmp_path / "default.pem", "edge.example.com")
    a = generate_self_signed("a.example.com", [], now)
    b = generate_self_signed("b.example.com", [], now)
    # The key of b with the certificate of a.
    key_b = b[: b.index(b"-----BEGIN CERTIFICATE")]
    cert_a = a[a.index(b"-----BEGIN CERTIFICATE") :]
    (tmp_path / "mixed.pem").write_bytes(key_b + cert_a)
    expired = _pem(
        tmp_path / "old.pem", "old.example.com", now=now - dt.timedelta(days=400), days=30
    )
    no_dns = _pem(tmp_path / "ip.pem", "198.51.100.7")

    def cfg(entries: list[dict[str, str]]) -> Any:
        return parse_config(
            {
                "server": {"state_dir": str(tmp_path)},
                "turn": {"enabled": False},
                "proxy": {"nodes": ["127.0.0.1"]},
                "tls": {"cert": default, "certificates": entries},
            }
        )

    problems, _ = check_tls_config(cfg([{"cert": str(tmp_path / "mixed.pem")}]), now)
    assert len(problems) == 1
    assert problems[0].startswith("tls.certificates[0].cert")
    assert "does not match the certificate" in problems[0]
    problems, _ = check_tls_config(
        cfg([{"cert": default}, {"cert": expired}, {"cert": str(tmp_path / "missing.pem")}]), now
    )
    assert problems[0].startswith("tls.certificates[1].cert") and "expired" in problems[0]
    assert problems[1].startswith("tls.certificates[2].cert") and "missing.pem" in problems[1]
    problems, warnings = check_tls_config(cfg([{"cert": no_dns}]), now)
    assert problems == []
    assert any("no DNS names" in w for w in warnings)

    from confedge.tls.context import TLSContextHolder

    with pytest.raises(CertificateError, match=r"tls\.certificates\[0\]\.cert .*does not match"):
        TLSContextHolder(cfg([{"cert": str(tmp_path / "mixed.pem")}]))
