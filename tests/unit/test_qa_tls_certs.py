"""Adversarial QA of certificate loading: every way an operator can get [tls] cert/key wrong
gets one sentence naming the file and the fix -- never a traceback, never a hang.

Certificates are made with `cryptography` on the fly (no fixtures on disk).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from confedge.tls.certs import CertificateError, check_tls_config, load_certificate

NOW = dt.datetime.now(dt.UTC)
NAME = "edge.example.test"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: object, password: bytes | None = None) -> bytes:
    enc = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )


def _cert(
    subject: str,
    key: object,
    issuer: str,
    issuer_key: object,
    *,
    ca: bool = False,
    start: dt.datetime = NOW - dt.timedelta(days=1),
    end: dt.datetime = NOW + dt.timedelta(days=90),
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    root_k, int_k, leaf_k = _key(), _key(), _key()
    root = _cert("Root", root_k, "Root", root_k, ca=True)
    inter = _cert("Intermediate", int_k, "Root", root_k, ca=True)
    leaf = _cert(NAME, leaf_k, "Intermediate", int_k)
    return {"root": root, "inter": inter, "leaf": leaf, "leaf_k": leaf_k, "int_k": int_k}


def _write(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def _problem(cert: str, key: str = "") -> str:
    with pytest.raises(CertificateError) as info:
        load_certificate(cert, key, NOW, expected_name=NAME)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_good_files_load(pki: dict[str, object], tmp_path: Path) -> None:
    cert = _write(tmp_path, "c.pem", _pem(pki["leaf"], pki["inter"]))  # type: ignore[arg-type]
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"]))
    info = load_certificate(cert, key, NOW, expected_name=NAME)
    assert info.chain_length == 2 and not info.warnings


def test_garbage_pem(pki: dict[str, object], tmp_path: Path) -> None:
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"]))
    bad = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    msg = _problem(_write(tmp_path, "c.pem", bad), key)
    assert "c.pem" in msg and "certificate 1 in the file cannot be read" in msg
    msg = _problem(_write(tmp_path, "t.pem", b"hello, I am a certificate\n"), key)
    assert "t.pem" in msg and "no PEM certificate" in msg


def test_key_does_not_match(pki: dict[str, object], tmp_path: Path) -> None:
    cert = _write(tmp_path, "c.pem", _pem(pki["leaf"]))  # type: ignore[arg-type]
    key = _write(tmp_path, "k.pem", _key_pem(_key()))
    msg = _problem(cert, key)
    assert "c.pem" in msg and "does not match" in msg


def test_expired_and_not_yet_valid(pki: dict[str, object], tmp_path: Path) -> None:
    k = pki["leaf_k"]
    key = _write(tmp_path, "k.pem", _key_pem(k))
    old = _cert(
        NAME, k, NAME, k, start=NOW - dt.timedelta(days=400), end=NOW - dt.timedelta(days=5)
    )
    msg = _problem(_write(tmp_path, "old.pem", _pem(old)), key)
    assert "old.pem" in msg and "expired" in msg
    new = _cert(NAME, k, NAME, k, start=NOW + dt.timedelta(days=5))
    msg = _problem(_write(tmp_path, "new.pem", _pem(new)), key)
    assert "new.pem" in msg and "not valid before" in msg and "clock" in msg


def test_wrong_chain_order(pki: dict[str, object], tmp_path: Path) -> None:
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"]))
    # Intermediate first: the key matches certificate 2.
    msg = _problem(_write(tmp_path, "c.pem", _pem(pki["inter"], pki["leaf"])), key)  # type: ignore[arg-type]
    assert "first" in msg
    # Root between leaf and intermediate.
    msg = _problem(_write(tmp_path, "d.pem", _pem(pki["leaf"], pki["root"], pki["inter"])), key)  # type: ignore[arg-type]
    assert "chain order" in msg


def test_intermediate_with_the_right_name_but_another_key(
    pki: dict[str, object], tmp_path: Path
) -> None:
    # A re-keyed (or wrongly downloaded) intermediate: same subject, another key. The signature
    # check fails with cryptography's InvalidSignature, whose text is empty: the message must
    # still say what is wrong and what to do.
    other = _cert("Intermediate", _key(), "Root", _key(), ca=True)
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"]))
    msg = _problem(_write(tmp_path, "c.pem", _pem(pki["leaf"], other)), key)  # type: ignore[arg-type]
    assert "c.pem" in msg and "certificate 2 (CN=Intermediate) did not sign certificate 1" in msg
    assert "()" not in msg and "another key" in msg and "intermediate" in msg


def test_cert_only_no_key(pki: dict[str, object], tmp_path: Path) -> None:
    msg = _problem(_write(tmp_path, "c.pem", _pem(pki["leaf"])))  # type: ignore[arg-type]
    assert "c.pem" in msg and "no private key" in msg and "tls.key" in msg
    assert "tls.key ()" not in msg


def test_encrypted_key(pki: dict[str, object], tmp_path: Path) -> None:
    cert = _write(tmp_path, "c.pem", _pem(pki["leaf"]))  # type: ignore[arg-type]
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"], b"hunter2"))
    msg = _problem(cert, key)
    assert "k.pem" in msg and "encrypted" in msg and "openssl" in msg
    # The traditional OpenSSL form (Proc-Type: 4,ENCRYPTED) too.
    rsa_k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    legacy = rsa_k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"hunter2"),
    )
    rsa_cert = _write(tmp_path, "r.pem", _pem(_cert(NAME, rsa_k, NAME, rsa_k)))
    msg = _problem(rsa_cert, _write(tmp_path, "rk.pem", legacy))
    assert "encrypted" in msg


def test_der_instead_of_pem(pki: dict[str, object], tmp_path: Path) -> None:
    leaf = pki["leaf"]
    assert isinstance(leaf, x509.Certificate)
    der = _write(tmp_path, "c.der", leaf.public_bytes(serialization.Encoding.DER))
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"]))
    msg = _problem(der, key)
    assert "c.der" in msg and "DER" in msg and "openssl x509 -inform der" in msg
    der_key = pki["leaf_k"].private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem_cert = _write(tmp_path, "c.pem", _pem(leaf))
    msg = _problem(pem_cert, _write(tmp_path, "k.der", der_key))
    assert "k.der" in msg and "DER" in msg and "openssl pkey -inform der" in msg


def test_empty_file_directory_and_device(pki: dict[str, object], tmp_path: Path) -> None:
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"]))
    msg = _problem(_write(tmp_path, "empty.pem", b""), key)
    assert "empty.pem" in msg and "empty" in msg
    (tmp_path / "adir").mkdir()
    msg = _problem(str(tmp_path / "adir"), key)
    assert "adir" in msg and "directory" in msg
    # A device would be read for ever (/dev/zero) or block (a FIFO): refused unread.
    msg = _problem("/dev/zero", key)
    assert "/dev/zero" in msg and "not a regular file" in msg
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    msg = _problem(str(fifo), key)
    assert "not a regular file" in msg
    msg = _problem(str(tmp_path / "missing.pem"), key)
    assert "missing.pem" in msg and "No such file" in msg
    cert = _write(tmp_path, "c.pem", _pem(pki["leaf"]))  # type: ignore[arg-type]
    msg = _problem(cert, str(tmp_path / "adir"))
    assert msg.startswith("tls.key") and "directory" in msg


def test_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    with big.open("wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: no disk used
    msg = _problem(str(big))
    assert "big.pem" in msg and "too large" in msg


def test_swapped_cert_and_key(pki: dict[str, object], tmp_path: Path) -> None:
    cert = _write(tmp_path, "c.pem", _pem(pki["leaf"]))  # type: ignore[arg-type]
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"]))
    msg = _problem(key, cert)
    assert "swap" in msg


def test_check_tls_config_for_confedge_check(pki: dict[str, object], tmp_path: Path) -> None:
    """The helper `confedge check` can call: problems and warnings as lines, no exceptions."""
    from confedge.config import parse_config

    base = {"proxy": {"enabled": False}, "turn": {"enabled": False}}
    problems, warnings = check_tls_config(parse_config(base), NOW)
    assert problems == [] and warnings == []  # no cert configured: generated at start
    cert = _write(tmp_path, "c.pem", _pem(pki["leaf"], pki["inter"]))  # type: ignore[arg-type]
    cfg = parse_config({**base, "tls": {"cert": cert, "key": str(tmp_path / "nokey.pem")}})
    problems, warnings = check_tls_config(cfg, NOW)
    assert len(problems) == 1 and "nokey.pem" in problems[0]
    key = _write(tmp_path, "k.pem", _key_pem(pki["leaf_k"]))
    cfg = parse_config({**base, "tls": {"cert": cert, "key": key}})
    problems, warnings = check_tls_config(cfg, NOW)
    assert problems == []
    assert len(warnings) == 1 and "edge.localdomain" in warnings[0]  # not the FQDN
