"""Certificate generation and the checks with clear errors (SPEC §5)."""

from __future__ import annotations

import datetime as dt
import os
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from confedge.tls.certs import (
    CertificateError,
    check_pem,
    ensure_self_signed,
    generate_self_signed,
    sni_map,
)
from confedge.tls.context import server_context

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key,
    issuer: str,
    issuer_key,
    *,
    ca: bool,
    days: int = 30,
    start: dt.datetime = NOW,
) -> bytes:
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(days=1))
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def chain():
    root_k, int_k, leaf_k = _key(), _key(), _key()
    root = _cert("Root", root_k, "Root", root_k, ca=True, days=3650)
    inter = _cert("Intermediate", int_k, "Root", root_k, ca=True, days=3650)
    leaf = _cert("edge.example.com", leaf_k, "Intermediate", int_k, ca=False, days=90)
    return leaf, inter, root, _pem_key(leaf_k), _pem_key(int_k)


def test_good_chain_one_pem_and_separate_key(chain) -> None:
    leaf, inter, _, key, _ = chain
    info = check_pem(key + leaf + inter, None, NOW, expected_name="edge.example.com")
    assert info.chain_length == 2 and info.names == ("edge.example.com",) and not info.warnings
    assert check_pem(leaf + inter, key, NOW).subject == "CN=edge.example.com"


def test_key_mismatch(chain) -> None:
    leaf, _, _, _, _ = chain
    with pytest.raises(CertificateError, match="does not match the certificate"):
        check_pem(leaf, _pem_key(_key()), NOW)


def test_wrong_order(chain) -> None:
    leaf, inter, root, key, _ = chain
    with pytest.raises(CertificateError, match="number 2 in the file"):
        check_pem(inter + leaf, key, NOW)
    with pytest.raises(CertificateError, match="chain order is wrong"):
        check_pem(leaf + root + inter, key, NOW)


def test_expired_and_not_yet_valid(chain) -> None:
    leaf, inter, _, key, _ = chain
    with pytest.raises(CertificateError, match="expired on"):
        check_pem(leaf + inter, key, NOW + dt.timedelta(days=200))
    with pytest.raises(CertificateError, match="not valid before"):
        check_pem(leaf + inter, key, NOW - dt.timedelta(days=30))
    info = check_pem(leaf + inter, key, NOW + dt.timedelta(days=80))
    assert any("expires soon" in w for w in info.warnings)


def test_name_warning_and_missing_parts(chain) -> None:
    leaf, inter, _, key, _ = chain
    info = check_pem(leaf + inter, key, NOW, expected_name="other.example.com")
    assert any("does not name other.example.com" in w for w in info.warnings)
    with pytest.raises(CertificateError, match="no PEM certificate"):
        check_pem(b"junk", key, NOW)
    with pytest.raises(CertificateError, match="no private key"):
        check_pem(leaf, None, NOW)
    enc = _key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(CertificateError, match="encrypted"):
        check_pem(leaf, enc, NOW)


def test_generated_certificate_names_and_reuse(tmp_path) -> None:
    now = dt.datetime.now(dt.UTC)
    path, info, created = ensure_self_signed(
        tmp_path, "edge.example.com", ["edge", "localhost", "127.0.0.1"], now
    )
    assert created and info.self_signed
    assert set(info.names) >= {"edge.example.com", "edge", "localhost", "127.0.0.1"}
    assert os.stat(path).st_mode & 0o777 == 0o600
    again, _, created2 = ensure_self_signed(tmp_path, "edge.example.com", ["edge"], now)
    assert again == path and not created2
    first = path.read_bytes()
    # renamed host: the generated certificate is ours, so it is replaced
    _, info3, created3 = ensure_self_signed(tmp_path, "new.example.com", [], now)
    assert created3 and "new.example.com" in info3.names and path.read_bytes() != first
    ctx = server_context(str(path))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_generate_is_loadable_by_openssl(tmp_path) -> None:
    pem = generate_self_signed("a.example", ["::1"], dt.datetime.now(dt.UTC))
    p = tmp_path / "c.pem"
    p.write_bytes(pem)
    ctx = server_context(str(p))
    ciphers = {c["name"] for c in ctx.get_ciphers()}
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in ciphers
    assert not any(
        "CBC" in c or c.startswith("AES") or "RSA-AES" in c.replace("ECDHE-RSA", "")
        for c in ciphers
        if "TLS_" not in c
    )


def test_install_checks_names_completeness_and_strength(chain) -> None:
    """What `confedge cert install` adds to the start-up checks (require_name, trusted)."""
    leaf, inter, root, key, _ = chain
    with pytest.raises(CertificateError, match=r"does not name this host, other\.example\.com"):
        check_pem(leaf + inter, key, NOW, expected_name="other.example.com", require_name=True)
    # Complete: ends at a self-signed root, or at a certificate a trusted root signed.
    check_pem(leaf + inter + root, key, NOW, trusted=[])
    check_pem(leaf + inter, key, NOW, trusted=[x509.load_pem_x509_certificate(root)])
    with pytest.raises(CertificateError, match="chain is incomplete: certificate 2"):
        check_pem(leaf + inter, key, NOW, trusted=[])
    with pytest.raises(CertificateError, match="chain is incomplete: certificate 1"):
        check_pem(leaf, key, NOW, trusted=[x509.load_pem_x509_certificate(root)])
    # Weak keys are refused at start too (OpenSSL at security level 2 would refuse them in
    # the handshake, with a message nobody can act on).
    weak_k = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = _cert("edge.example.com", weak_k, "edge.example.com", weak_k, ca=False)
    weak_key = weak_k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(CertificateError, match=r"RSA 1024 bits, too weak \(at least 2048\)"):
        check_pem(weak, weak_key, NOW)
    p192 = ec.generate_private_key(ec.SECP192R1())
    small = _cert("edge.example.com", p192, "edge.example.com", p192, ca=False)
    with pytest.raises(CertificateError, match="EC secp192r1, too weak"):
        check_pem(small, _pem_key(p192), NOW)


def test_sni_map_first_certificate_wins() -> None:
    exact, wildcard = sni_map(
        [
            ("default", ("edge.example.com", "10.0.0.5")),
            ("one", ("meet.example.org", "EDGE.example.com", "*.video.example.org")),
            ("two", ("meet.example.org.", "*.video.example.org", "x.video.example.org")),
        ]
    )
    assert exact == {
        "edge.example.com": "default",
        "meet.example.org": "one",
        "x.video.example.org": "two",
    }
    assert wildcard == {"video.example.org": "one"}


def test_forced_self_signed_is_new(tmp_path) -> None:
    now = dt.datetime.now(dt.UTC)
    path, _, _ = ensure_self_signed(tmp_path, "edge.example.com", [], now)
    first = path.read_bytes()
    _, _, created = ensure_self_signed(tmp_path, "edge.example.com", [], now, force=True)
    assert created and path.read_bytes() != first


def test_an_unchanged_certificate_warns_once_not_at_every_reload(tmp_path, caplog) -> None:
    """Every reload builds the TLS contexts again (proxy, TURN, each worker): a certificate
    that expires soon said so three or more times per SIGHUP. Once a day per text now; another
    certificate with its own warning is said at once."""
    import logging

    from confedge.config import parse_config
    from confedge.tls import context

    context._warned.clear()
    real_now = dt.datetime.now(dt.UTC)
    paths = []
    for i, days in enumerate((5, 6)):  # both within the "expires soon" window
        k = _key()
        pem = tmp_path / f"edge{i}.pem"
        pem.write_bytes(
            _cert("edge.localdomain", k, "edge.localdomain", k, ca=False, days=days, start=real_now)
            + _pem_key(k)
        )
        paths.append(str(pem))

    def build(cert: str) -> None:
        cfg = parse_config(
            {
                "server": {"state_dir": str(tmp_path)},
                "turn": {"enabled": False},
                "proxy": {"nodes": ["127.0.0.1"]},
                "tls": {"cert": cert},
            }
        )
        context.TLSContextHolder(cfg)

    caplog.set_level(logging.WARNING, logger="confedge.tls")
    for _ in range(5):
        build(paths[0])
    soon = [r for r in caplog.records if "expires soon" in r.getMessage()]
    assert len(soon) == 1, soon
    build(paths[1])  # a new certificate (another date): its warning at once
    assert len([r for r in caplog.records if "expires soon" in r.getMessage()]) == 2
    context._warned.clear()
