"""RFC 9110 §7.6.1: hop-by-hop fields are never forwarded, either way; forwarding headers from
an untrusted client are dropped; the proxy sets X-Real-IP / X-Forwarded-*."""

from confedge.proxy.exchange import build_request_head, plan_response

from .helpers import connect, request, start


def test_request_head_drops_hop_by_hop_and_forwarding() -> None:
    req = request(
        headers=[
            (b"Connection", b"keep-alive, X-Secret"),
            (b"X-Secret", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Forwarded-Host", b"evil"),
            (b"X-Real-IP", b"1.2.3.4"),
            (b"Accept", b"*/*"),
        ]
    )
    ex = start(req)
    _, head = connect(ex)
    assert b"X-Secret" not in head and b"Keep-Alive" not in head
    assert b"evil" not in head and b"1.2.3.4" not in head
    assert b"Accept: */*\r\n" in head
    assert b"X-Real-IP: 192.0.2.7\r\nX-Forwarded-For: 192.0.2.7\r\n" in head


def test_trusted_peer_keeps_forwarding_headers() -> None:
    req = request(headers=[(b"X-Forwarded-Host", b"front.example")])
    head = build_request_head(
        req, client_ip="a", peer="b", trusted=True, guarded=False, upgrading=False, fqdn=b"x"
    )
    assert b"X-Forwarded-Host: front.example" in head


def test_response_drops_hop_by_hop_and_named_fields() -> None:
    plan = plan_response(
        200,
        [
            (b"Connection", b"X-Node-Private"),
            (b"X-Node-Private", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Content-Length", b"0"),
        ],
        head_only=False,
        version="1.1",
        keep_alive=True,
        csp_line=b"Content-Security-Policy: default-src 'self'\r\n",
    )
    assert b"X-Node-Private" not in plan.head and b"Keep-Alive" not in plan.head
    assert b"Content-Security-Policy: default-src 'self'" in plan.head
    assert not plan.chunked and not plan.close


def test_framing_for_unknown_length() -> None:
    p11 = plan_response(200, [], head_only=False, version="1.1", keep_alive=True, csp_line=b"")
    assert p11.chunked and p11.until_close and b"Transfer-Encoding: chunked" in p11.head
    p10 = plan_response(200, [], head_only=False, version="1.0", keep_alive=True, csp_line=b"")
    assert p10.close and not p10.chunked and b"Connection: close" in p10.head
