"""`confedge cert install` as an operator meets it: a running `confedge run`, certificates made
here with cryptography, the command run as a process, and the served certificate read back with a
TLS client.

A good certificate (leaf + intermediate + root from a private CA) is served right after the
install; each bad one (mismatched key, reversed chain, expired, wrong name, 1024-bit RSA key,
missing intermediate) is refused with its one-line reason, exit status 2, and the old
certificate stays in service and the configuration file stays byte for byte.
"""

from __future__ import annotations

import datetime as dt
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ports import spare_port

NOW = dt.datetime.now(dt.UTC)
FQDN = "edge.example.com"
CONFEDGE = [sys.executable, "-m", "confedge"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    key: Any,
    issuer_cn: str,
    issuer_key: Any,
    *,
    ca: bool,
    names: tuple[str, ...] = (),
    start: dt.datetime = NOW - dt.timedelta(days=1),
    end: dt.datetime = NOW + dt.timedelta(days=90),
) -> bytes:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@dataclass
class Pki:
    root: bytes
    inter: bytes
    leaf: bytes
    leaf_key: bytes
    root_key: Any
    inter_key: Any


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_k, inter_k, leaf_k = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("Test Root", root_k, "Test Root", root_k, ca=True, end=NOW + dt.timedelta(3650))
    inter = _cert("Test Intermediate", inter_k, "Test Root", root_k, ca=True)
    leaf = _cert(FQDN, leaf_k, "Test Intermediate", inter_k, ca=False, names=(FQDN,))
    return Pki(root, inter, leaf, _key_pem(leaf_k), root_k, inter_k)


def _served_der(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=FQDN) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A `confedge run` serving the generated self-signed certificate on an ephemeral port."""
    tmp = tmp_path_factory.mktemp("edge")
    port = spare_port()
    cfg = tmp / "confedge.toml"
    cfg.write_text(
        f"""# the operator's file: comments and order must survive `cert install`
[server]
hostname = "edge"
domain = "example.com"   # FQDN edge.example.com
state_dir = "{tmp / "state"}"

[proxy]
https_port = {port}
http_port = 0
workers = 1
nodes = ["http://127.0.0.1:9"]

[turn]
enabled = false

[management]
enabled = false
"""
    )
    proc = subprocess.Popen(
        [*CONFEDGE, "run", "--config", str(cfg)], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            _served_der(port)
            break
        except OSError:
            assert time.monotonic() < deadline, "confedge run never served TLS"
            time.sleep(0.1)
    while not (tmp / "state" / "confedge.pid").exists():
        assert time.monotonic() < deadline, "confedge run wrote no pid file"
        time.sleep(0.05)
    try:
        yield tmp, cfg, port
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=15)[1]
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        assert not (tmp / "state" / "confedge.pid").exists()


def _install(cfg: Path, **files: bytes) -> subprocess.CompletedProcess[str]:
    args = [*CONFEDGE, "cert", "install", "--config", str(cfg)]
    for option, content in files.items():
        path = cfg.parent / f"in-{option}.pem"
        path.write_bytes(content)
        args += [f"--{option}", str(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def _bad_cases(pki: Pki) -> dict[str, tuple[dict[str, bytes], str]]:
    other_k = ec.generate_private_key(ec.SECP256R1())
    weak_k = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    expired = _cert(
        FQDN,
        other_k,
        "Test Intermediate",
        pki.inter_key,
        ca=False,
        names=(FQDN,),
        start=NOW - dt.timedelta(days=400),
        end=NOW - dt.timedelta(days=2),
    )
    wrong_name = _cert(
        "meet.other.org", other_k, "Test Intermediate", pki.inter_key, ca=False,
        names=("meet.other.org",),
    )  # fmt: skip
    weak = _cert(FQDN, weak_k, "Test Intermediate", pki.inter_key, ca=False, names=(FQDN,))
    chain = pki.inter + pki.root
    return {
        "mismatched key": (
            {"cert": pki.leaf, "key": _key_pem(other_k), "chain": chain},
            "--cert + --chain: the private key does not match the certificate "
            f"(subject CN={FQDN}); install the key that was used for its CSR",
        ),
        "reversed chain": (
            {"cert": pki.leaf, "key": pki.leaf_key, "chain": pki.root + pki.inter},
            f"--cert + --chain: chain order is wrong: certificate 1 (CN={FQDN}) was issued by "
            "CN=Test Intermediate, but certificate 2 is CN=Test Root; put the leaf first, then "
            "each issuer after the certificate it signed",
        ),
        "expired": (
            {"cert": expired, "key": _key_pem(other_k), "chain": chain},
            "--cert + --chain: the certificate expired on "
            f"{x509.load_pem_x509_certificate(expired).not_valid_after_utc.isoformat()}; "
            "install a renewed one",
        ),
        "name does not match": (
            {"cert": wrong_name, "key": _key_pem(other_k), "chain": chain},
            f"--cert + --chain: the certificate does not name this host, {FQDN} "
            "(names: meet.other.org); get one that lists it, or set server.hostname and "
            "server.domain to the name it was issued for",
        ),
        "1024-bit key": (
            {"cert": weak, "key": _key_pem(weak_k), "chain": chain},
            "--key: the key is RSA 1024 bits, too weak (at least 2048); have the certificate "
            "reissued for an RSA 2048+ or EC P-256 key",
        ),
        "missing intermediate": (
            {"cert": pki.leaf, "key": pki.leaf_key},
            f"--cert: the chain is incomplete: certificate 1 (CN={FQDN}) was issued by "
            "CN=Test Intermediate, which is neither in the files nor a root this host trusts; "
            "add the intermediate certificate(s) (--chain), or the root of a private CA",
        ),
    }


def test_bad_certificates_are_refused_and_the_good_one_is_served(edge: Any, pki: Pki) -> None:
    tmp, cfg, port = edge
    old = _served_der(port)
    config_before = cfg.read_bytes()
    for case, (files, reason) in _bad_cases(pki).items():
        res = _install(cfg, **files)
        assert res.returncode == 2, (case, res.stdout, res.stderr)
        assert res.stderr.splitlines() == [f"confedge cert install: refused: {reason}"], case
        assert res.stdout == "", case
        assert cfg.read_bytes() == config_before, case
        assert not (tmp / "state" / "tls" / "server.pem").exists(), case
        assert _served_der(port) == old, case

    res = _install(cfg, cert=pki.leaf, key=pki.leaf_key, chain=pki.inter + pki.root)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    (line,) = res.stdout.splitlines()  # one plain result line
    assert line.startswith(f"installed CN={FQDN} ({FQDN}; valid until ")
    assert "reloaded the running confedge (pid " in line
    deadline = time.monotonic() + 10
    while _served_der(port) != _der(pki.leaf):
        assert time.monotonic() < deadline, "the installed certificate is not served"
        time.sleep(0.1)

    installed_key = tmp / "state" / "tls" / "server.key"
    assert installed_key.stat().st_mode & 0o777 == 0o600
    text = cfg.read_text()
    assert text.startswith("# the operator's file: comments and order must survive")
    assert 'domain = "example.com"   # FQDN edge.example.com' in text
    assert f'cert = "{tmp / "state" / "tls" / "server.pem"}"' in text
    assert f'key = "{installed_key}"' in text
    audit = (tmp / "state" / "audit.log").read_text()
    assert f"certificate installed subject=CN={FQDN}" in audit and "by=operator" in audit

    # `cert show` names what is now served, and `self-signed` will not replace it unasked.
    show = subprocess.run(
        [*CONFEDGE, "cert", "show", "--config", str(cfg)], capture_output=True, text=True
    )
    assert show.returncode == 0, show.stdout + show.stderr
    assert f"subject:  CN={FQDN}" in show.stdout
    assert "1. CN=edge.example.com  issued by CN=Test Intermediate" in show.stdout
    assert "3. CN=Test Root  issued by CN=Test Root" in show.stdout
    assert "key:      EC secp256r1 (256 bits)" in show.stdout
    refused = subprocess.run(
        [*CONFEDGE, "cert", "self-signed", "--config", str(cfg)], capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "a self-signed one replaces it only with --force" in refused.stderr
    assert _served_der(port) == _der(pki.leaf)


def test_a_reload_the_running_service_refuses_is_reported_with_exit_1(edge: Any, pki: Pki) -> None:
    """`cert install` waits for the service's answer: a reload refused for another reason (here
    a restart-only key the operator edited before installing) leaves the old certificate in
    service, and the operator hears so, where the command used to say "reloaded" at once."""
    _tmp, cfg, port = edge
    served = _served_der(port)
    text = cfg.read_text()
    cfg.write_text(text.replace("workers = 1", "workers = 2"))  # proxy.workers: restart only
    try:
        res = _install(cfg, cert=pki.leaf, key=pki.leaf_key, chain=pki.inter + pki.root)
        assert res.returncode == 1, (res.stdout, res.stderr)
        (line,) = res.stdout.splitlines()
        assert line.startswith(f"installed CN={FQDN} (")
        assert (
            "but the running confedge (pid " in line and "did not take it: only a restart" in line
        )
        assert "proxy.workers" in line
        assert _served_der(port) == served  # the service serves what it served
    finally:
        cfg.write_text(cfg.read_text().replace("workers = 2", "workers = 1"))
