"""TLS material for the listeners: PEM files, who may connect, and revocation.

Two kinds of client identity reach a directord server (see ``security/pki.py``):
nodes on the node listener, and operators on the user API over TCP. The checks
here say why a certificate may not be the kind a listener wants, and
:class:`RevocationWatch` cuts off live connections whose certificate the CRL
revokes after they were accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from directord.errors import CertificateError

if TYPE_CHECKING:
    from cryptography import x509

# cryptography and security.pki are imported by the functions that read certificates:
# every driver module imports this one, and the CLI, which loads every driver for its
# options, would otherwise pay for them (about 25 ms) at each start.

log = logging.getLogger(__name__)

#: Seconds between two looks at the CRL for connections to cut off (one stat each).
REVOCATION_CHECK = 1.0


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
    ``version`` grows at every change of the file, so a watcher can tell that the
    list changed even when a connection's check was the one that re-read it.
    """

    def __init__(self, ca_path: str, path: str = "") -> None:
        self.ca_path = ca_path
        self.path = path or str(Path(ca_path).with_name("crl.pem"))
        self.explicit = bool(path)
        self.version = 0
        self._stamp: tuple[int, ...] | None = ()  # None: no file; (): not looked at yet
        self._serials: set[int] = set()
        self._error = ""

    def serials(self) -> set[int]:
        """Revoked serials now. Raises CertificateError for a bad, forged or missing CRL.

        A CRL that fails to load keeps failing (refusing everyone) until the file
        changes again; it is not re-read at every call.
        """
        try:
            st = os.stat(self.path)
            # The inode too: `pki revoke` replaces the file, so even a rewrite within
            # the clock's resolution and of the same size is seen.
            stamp: tuple[int, ...] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self.version += 1
            self._error = ""
            self._serials = set()
            if stamp is not None:
                from directord.security.pki import load_certificate, load_crl_serials

                try:
                    self._serials = load_crl_serials(self.path, load_certificate(self.ca_path))
                except CertificateError as exc:
                    self._error = str(exc)
            elif self.explicit:
                self._error = f"{self.path}: CRL does not exist"
        if self._error:
            raise CertificateError(self._error)
        return self._serials


class RevocationWatch:
    """Cuts off live connections whose certificate was revoked after they connected.

    Every ``interval`` seconds it asks ``revocations`` for the serials (one stat
    while the file is unchanged); after a change it calls ``cut`` with the revoked
    serials, and the owner closes its connections holding one of them. A CRL that
    no longer loads is logged once per change and cuts no one: new connections are
    refused meanwhile, and the next good file is acted on.
    """

    def __init__(
        self,
        revocations: Revocations,
        cut: Callable[[set[int]], None],
        what: str,
        interval: float = REVOCATION_CHECK,
    ) -> None:
        self.revocations = revocations
        self.cut = cut
        self.what = what
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching (in the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.what}-revocations")

    async def close(self) -> None:
        """Stop watching; idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        seen = self.revocations.version
        while True:
            await asyncio.sleep(self.interval)
            try:
                serials = self.revocations.serials()
            except CertificateError as exc:
                if self.revocations.version != seen:
                    log.error("%s: %s; connected peers stay, new ones are refused", self.what, exc)
                seen = self.revocations.version
                continue
            if self.revocations.version == seen:
                continue
            seen = self.revocations.version
            try:
                self.cut(serials)
            except Exception:  # a bug here must not end the watch for good
                log.exception("%s: cutting off revoked peers failed", self.what)


def node_refusal(cert: x509.Certificate) -> str:
    """Why a certificate may not be a node's on the node listener ('' if it may).

    An operator's certificate is refused, and so is one for servers only (TLS
    libraries refuse that one first; this holds when they do not).
    """
    from directord.security.pki import describe, usage_of

    usage = usage_of(cert)
    if usage == "operator":
        return f"{describe(cert)} is an operator's, not a node's"
    if usage == "server":
        return f"{describe(cert)} is for servers only, not a node's"
    return ""


def operator_refusal(cert: x509.Certificate) -> str:
    """Why a certificate may not act as an operator on the user API ('' if it may)."""
    from directord.security.pki import describe, usage_of

    if usage_of(cert) == "operator":
        return ""
    return (
        f"{describe(cert)} is not an operator's "
        "(make one with `directord pki issue NAME --operator`)"
    )


def peer_certificate(pem: bytes) -> tuple[str, x509.Certificate]:
    """(common name, certificate) of a peer's PEM certificate."""
    from cryptography import x509

    from directord.security.pki import common_name

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
