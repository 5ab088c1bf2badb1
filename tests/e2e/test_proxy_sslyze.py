"""sslyze against the proxy's TLS port: Mozilla's "intermediate" profile (SPEC §2 TLS).

sslyze's checker (the same one ``sslyze --mozilla_config=intermediate`` runs) checks:

* protocol versions: exactly TLS 1.2 and 1.3 (no SSL 2/3, TLS 1.0/1.1);
* cipher suites: only the profile's TLS 1.2 ciphers (ECDHE/DHE with AES-GCM or ChaCha20) and
  TLS 1.3 suites;
* key exchange groups: only X25519, prime256v1, secp384r1 (others offered are an issue);
* ECDH/DH parameter sizes;
* vulnerabilities: TLS compression, CCS injection, Heartbleed, ROBOT, insecure renegotiation,
  missing TLS_FALLBACK_SCSV, missing extended master secret;
* the certificate: type, RSA key size / EC curve, signature algorithm, lifespan, and path
  validation against public trust stores.

The generated certificate is self-signed, so ``certificate_path_validation`` is the one issue
expected and tolerated; every other issue fails the test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from proxy_e2e_support import Upstream, running_proxy, wait_healthy

PORTS = (32500, 32550)
TOLERATED = {"certificate_path_validation"}  # self-signed: no public CA vouches for it

sslyze = pytest.importorskip("sslyze", reason="sslyze (PyPI) is not installed in the venv")


def _scan(port: int) -> tuple[dict[str, str], Any]:
    from sslyze import Scanner, ServerNetworkLocation, ServerScanRequest
    from sslyze.mozilla_tls_profile.tls_config_checker import (
        SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        MozillaTlsConfiguration,
        ServerNotCompliantWithTlsConfiguration,
        TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )

    scanner = Scanner()
    scanner.queue_scans(
        [
            ServerScanRequest(
                server_location=ServerNetworkLocation("127.0.0.1", port),
                scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
            )
        ]
    )
    (result,) = list(scanner.get_results())
    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    try:
        check_server_against_tls_configuration(result, profile)
    except ServerNotCompliantWithTlsConfiguration as exc:
        return dict(exc.issues), result
    return {}, result


@pytest.mark.timeout(60)
async def test_mozilla_intermediate_profile(tmp_path: Path) -> None:
    up = Upstream()
    await up.start()
    try:
        async with running_proxy(tmp_path, [up.port], PORTS) as info:
            await wait_healthy(info["https"])
            port = int(info["https"].rstrip("/").rsplit(":", 1)[1])
            issues, result = await asyncio.to_thread(_scan, port)
    finally:
        await up.close()
    unexpected = {k: v for k, v in issues.items() if k not in TOLERATED}
    assert not unexpected, f"not Mozilla intermediate compliant: {unexpected}"
    # Beyond the checker: what the proxy accepts, positively.
    r = result.scan_result
    assert not r.ssl_2_0_cipher_suites.result.accepted_cipher_suites
    assert not r.ssl_3_0_cipher_suites.result.accepted_cipher_suites
    assert not r.tls_1_0_cipher_suites.result.accepted_cipher_suites
    assert not r.tls_1_1_cipher_suites.result.accepted_cipher_suites
    assert r.tls_1_2_cipher_suites.result.accepted_cipher_suites
    assert r.tls_1_3_cipher_suites.result.accepted_cipher_suites
    assert not r.heartbleed.result.is_vulnerable_to_heartbleed
    assert r.session_renegotiation.result.is_vulnerable_to_client_renegotiation_dos is False
