"""Certificates and TLS contexts: generation, loading with checks, reload (SPEC §5)."""

from confedge.tls.certs import (
    CertificateError,
    CertificateInfo,
    check_pem,
    ensure_self_signed,
    generate_self_signed,
    load_certificate,
)
from confedge.tls.context import TLSContextHolder, client_context, server_context

__all__ = [
    "CertificateError",
    "CertificateInfo",
    "TLSContextHolder",
    "check_pem",
    "client_context",
    "ensure_self_signed",
    "generate_self_signed",
    "load_certificate",
    "server_context",
]
