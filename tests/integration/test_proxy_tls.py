"""Operator certificates through the proxy: served chain, clear errors, reload without drops."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import uvloop
from cryptography import x509
from proxy_upstream import Upstream, client_ssl, proxy_config, read_response

from confedge.config import parse_config, to_builtins
from confedge.proxy.service import ProxyService
from confedge.tls.certs import CertificateError, generate_self_signed

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


def _with_tls(cfg, cert: str, key: str = ""):
    data = to_builtins(cfg)
    data["tls"] = {"cert": cert, "key": key}
    return parse_config(data)


async def _served_cn(port: int) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl())
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    cn = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    return cn, reader, writer


async def test_operator_pem_served_and_reloaded(tmp_path):
    node = await Upstream("n0").start()
    pem = tmp_path / "edge.pem"
    now = dt.datetime.now(dt.UTC)
    pem.write_bytes(generate_self_signed("one.example.com", ["localhost"], now))
    svc = ProxyService(
        _with_tls(proxy_config([node.address], str(tmp_path), health_interval=30), str(pem))
    )
    await svc.start()
    try:
        cn, reader, writer = await _served_cn(svc.https_port)
        assert cn == "CN=one.example.com"
        pem.write_bytes(generate_self_signed("two.example.com", ["localhost"], now))
        await svc.reload_tls()
        cn2, _, w2 = await _served_cn(svc.https_port)
        assert cn2 == "CN=two.example.com"
        # the connection opened before the reload still works
        writer.write(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await read_response(reader)).status == 200
        writer.close()
        w2.close()
        # a broken replacement is refused and the previous certificate stays in service
        pem.write_bytes(b"not a certificate")
        with pytest.raises(CertificateError, match="no PEM certificate"):
            await svc.reload_tls()
        cn3, _, w3 = await _served_cn(svc.https_port)
        assert cn3 == "CN=two.example.com"
        w3.close()
    finally:
        await svc.close()
        await node.kill()


async def test_mismatched_key_fails_start_with_a_clear_error(tmp_path):
    now = dt.datetime.now(dt.UTC)
    a = generate_self_signed("a.example.com", [], now)
    b = generate_self_signed("b.example.com", [], now)
    key_a = a[: a.index(b"-----BEGIN CERTIFICATE-----")]
    cert_b = b[b.index(b"-----BEGIN CERTIFICATE-----") :]
    (tmp_path / "key.pem").write_bytes(key_a)
    (tmp_path / "cert.pem").write_bytes(cert_b)
    cfg = _with_tls(
        proxy_config(["127.0.0.1:9"], str(tmp_path)),
        str(tmp_path / "cert.pem"),
        str(tmp_path / "key.pem"),
    )
    svc = ProxyService(cfg)
    with pytest.raises(CertificateError, match="does not match the certificate"):
        await svc.start()
    await svc.close()
