"""Let's Encrypt's way, for real: certbot gets a certificate from an ACME CA through confedge's
HTTP port, and its deploy hook puts it in service (docs/CERTIFICATES.md, "Let's Encrypt").

The CA is pebble (Debian's `pebble`: Let's Encrypt's own ACME test server, RFC 8555), with
`pebble-challtestsrv` as its DNS (every name is 127.0.0.1), validating HTTP-01 against the
running `confedge run`'s HTTP port exactly as a public CA does against port 80. certbot (Debian's
2.1) runs in webroot mode on `proxy.acme_webroot`, with the deploy hook the docs give:
`confedge cert install --cert "$RENEWED_LINEAGE/fullchain.pem" --key "$RENEWED_LINEAGE/privkey.pem"`.
Checked as a browser would: a TLS handshake that verifies the served chain against pebble's
root for the name. Then `certbot renew --force-renewal` (what its timer does when the time
comes): a new certificate, installed and served without a restart.

pebble's root stands in for a public root in the host's CA bundle (SSL_CERT_FILE for the hook,
as the real ISRG root is in Debian's bundle); its API certificate is made here.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from confedge.tls.certs import generate_self_signed
from ports import spare_ports, tcp_listening

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")
CERTBOT = shutil.which("certbot")
FQDN = "edge.example.com"

pytestmark = pytest.mark.skipif(
    not (PEBBLE and CHALLTESTSRV and CERTBOT),
    reason="needs pebble, pebble-challtestsrv and certbot (apt-get install pebble certbot)",
)


def _api_certificate(directory: Path) -> Path:
    """pebble's own HTTPS API certificate for 127.0.0.1, key and certificate in one PEM (Go's
    key-pair loader and certbot's CA bundle each take the blocks they need from it): made by
    confedge's own self-signed generator."""
    path = directory / "api.pem"
    now = datetime.datetime.now(datetime.UTC)
    path.write_bytes(generate_self_signed("localhost", ["127.0.0.1"], now, days=1))
    return path


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _confedge() -> list[str]:
    """The `confedge` command of the environment running the tests (what the docs call)."""
    beside = Path(sys.executable).parent / "confedge"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "confedge"]


def _served(port: int, cafile: Path) -> x509.Certificate:
    """The certificate confedge serves for FQDN, verified (chain and name) against `cafile`."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=FQDN) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.fixture
def acme_ca(tmp_path: Path) -> Iterator[tuple[str, Path, Path, int]]:
    """pebble and its DNS: (directory URL, API certificate, root CA file, HTTP-01 port)."""
    api, dns, mgmt, dns_mgmt, http01, tls01 = spare_ports(6)
    cert = _api_certificate(tmp_path)
    config = tmp_path / "pebble.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{api}",
                    "managementListenAddress": f"127.0.0.1:{mgmt}",
                    "certificate": str(cert),
                    "privateKey": str(cert),
                    "httpPort": http01,
                    "tlsPort": tls01,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    dns_proc = subprocess.Popen(
        [CHALLTESTSRV or "pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
         "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
         "-management", f"127.0.0.1:{dns_mgmt}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # No sleep before validating, no nonces rejected at random: the run is deterministic.
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    ca_proc = subprocess.Popen(
        [PEBBLE or "pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        tcp_listening(dns_mgmt, dns_proc, "pebble-challtestsrv", timeout=30)
        tcp_listening(api, ca_proc, "pebble", timeout=30)
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{mgmt}/roots/0", context=ctx) as r:
            root = tmp_path / "pebble-root.pem"
            root.write_bytes(r.read())
        yield f"https://127.0.0.1:{api}/dir", cert, root, http01
    finally:
        _stop([ca_proc, dns_proc])


@pytest.mark.timeout(240)
def test_certbot_through_the_http_port_and_the_deploy_hook(
    acme_ca: tuple[str, Path, Path, int], tmp_path: Path
) -> None:
    directory, api_cert, root, http01 = acme_ca
    https, mgmt = spare_ports(2)
    webroot, state = tmp_path / "acme", tmp_path / "state"
    webroot.mkdir()  # (docs: certbot wants it there)
    conf = tmp_path / "confedge.toml"
    conf.write_text(
        f'[server]\nhostname = "edge"\ndomain = "example.com"\nstate_dir = "{state}"\n'
        f'internal_address = "127.0.0.1"\n'
        f'[proxy]\nnodes = ["127.0.0.1:9"]\nhttps_port = {https}\nhttp_port = {http01}\n'
        f'acme_webroot = "{webroot}"\naccess_log = "{tmp_path}/access.log"\n'
        f"[turn]\nenabled = false\n[management]\nport = {mgmt}\n"
    )
    service = subprocess.Popen(
        [*_confedge(), "run", "--config", str(conf)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        tcp_listening(https, service, "confedge run")
        tcp_listening(mgmt, service, "confedge run (status page, started last)")
        hook = " ".join(
            [*_confedge(), "cert", "install", "--config", str(conf),
             '--cert "$RENEWED_LINEAGE/fullchain.pem"', '--key "$RENEWED_LINEAGE/privkey.pem"']
        )  # fmt: skip
        certbot_dirs = [
            "--config-dir", str(tmp_path / "le" / "etc"), "--work-dir", str(tmp_path / "le" / "lib"),
            "--logs-dir", str(tmp_path / "le" / "log"),
        ]  # fmt: skip
        # certbot trusts pebble's API; the hook's chain check trusts pebble's root, as a host
        # trusts Let's Encrypt's from its CA bundle.
        env = {**os.environ, "REQUESTS_CA_BUNDLE": str(api_cert), "SSL_CERT_FILE": str(root)}
        got = subprocess.run(
            [CERTBOT or "certbot", "certonly", "--non-interactive", "--agree-tos",
             "--register-unsafely-without-email", "--server", directory, "--webroot",
             "--webroot-path", str(webroot), "--domain", FQDN, "--deploy-hook", hook,
             *certbot_dirs],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert got.returncode == 0, got.stdout + got.stderr
        first = _served(https, root)
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [FQDN]
        issuer = first.issuer.rfc4514_string()
        assert "Pebble Intermediate CA" in issuer, issuer

        # What certbot's timer runs when renewal is due (forced here): the same hook again.
        renewed = subprocess.run(
            [CERTBOT or "certbot", "renew", "--non-interactive", "--force-renewal",
             "--no-random-sleep-on-renew",  # (the timer spreads renewals; not wanted here)
             *certbot_dirs],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        second = _served(https, root)
        assert second.serial_number != first.serial_number
        assert service.poll() is None  # served without a restart
    finally:
        _stop([service])
    log = service.stdout.read() if service.stdout is not None else ""
    assert "proxy.acme_webroot: the HTTP port" in log, log
    # The CA's validation requests, answered from the webroot (two issuances: two tokens).
    access = (tmp_path / "access.log").read_text()
    validations = [ln for ln in access.splitlines() if "/.well-known/acme-challenge/" in ln]
    assert len(validations) >= 2 and all('" 200 ' in ln for ln in validations), access
    # certbot removed its challenge files: nothing is left to serve.
    assert [p for p in webroot.rglob("*") if p.is_file()] == []
