"""TLS material for the drivers: reading PEM files, revocation, peer certificates."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from cryptography import x509

from directord.errors import CertificateError
from directord.security.pki import common_name, load_certificate, load_crl_serials

log = logging.getLogger(__name__)


def read_pem(path: str, what: str) -> bytes:
    """Read a PEM file for TLS. Raises CertificateError naming the file and its role."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise CertificateError(f"{path}: {what} is not PEM")
    return data


def check_key_pair(cert: str, key: str) -> None:
    """Raise CertificateError naming both files unless the key loads and fits the certificate.

    gRPC would only say that it cannot bind or connect; this says which files are wrong.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CertificateError(
            f"{cert} / {key}: certificate and key do not load or do not match: {reason}"
        ) from None


class Revocations:
    """A CRL signed by the CA, re-read whenever the file changes.

    ``path`` empty means: ``crl.pem`` beside the CA certificate, when present.
    """

    def __init__(self, ca_path: str, path: str = "") -> None:
        self.ca_path = ca_path
        self.path = path or str(Path(ca_path).with_name("crl.pem"))
        self.explicit = bool(path)
        self._stamp: tuple[int, int] | None = None
        self._serials: set[int] = set()

    def serials(self) -> set[int]:
        """Revoked serials now. Raises CertificateError for a bad or forged CRL."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.explicit:
                raise CertificateError(f"{self.path}: CRL does not exist") from None
            return set()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._serials = load_crl_serials(self.path, load_certificate(self.ca_path))
            self._stamp = stamp
        return self._serials


def peer_certificate(pem: bytes) -> tuple[str, x509.Certificate]:
    """(common name, certificate) of a peer's PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertificateError("peer certificate is not valid PEM") from None
    return common_name(cert), cert


def _api_context(
    purpose: ssl.Purpose, ca: str, cert: str, key: str, needed_by: str
) -> ssl.SSLContext:
    """A TLS context that trusts ``ca`` and presents ``cert``/``key``; files checked first."""
    for path, what in (
        (ca, "CA certificate (--ca)"),
        (cert, "certificate (--cert)"),
        (key, "private key (--key)"),
    ):
        if not path:
            raise CertificateError(f"{needed_by} needs a {what}")
        read_pem(path, what)
    context = ssl.create_default_context(purpose, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise CertificateError(f"{cert} / {key}: certificate and key do not load: {exc}") from None
    return context


def server_tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """TLS for a directord listener that requires client certificates from ``ca``.

    The CRL beside the CA (``crl.pem``), when present, is checked for every peer.
    Raises CertificateError naming a missing or unreadable file.
    """
    context = _api_context(ssl.Purpose.CLIENT_AUTH, ca, cert, key, "the API over TCP")
    context.verify_mode = ssl.CERT_REQUIRED
    crl = Path(ca).with_name("crl.pem")
    if crl.exists():
        context.load_verify_locations(cafile=str(crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """TLS for a user (CLI, library) reaching the API over TCP with its certificate."""
    return _api_context(ssl.Purpose.SERVER_AUTH, ca, cert, key, "--api-url")
