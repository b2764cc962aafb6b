"""A small certificate authority for directord: no openssl scripts, no certmonger.

Layout of the PKI directory (``--pki-dir``, default ``/etc/directord/pki``)::

    ca.crt  ca.key             the CA (key 0600)
    certs/NAME.crt             issued certificates
    private/NAME.key           their keys (0600); absent for certificates signed from a CSR
    csr/NAME.csr               requests made with ``csr`` on a node
    crl.pem                    revocations, signed by the CA, checked at every connection
    revoked.json               serial numbers revoked, with names and dates
    old/NAME.<stamp>.crt|key   what ``rotate`` replaced; never overwritten

Keys are EC P-256. Certificates carry the name as subject CN and as a DNS (or
IP) subject alternative name. The extended key usage (EKU) says what a
certificate is for, and so what kind of identity it is:

* ``client`` (the default): clientAuth only. A node's certificate; the node
  listener accepts it, the user API over TCP does not.
* ``operator``: clientAuth and :data:`OPERATOR_USAGE`, directord's own EKU. An
  operator's certificate for the user API over TCP; the node listener refuses it.
* ``server``: serverAuth only, for a server or a broker.
* ``both``: serverAuth and clientAuth. Nothing in directord needs it; it is kept
  for certificates issued that way before, which ``rotate`` reproduces.

Nodes carry no mark of their own: "no operator mark" is the node kind, so node
certificates issued before operators existed keep working, and a certificate
nobody marked is never more than a node.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from directord.errors import CertificateError, ConfigError

DEFAULT_PKI_DIR = "/etc/directord/pki"
CA_DAYS = 3650
CERT_DAYS = 365
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@:")
#: The extended key usage that makes a certificate an operator's. An OID of our own
#: under the UUID arc 2.25 (ITU-T X.667, uuid 6ea5a5b4-777a-4c30-aef0-e28d7672dd3d):
#: no other issuer means anything by it, and TLS libraries ignore it beside clientAuth.
OPERATOR_USAGE = x509.ObjectIdentifier("2.25.147075169413629412587962312682405813565")
_EKUS: dict[str, list[x509.ObjectIdentifier]] = {
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "operator": [ExtendedKeyUsageOID.CLIENT_AUTH, OPERATOR_USAGE],
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "both": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
}
#: What ``usage`` may be when issuing or signing.
USAGES = tuple(_EKUS)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_name(name: str) -> None:
    if not name or not set(name) <= NAME_CHARS or name.startswith("."):
        raise ConfigError(
            f"invalid certificate name {name!r} (letters, digits, - _ . @ :)", key="name"
        )


def _write_private(path: Path, data: bytes) -> None:
    """Create a file readable by its owner only, without a window where it is not."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _names(ext: x509.SubjectAlternativeName) -> list[str]:
    """The DNS and IP names of a SAN extension, as text (the only kinds we issue)."""
    out = [str(v) for v in ext.get_values_for_type(x509.DNSName)]
    return out + [str(v) for v in ext.get_values_for_type(x509.IPAddress)]


def _sans(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def load_certificate(path: str | Path) -> x509.Certificate:
    """Read a PEM certificate. Raises CertificateError naming the file."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read certificate: {exc.strerror}") from None
    except ValueError:
        raise CertificateError(f"{path}: not a PEM certificate") from None


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Read a PEM EC private key. Raises CertificateError naming the file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read key: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise CertificateError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: expected an EC key")
    return key


def common_name(cert: x509.Certificate) -> str:
    """The subject CN of a certificate ('' if none)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def usage_of(cert: x509.Certificate) -> str:
    """What a certificate is for: ``operator``, ``client``, ``server`` or ``both``.

    ``operator`` whenever :data:`OPERATOR_USAGE` is present; a certificate without
    an EKU extension may serve any purpose in TLS, so it reads as ``both``.
    """
    try:
        ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return "both"
    if OPERATOR_USAGE in ekus:
        return "operator"
    server = ExtendedKeyUsageOID.SERVER_AUTH in ekus
    client = ExtendedKeyUsageOID.CLIENT_AUTH in ekus
    return "both" if server and client else "server" if server else "client"


def describe(cert: x509.Certificate) -> str:
    """``certificate 'NAME' (serial HEX)``, how logs and refusals name a certificate."""
    return f"certificate {common_name(cert)!r} (serial {cert.serial_number:x})"


@dataclass(frozen=True, slots=True)
class SigningRequest:
    """A certificate signing request, read and its signature checked."""

    path: Path
    name: str
    #: the DNS and IP subject alternative names it asks for, in its order
    sans: tuple[str, ...]
    #: other kinds of names it asks for (URI, e-mail ...), which are never signed
    other_names: tuple[str, ...]
    public_key: Any


def read_request(csr_file: str | Path) -> SigningRequest:
    """Read a CSR made with ``pki csr`` (or any EC/RSA CSR with a CN).

    Raises:
        CertificateError: unreadable, not PEM, or a signature that does not verify.
        ConfigError: its CN is not a valid certificate name.
    """
    try:
        data = Path(csr_file).read_bytes()
    except OSError as exc:
        raise CertificateError(f"{csr_file}: cannot read: {exc.strerror}") from None
    return parse_request(data, Path(csr_file))


def parse_request(data: bytes, where: str | Path) -> SigningRequest:
    """A CSR's PEM bytes, read and checked (``where`` names it in errors).

    Raises:
        CertificateError: not PEM, or a signature that does not verify.
        ConfigError: its CN is not a valid certificate name.
    """
    try:
        request = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CertificateError(f"{where}: not a PEM certificate request") from None
    if not request.is_signature_valid:
        raise CertificateError(f"{where}: the request's signature is invalid")
    attrs = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(attrs[0].value) if attrs else ""
    _check_name(name)
    try:
        ext = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans: list[str] = []
        others: list[str] = []
    else:
        sans = _names(ext)
        others = [
            f"{type(v).__name__}:{v.value}"
            for v in ext
            if not isinstance(v, x509.DNSName | x509.IPAddress)
        ]
    return SigningRequest(Path(where), name, tuple(sans), tuple(others), request.public_key())


@dataclass(frozen=True, slots=True)
class CertInfo:
    """One row of ``pki list``."""

    name: str
    serial: int
    not_after: dt.datetime
    sans: tuple[str, ...]
    usage: str
    revoked: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat(),
            "sans": list(self.sans),
            "usage": self.usage,
            "revoked": self.revoked,
        }


class PKI:
    """The CA in one directory."""

    def __init__(self, directory: str | Path = DEFAULT_PKI_DIR) -> None:
        self.dir = Path(directory)

    # ---- paths -------------------------------------------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        """The CA certificate: hand this to every server and client."""
        return self.dir / "ca.crt"

    def cert_path(self, name: str) -> Path:
        """Where NAME's certificate lives."""
        return self.dir / "certs" / f"{name}.crt"

    def key_path(self, name: str) -> Path:
        """Where NAME's key lives."""
        return self.dir / "private" / f"{name}.key"

    @property
    def crl_path(self) -> Path:
        """The certificate revocation list."""
        return self.dir / "crl.pem"

    # ---- CA ----------------------------------------------------------------------------
    def init(self, name: str = "directord CA") -> Path:
        """Create the CA; refuses to overwrite an existing one."""
        if self.ca_cert_path.exists() or (self.dir / "ca.key").exists():
            raise ConfigError(
                f"{self.dir}: a CA already exists here; refusing to overwrite it", key="pki_dir"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(self.dir / "ca.key", _key_pem(key))
        _write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._write_crl(key, cert, {})
        return self.ca_cert_path

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.ca_cert_path.exists():
            raise ConfigError(
                f"{self.dir}: no CA here; run `directord pki init` first", key="pki_dir"
            )
        return load_private_key(self.dir / "ca.key"), load_certificate(self.ca_cert_path)

    # ---- issuing -----------------------------------------------------------------------
    def _build(
        self, name: str, public_key: Any, sans: list[str], usage: str, days: int
    ) -> x509.Certificate:
        if usage not in _EKUS:
            raise ConfigError(f"unknown usage {usage!r} ({', '.join(USAGES)})", key="usage")
        ca_key, ca_cert = self._ca()
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(_sans([name, *sans])), critical=False)
            .add_extension(x509.ExtendedKeyUsage(_EKUS[usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        return builder.sign(ca_key, hashes.SHA256())

    def issue(
        self,
        name: str,
        sans: list[str] | None = None,
        usage: str = "client",
        days: int = CERT_DAYS,
    ) -> tuple[Path, Path]:
        """Key and certificate for NAME, signed by the CA. Returns (cert, key) paths.

        ``usage`` is one of :data:`USAGES`; the default makes a node's certificate.
        """
        _check_name(name)
        if self.cert_path(name).exists():
            raise ConfigError(f"{self.cert_path(name)} exists; use `pki rotate {name}`", key="name")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._build(name, key.public_key(), list(sans or []), usage, days)
        _write_private(self.key_path(name), _key_pem(key))
        _write_public(self.cert_path(name), cert.public_bytes(serialization.Encoding.PEM))
        return self.cert_path(name), self.key_path(name)

    def csr(self, name: str, sans: list[str] | None = None) -> Path:
        """On a node: a key that never leaves it, and a request to carry to the CA."""
        _check_name(name)
        key = ec.generate_private_key(ec.SECP256R1())
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(
                x509.SubjectAlternativeName(_sans([name, *(sans or [])])), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        if self.key_path(name).exists():
            self._archive(name, cert=False)  # a key is never overwritten
        _write_private(self.key_path(name), _key_pem(key))
        path = self.dir / "csr" / f"{name}.csr"
        _write_public(path, request.public_bytes(serialization.Encoding.PEM))
        return path

    def sign(
        self,
        csr_file: str | Path,
        usage: str = "client",
        days: int = CERT_DAYS,
        *,
        keep_sans: bool = False,
    ) -> Path:
        """On the CA: sign a request; the name comes from its CN.

        The subject alternative names the request asks for are signed only with
        ``keep_sans``: a request is written by whoever holds the key, and a name
        signed blindly could let a node pass for a server. Without it the
        certificate names the CN alone.

        Raises:
            CertificateError: see :func:`read_request`.
            ConfigError: a bad CN or usage.
        """
        request = read_request(csr_file)
        sans = list(request.sans) if keep_sans else []
        cert = self._build(request.name, request.public_key, sans, usage, days)
        name = request.name
        if self.cert_path(name).exists():
            # Only the certificate: a key beside it is the requester's (`csr` in this
            # directory), and it is the one the new certificate is for.
            self._archive(name, key=False)
        _write_public(self.cert_path(name), cert.public_bytes(serialization.Encoding.PEM))
        return self.cert_path(name)

    def sign_pem(
        self, request: SigningRequest, usage: str = "client", days: int = CERT_DAYS
    ) -> bytes:
        """Sign a request already read (:func:`parse_request`), for its CN alone.

        The certificate is kept in ``certs/`` as with :meth:`sign`; returns its PEM.
        """
        cert = self._build(request.name, request.public_key, [], usage, days)
        if self.cert_path(request.name).exists():
            self._archive(request.name, key=False)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        _write_public(self.cert_path(request.name), pem)
        return pem

    def _archive(self, name: str, *, cert: bool = True, key: bool = True) -> None:
        stamp = _now().strftime("%Y%m%dT%H%M%S%fZ")
        for path, suffix, wanted in (
            (self.cert_path(name), "crt", cert),
            (self.key_path(name), "key", key),
        ):
            if wanted and path.exists():
                target = self.dir / "old" / f"{name}.{stamp}.{suffix}"
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.replace(path, target)

    def rotate(
        self,
        name: str,
        sans: list[str] | None = None,
        usage: str | None = None,
        days: int = CERT_DAYS,
    ) -> tuple[Path, Path]:
        """A new key and certificate; the old ones move to ``old/`` with a timestamp."""
        old = load_certificate(self.cert_path(name))
        if sans is None:
            try:
                sans = _names(
                    old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                )
            except x509.ExtensionNotFound:
                sans = []
        self._archive(name)
        return self.issue(name, sans, usage or usage_of(old), days)

    # ---- listing and revocation ----------------------------------------------------------
    def _revoked(self) -> dict[str, dict[str, Any]]:
        path = self.dir / "revoked.json"
        if not path.exists():
            return {}
        try:
            data: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CertificateError(f"{path}: unreadable: {exc}") from None
        return data

    def list(self) -> list[CertInfo]:
        """Every current certificate with its names, expiry and revocation."""
        revoked = self._revoked()
        out = []
        for path in sorted((self.dir / "certs").glob("*.crt")):
            cert = load_certificate(path)
            try:
                sans = tuple(
                    _names(
                        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    )
                )
            except x509.ExtensionNotFound:
                sans = ()
            out.append(
                CertInfo(
                    path.stem,
                    cert.serial_number,
                    cert.not_valid_after_utc,
                    sans,
                    usage_of(cert),
                    f"{cert.serial_number:x}" in revoked,
                )
            )
        return out

    def revoke(self, name: str) -> int:
        """Add NAME's current certificate to the CRL; returns its serial."""
        cert = load_certificate(self.cert_path(name))
        ca_key, ca_cert = self._ca()
        revoked = self._revoked()
        revoked[f"{cert.serial_number:x}"] = {"name": name, "date": _now().isoformat()}
        _write_public(self.dir / "revoked.json", json.dumps(revoked, indent=2).encode())
        self._write_crl(ca_key, ca_cert, revoked)
        return cert.serial_number

    def _write_crl(
        self,
        key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        revoked: dict[str, dict[str, Any]],
    ) -> None:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=CA_DAYS))
        )
        for serial, info in revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(dt.datetime.fromisoformat(info["date"]))
                .build()
            )
        crl = builder.sign(key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def load_crl_serials(path: str | Path, ca_cert: x509.Certificate) -> set[int]:
    """Serials revoked by a CRL, after checking the CA signed it.

    Raises:
        CertificateError: unreadable CRL or a signature that is not the CA's.
    """
    try:
        crl = x509.load_pem_x509_crl(Path(path).read_bytes())
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read CRL: {exc.strerror}") from None
    except ValueError:
        raise CertificateError(f"{path}: not a PEM CRL") from None
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not (
        crl.is_signature_valid(public_key)
    ):
        raise CertificateError(f"{path}: CRL is not signed by the CA")
    return {entry.serial_number for entry in crl}
