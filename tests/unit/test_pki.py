"""The built-in PKI (security/pki.py), the TLS helpers (security/tls.py) and `directord pki`.

Everything here works on files in a temporary directory: no network, no processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from directord.cli.main import main
from directord.errors import CertificateError, ConfigError
from directord.security.pki import (
    OPERATOR_USAGE,
    PKI,
    common_name,
    load_certificate,
    load_crl_serials,
    load_private_key,
    read_request,
    usage_of,
)
from directord.security.tls import (
    Revocations,
    RevocationWatch,
    check_key_pair,
    client_tls_context,
    node_refusal,
    operator_refusal,
    read_pem,
    server_tls_context,
)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = PKI(tmp_path / "pki")
    ca.init()
    return ca


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans_of(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        {str(v) for v in ext.get_values_for_type(x509.DNSName)},
        {str(v) for v in ext.get_values_for_type(x509.IPAddress)},
    )


def ekus_of(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---- the CA ---------------------------------------------------------------------------------
def test_init_creates_a_self_signed_ec_ca_with_a_private_key(pki: PKI) -> None:
    ca = load_certificate(pki.ca_cert_path)
    assert common_name(ca) == "directord CA"
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    key = load_private_key(pki.dir / "ca.key")
    assert isinstance(key.curve, ec.SECP256R1)
    assert public_der(key.public_key()) == public_der(ca.public_key())  # type: ignore[arg-type]
    assert mode(pki.dir / "ca.key") == 0o600
    # An empty CRL exists from the start, so servers can check it at once.
    assert load_crl_serials(pki.crl_path, ca) == set()


def test_init_refuses_to_overwrite_an_existing_ca(pki: PKI) -> None:
    before = {p: p.read_bytes() for p in (pki.ca_cert_path, pki.dir / "ca.key")}
    with pytest.raises(ConfigError, match="refusing to overwrite") as info:
        pki.init()
    assert str(pki.dir) in str(info.value)
    assert {p: p.read_bytes() for p in before} == before


def test_init_refuses_when_only_the_ca_key_is_left(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir()
    (directory / "ca.key").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        PKI(directory).init()
    assert (directory / "ca.key").read_bytes() == b"precious"


# ---- issuing --------------------------------------------------------------------------------
def test_issued_certificate_chains_to_the_ca_with_cn_and_sans(pki: PKI) -> None:
    cert_path, key_path = pki.issue(
        "server1", ["127.0.0.1", "::1", "server1.example.com"], usage="server", days=30
    )
    assert (cert_path, key_path) == (pki.cert_path("server1"), pki.key_path("server1"))
    ca = load_certificate(pki.ca_cert_path)
    cert = load_certificate(cert_path)
    cert.verify_directly_issued_by(ca)
    assert common_name(cert) == "server1"
    dns, ips = sans_of(cert)
    assert dns == {"server1", "server1.example.com"}
    assert ips == {"127.0.0.1", "::1"}
    ip_values = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ip_values  # a real IP SAN, not a DNS name
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    key = load_private_key(key_path)
    assert public_der(key.public_key()) == public_der(cert.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ("server", {ExtendedKeyUsageOID.SERVER_AUTH}),
        ("client", {ExtendedKeyUsageOID.CLIENT_AUTH}),
        ("operator", {ExtendedKeyUsageOID.CLIENT_AUTH, OPERATOR_USAGE}),
        ("both", {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
    ],
)
def test_extended_key_usage_follows_the_usage(
    pki: PKI, usage: str, expected: set[x509.ObjectIdentifier]
) -> None:
    cert_path, _ = pki.issue(f"n-{usage}", usage=usage)
    assert ekus_of(load_certificate(cert_path)) == expected
    assert {r.name: r.usage for r in pki.list()}[f"n-{usage}"] == usage


def test_issue_without_a_usage_makes_a_node_certificate(pki: PKI) -> None:
    cert = load_certificate(pki.issue("node0")[0])
    assert ekus_of(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert usage_of(cert) == "client"
    with pytest.raises(ConfigError, match="unknown usage 'admin'"):
        pki.issue("node1", usage="admin")
    assert not pki.cert_path("node1").exists()


def test_the_operator_mark_is_our_own_oid_beside_client_auth(pki: PKI) -> None:
    # Under the UUID arc (2.25.<128-bit integer>): nobody else's EKU can mean it.
    arc, number = OPERATOR_USAGE.dotted_string.rsplit(".", 1)
    assert arc == "2.25" and 2**64 < int(number) < 2**128
    # clientAuth stays, so TLS libraries accept the certificate as a client's;
    # only directord's check tells an operator from a node.
    operator = load_certificate(pki.issue("alice", usage="operator")[0])
    node = load_certificate(pki.issue("node0")[0])
    server = load_certificate(pki.issue("server1", usage="server")[0])
    both = load_certificate(pki.issue("legacy", usage="both")[0])
    assert ExtendedKeyUsageOID.CLIENT_AUTH in ekus_of(operator)
    assert ExtendedKeyUsageOID.SERVER_AUTH not in ekus_of(operator)
    assert [usage_of(c) for c in (operator, node, server, both)] == [
        "operator",
        "client",
        "server",
        "both",
    ]


def test_who_may_be_a_node_and_who_an_operator(pki: PKI) -> None:
    certs = {
        usage: load_certificate(pki.issue(f"n-{usage}", usage=usage)[0])
        for usage in ("client", "operator", "server", "both")
    }
    operator = certs["operator"]
    named = f"certificate 'n-operator' (serial {operator.serial_number:x})"
    assert node_refusal(operator) == f"{named} is an operator's, not a node's"
    assert "is for servers only" in node_refusal(certs["server"])
    assert node_refusal(certs["client"]) == node_refusal(certs["both"]) == ""
    assert operator_refusal(operator) == ""
    for usage in ("client", "server", "both"):
        reason = operator_refusal(certs[usage])
        assert f"certificate 'n-{usage}' (serial {certs[usage].serial_number:x})" in reason
        assert "is not an operator's" in reason and "--operator" in reason


def test_keys_are_written_owner_only(pki: PKI) -> None:
    _, key_path = pki.issue("node0")
    assert mode(key_path) == 0o600
    assert mode(pki.dir / "ca.key") == 0o600
    assert mode(key_path.parent) == 0o700
    assert not list(key_path.parent.glob("*.tmp"))


def test_issue_refuses_an_existing_name_and_bad_names(pki: PKI) -> None:
    cert_path, _ = pki.issue("node0")
    before = cert_path.read_bytes()
    with pytest.raises(ConfigError, match="rotate"):
        pki.issue("node0")
    assert cert_path.read_bytes() == before
    for bad in ("", "../etc/passwd", ".hidden", "has space", "a/b"):
        with pytest.raises(ConfigError, match="invalid certificate name"):
            pki.issue(bad)


def test_issue_without_a_ca_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CA here") as info:
        PKI(tmp_path / "nowhere").issue("node0")
    assert str(tmp_path / "nowhere") in str(info.value)


# ---- CSR on the node, sign on the CA ---------------------------------------------------------
def test_csr_and_sign_keep_the_key_on_the_node_and_the_names(tmp_path: Path) -> None:
    ca = PKI(tmp_path / "ca")
    ca.init()
    node = PKI(tmp_path / "node")
    csr_path = node.csr("node7", ["node7.example.com", "10.0.0.7"])
    assert csr_path == tmp_path / "node" / "csr" / "node7.csr"
    node_key = node.key_path("node7")
    assert mode(node_key) == 0o600
    assert b"PRIVATE KEY" not in csr_path.read_bytes()

    assert read_request(csr_path).sans == ("node7", "node7.example.com", "10.0.0.7")
    cert_path = ca.sign(csr_path, usage="client", keep_sans=True)
    assert cert_path == ca.cert_path("node7")
    assert not ca.key_path("node7").exists()  # the CA never saw the key
    assert [p.name for p in ca.dir.rglob("*.key")] == ["ca.key"]
    cert = load_certificate(cert_path)
    cert.verify_directly_issued_by(load_certificate(ca.ca_cert_path))
    assert common_name(cert) == "node7"
    assert sans_of(cert) == ({"node7", "node7.example.com"}, {"10.0.0.7"})
    assert ekus_of(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    key = load_private_key(node_key)
    assert public_der(key.public_key()) == public_der(cert.public_key())  # type: ignore[arg-type]


def test_sign_is_a_client_certificate_for_the_cn_alone_by_default(tmp_path: Path) -> None:
    ca = PKI(tmp_path / "ca")
    ca.init()
    node = PKI(tmp_path / "node")
    # A node asks for a server's names; by default it gets only its own.
    csr_path = node.csr("node7", ["directord.example.net", "192.0.2.10"])
    cert = load_certificate(ca.sign(csr_path))
    assert ekus_of(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert sans_of(cert) == ({"node7"}, set())
    cert = load_certificate(ca.sign(node.csr("node7", ["10.0.0.7"]), usage="operator"))
    assert usage_of(cert) == "operator" and sans_of(cert) == ({"node7"}, set())
    cert = load_certificate(
        ca.sign(node.csr("web", ["web.example.net"]), usage="server", keep_sans=True)
    )
    assert usage_of(cert) == "server"
    assert sans_of(cert) == ({"web", "web.example.net"}, set())


def test_sign_again_archives_the_previous_certificate(tmp_path: Path) -> None:
    ca = PKI(tmp_path / "ca")
    ca.init()
    node = PKI(tmp_path / "node")
    first = ca.sign(node.csr("node7")).read_bytes()
    first_key = node.key_path("node7").read_bytes()
    ca.sign(node.csr("node7"))
    archived = list((ca.dir / "old").glob("node7.*.crt"))
    assert [p.read_bytes() for p in archived] == [first]
    # On the node, the second csr kept the first key with a timestamp.
    assert [p.read_bytes() for p in (node.dir / "old").glob("node7.*.key")] == [first_key]


def test_renewal_by_csr_in_the_same_directory_keeps_every_key(pki: PKI) -> None:
    # A name first issued here, later renewed with csr + sign in the same directory.
    cert_path, key_path = pki.issue("node7")
    first_cert, first_key = cert_path.read_bytes(), key_path.read_bytes()
    pki.sign(pki.csr("node7"))
    # The csr archived the old key instead of overwriting it; sign archived the old
    # certificate and kept the new key, which matches the new certificate.
    assert [p.read_bytes() for p in (pki.dir / "old").glob("node7.*.key")] == [first_key]
    assert [p.read_bytes() for p in (pki.dir / "old").glob("node7.*.crt")] == [first_cert]
    key = load_private_key(key_path)
    cert = load_certificate(cert_path)
    assert public_der(key.public_key()) == public_der(cert.public_key())  # type: ignore[arg-type]
    assert key_path.read_bytes() != first_key and mode(key_path) == 0o600


def test_sign_refuses_bad_requests_naming_the_file(pki: PKI, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.csr"
    garbage.write_text("not a request\n")
    with pytest.raises(CertificateError, match="not a PEM certificate request") as info:
        pki.sign(garbage)
    assert str(garbage) in str(info.value)
    missing = tmp_path / "missing.csr"
    with pytest.raises(CertificateError, match="cannot read") as info:
        pki.sign(missing)
    assert str(missing) in str(info.value)


# ---- rotation ------------------------------------------------------------------------------
def test_rotate_archives_with_a_timestamp_and_never_overwrites(pki: PKI) -> None:
    cert_path, key_path = pki.issue("server1", ["127.0.0.1", "server1.example.com"], usage="server")
    generations = [(cert_path.read_bytes(), key_path.read_bytes())]
    for _ in range(2):
        new_cert, new_key = pki.rotate("server1")
        assert (new_cert, new_key) == (cert_path, key_path)
        generations.append((cert_path.read_bytes(), key_path.read_bytes()))
    # Every generation has its own key and certificate.
    assert len({c for c, _ in generations}) == 3 and len({k for _, k in generations}) == 3
    old = pki.dir / "old"
    crts = sorted(old.glob("server1.*.crt"))
    keys = sorted(old.glob("server1.*.key"))
    assert len(crts) == 2 and len(keys) == 2
    # Same timestamp for a certificate and its key; the two rotations differ.
    stamps = [p.name.split(".")[1] for p in crts]
    assert stamps == [p.name.split(".")[1] for p in keys] and len(set(stamps)) == 2
    assert all(s[:8].isdigit() and "T" in s for s in stamps)
    assert [p.read_bytes() for p in crts] == [c for c, _ in generations[:2]]
    assert [p.read_bytes() for p in keys] == [k for _, k in generations[:2]]
    assert all(mode(p) == 0o600 for p in keys)
    # The new certificate keeps the names and the usage.
    cert = load_certificate(cert_path)
    assert sans_of(cert) == ({"server1", "server1.example.com"}, {"127.0.0.1"})
    assert ekus_of(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    cert.verify_directly_issued_by(load_certificate(pki.ca_cert_path))


def test_rotate_keeps_an_operator_an_operator(pki: PKI) -> None:
    pki.issue("alice", usage="operator")
    assert usage_of(load_certificate(pki.rotate("alice")[0])) == "operator"
    assert usage_of(load_certificate(pki.rotate("alice", usage="client")[0])) == "client"


def test_rotate_an_unknown_name_names_the_file(pki: PKI) -> None:
    with pytest.raises(CertificateError) as info:
        pki.rotate("ghost")
    assert str(pki.cert_path("ghost")) in str(info.value)
    assert not (pki.dir / "old").exists()


# ---- list and revoke -------------------------------------------------------------------------
def test_list_shows_names_expiry_and_revocation(pki: PKI) -> None:
    pki.issue("node0", ["10.0.0.1"], usage="client", days=10)
    pki.issue("server1", ["server1.example.com"], usage="server")
    serial = pki.revoke("node0")
    rows = {r.name: r for r in pki.list()}
    assert set(rows) == {"node0", "server1"}
    node0 = load_certificate(pki.cert_path("node0"))
    assert rows["node0"].serial == serial == node0.serial_number
    assert rows["node0"].not_after == node0.not_valid_after_utc
    assert rows["node0"].sans == ("node0", "10.0.0.1")
    assert rows["node0"].revoked is True and rows["server1"].revoked is False
    data = rows["node0"].to_dict()
    assert data["serial"] == f"{serial:x}" and data["revoked"] is True
    assert dt.datetime.fromisoformat(data["not_after"]) == node0.not_valid_after_utc
    json.dumps([r.to_dict() for r in rows.values()])


def test_revoke_writes_a_crl_signed_by_the_ca(pki: PKI) -> None:
    pki.issue("node0")
    pki.issue("node1")
    first = pki.revoke("node0")
    ca = load_certificate(pki.ca_cert_path)
    assert load_crl_serials(pki.crl_path, ca) == {first}
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    second = pki.revoke("node1")
    assert load_crl_serials(pki.crl_path, ca) == {first, second}


def test_a_crl_from_another_ca_is_refused(pki: PKI, tmp_path: Path) -> None:
    other = PKI(tmp_path / "other")
    other.init()
    with pytest.raises(CertificateError, match="not signed by the CA") as info:
        load_crl_serials(other.crl_path, load_certificate(pki.ca_cert_path))
    assert str(other.crl_path) in str(info.value)


def test_revocations_follow_the_crl_file(pki: PKI) -> None:
    pki.issue("node0")
    revocations = Revocations(str(pki.ca_cert_path))
    assert revocations.path == str(pki.crl_path)
    assert revocations.serials() == set()
    serial = pki.revoke("node0")
    assert revocations.serials() == {serial}  # re-read because the file changed


def test_a_damaged_crl_keeps_failing_until_the_file_changes(pki: PKI) -> None:
    pki.issue("node0")
    revocations = Revocations(str(pki.ca_cert_path))
    assert revocations.serials() == set()
    good = pki.crl_path.read_bytes()
    version = revocations.version
    pki.crl_path.write_bytes(good[:40])
    for _ in range(2):  # not re-read while unchanged, and refusing everyone
        with pytest.raises(CertificateError, match="not a PEM CRL"):
            revocations.serials()
    assert revocations.version == version + 1
    serial = pki.revoke("node0")
    assert revocations.serials() == {serial} and revocations.version == version + 2


def test_the_watch_hands_over_the_serials_once_per_change(pki: PKI) -> None:
    pki.issue("node0")
    pki.issue("node1")
    revocations = Revocations(str(pki.ca_cert_path))
    revocations.serials()
    seen: list[set[int]] = []

    async def scenario() -> None:
        watch = RevocationWatch(revocations, seen.append, "test", interval=0.0)
        watch.start()
        try:
            for _ in range(20):  # unchanged: nothing to hand over
                await asyncio.sleep(0)
            assert seen == []
            first = pki.revoke("node0")
            # A connection's own check may re-read the file first; the watch still acts.
            assert revocations.serials() == {first}
            async with asyncio.timeout(10):
                while not seen:
                    await asyncio.sleep(0)
            pki.crl_path.write_text("damaged\n")  # logged, cuts no one
            second = pki.revoke("node1")
            async with asyncio.timeout(10):
                while len(seen) < 2:
                    await asyncio.sleep(0)
            assert seen == [{first}, {first, second}]
        finally:
            await watch.close()
            await watch.close()

    asyncio.run(scenario())


def test_revocations_without_a_crl(tmp_path: Path, pki: PKI) -> None:
    ca_copy = tmp_path / "elsewhere" / "ca.crt"
    ca_copy.parent.mkdir()
    ca_copy.write_bytes(pki.ca_cert_path.read_bytes())
    assert Revocations(str(ca_copy)).serials() == set()  # none beside the CA: nothing revoked
    explicit = Revocations(str(ca_copy), str(tmp_path / "missing-crl.pem"))
    with pytest.raises(CertificateError, match=r"missing-crl\.pem"):
        explicit.serials()


# ---- bad files: one clear error naming the file ----------------------------------------------
def test_bad_key_and_certificate_files_name_the_file(tmp_path: Path) -> None:
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello\n")
    a_dir = tmp_path / "a-directory.key"
    a_dir.mkdir()
    missing = tmp_path / "missing.key"
    for path in (not_pem, a_dir, missing):
        with pytest.raises(CertificateError) as info:
            load_private_key(path)
        assert str(path) in str(info.value)
        with pytest.raises(CertificateError) as info:
            load_certificate(path)
        assert str(path) in str(info.value)
    rsa_like = tmp_path / "ed.key"
    from cryptography.hazmat.primitives.asymmetric import ed25519

    rsa_like.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CertificateError, match="expected an EC key"):
        load_private_key(rsa_like)


def test_a_damaged_ca_key_names_the_file(pki: PKI) -> None:
    (pki.dir / "ca.key").write_text("damaged\n")
    with pytest.raises(CertificateError) as info:
        pki.issue("node0")
    assert str(pki.dir / "ca.key") in str(info.value)
    assert not pki.cert_path("node0").exists()


def test_read_pem_names_the_file_and_its_role(tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("hello\n")
    with pytest.raises(CertificateError, match="gRPC CA certificate is not PEM") as info:
        read_pem(str(junk), "gRPC CA certificate")
    assert str(junk) in str(info.value)
    with pytest.raises(CertificateError, match="cannot read gRPC server key"):
        read_pem(str(tmp_path / "absent.key"), "gRPC server key")


def test_tls_contexts_load_pki_files_and_name_bad_ones(pki: PKI, tmp_path: Path) -> None:
    server_cert, server_key = pki.issue("server1", ["127.0.0.1"], usage="server")
    user_cert, user_key = pki.issue("operator", usage="client")
    server = server_tls_context(str(pki.ca_cert_path), str(server_cert), str(server_key))
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF  # crl.pem sits beside ca.crt
    client = client_tls_context(str(pki.ca_cert_path), str(user_cert), str(user_key))
    assert client.check_hostname is True and client.verify_mode == ssl.CERT_REQUIRED

    with pytest.raises(CertificateError, match="needs a private key"):
        client_tls_context(str(pki.ca_cert_path), str(user_cert), "")
    with pytest.raises(CertificateError) as info:
        server_tls_context(str(pki.ca_cert_path), str(server_cert), str(tmp_path / "nokey"))
    assert str(tmp_path / "nokey") in str(info.value)
    # A certificate with somebody else's key.
    with pytest.raises(CertificateError, match="do not load") as info:
        client_tls_context(str(pki.ca_cert_path), str(user_cert), str(server_key))
    assert str(user_cert) in str(info.value)


def test_key_pair_check_names_both_files(pki: PKI) -> None:
    cert, key = pki.issue("server1", usage="server")
    _, other_key = pki.issue("node0", usage="client")
    check_key_pair(str(cert), str(key))
    for c, k in ((cert, other_key), (cert, cert)):
        with pytest.raises(CertificateError, match="do not load or do not match") as info:
            check_key_pair(str(c), str(k))
        assert f"{c} / {k}" in str(info.value)


def test_an_expired_certificate_is_still_listed_with_its_date(pki: PKI) -> None:
    # Built by hand: the PKI itself never issues one, but an old one may sit in certs/.
    ca_key = load_private_key(pki.dir / "ca.key")
    ca = load_certificate(pki.ca_cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past - dt.timedelta(days=10))
        .not_valid_after(past)
        .sign(ca_key, hashes.SHA256())
    )
    pki.cert_path("old").parent.mkdir(parents=True, exist_ok=True)
    pki.cert_path("old").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    row = {r.name: r for r in pki.list()}["old"]
    assert row.not_after < dt.datetime.now(dt.UTC)
    assert row.sans == () and row.usage == "both"


# ---- the CLI -------------------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    for name in [k for k in os.environ if k.startswith("DIRECTORD_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    pki_dir = tmp_path / "cli-pki"

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--config-file", str(config), "pki", "--pki-dir", str(pki_dir), *args])
        out, err = capsys.readouterr()
        return code, out, err

    run.pki_dir = pki_dir  # type: ignore[attr-defined]
    return run


def test_cli_init_then_refuses_to_overwrite_with_exit_2(cli) -> None:
    code, out, err = cli("init")
    assert code == 0 and err == ""
    assert out.strip() == f"CA certificate: {cli.pki_dir / 'ca.crt'}"
    ca_before = (cli.pki_dir / "ca.key").read_bytes()
    code, out, err = cli("init")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "refusing to overwrite" in err
    assert str(cli.pki_dir) in err
    assert (cli.pki_dir / "ca.key").read_bytes() == ca_before


def test_cli_issue_list_rotate_revoke(cli) -> None:
    assert cli("init")[0] == 0
    code, out, _ = cli(
        "issue", "server1", "--san", "127.0.0.1", "--san", "localhost", "--server", "--days", "20"
    )
    assert code == 0
    assert f"certificate: {cli.pki_dir / 'certs' / 'server1.crt'}" in out
    assert f"key:         {cli.pki_dir / 'private' / 'server1.key'}" in out
    assert cli("issue", "node0", "--client")[0] == 0
    assert cli("issue", "node1")[0] == 0
    assert cli("issue", "alice", "--operator")[0] == 0
    code, out, _ = cli("list", "--format", "json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["server1"]["sans"] == ["server1", "localhost", "127.0.0.1"]
    assert rows["server1"]["usage"] == "server" and rows["node0"]["usage"] == "client"
    assert rows["node1"]["usage"] == "client" and rows["alice"]["usage"] == "operator"
    with pytest.raises(SystemExit) as exit_info:
        cli("issue", "bob", "--operator", "--server")
    assert exit_info.value.code == 2
    assert not rows["node0"]["revoked"]

    code, out, _ = cli("rotate", "node0")
    assert code == 0 and "old files moved to" in out
    assert len(list((cli.pki_dir / "old").glob("node0.*.key"))) == 1
    code, out, _ = cli("revoke", "node0")
    assert code == 0 and out.startswith("revoked node0 (serial ")
    code, out, _ = cli("list")
    table = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == ["NAME", "USAGE", "EXPIRES", "STATUS", "NAMES", "SERIAL"]
    assert " revoked " in table["node0"] and " valid " in table["server1"]


def test_cli_csr_and_sign(cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("init")[0] == 0
    config = tmp_path / "config.yaml"
    node_dir = tmp_path / "node-pki"
    code = main(
        [
            "--config-file",
            str(config),
            "pki",
            "--pki-dir",
            str(node_dir),
            "csr",
            "node9",
            "--san",
            "10.1.2.3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and f"request: {node_dir / 'csr' / 'node9.csr'}" in out
    csr = node_dir / "csr" / "node9.csr"
    # Without flags: a node's certificate for the CN alone; the output says what the
    # request asked for and what was left out.
    code, out, _ = cli("sign", str(csr))
    assert code == 0
    assert out.splitlines() == [
        f"request:     node9 ({csr})",
        "asks for:    node9, 10.1.2.3",
        "names:       node9  (left out: 10.1.2.3; --keep-sans signs them)",
        "usage:       client",
        f"certificate: {cli.pki_dir / 'certs' / 'node9.crt'}",
    ]
    cert = load_certificate(cli.pki_dir / "certs" / "node9.crt")
    assert sans_of(cert) == ({"node9"}, set())
    assert ekus_of(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    code, out, _ = cli("sign", str(csr), "--keep-sans")
    assert code == 0 and "names:       node9, 10.1.2.3\n" in out
    cert = load_certificate(cli.pki_dir / "certs" / "node9.crt")
    assert sans_of(cert) == ({"node9"}, {"10.1.2.3"})
    code, out, _ = cli("sign", str(csr), "--operator")
    assert code == 0 and "usage:       operator\n" in out
    assert usage_of(load_certificate(cli.pki_dir / "certs" / "node9.crt")) == "operator"


def test_cli_bad_input_is_one_line_naming_the_file(cli, tmp_path: Path) -> None:
    # No CA yet: a usage error naming the directory.
    code, out, err = cli("issue", "node0")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert str(cli.pki_dir) in err and "pki init" in err
    assert cli("init")[0] == 0
    junk = tmp_path / "junk.csr"
    junk.write_text("junk\n")
    for path in (junk, tmp_path / "missing.csr"):
        code, out, err = cli("sign", str(path))
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"directord: {path}: ")
        assert "Traceback" not in err
    (cli.pki_dir / "ca.key").write_text("damaged\n")
    code, out, err = cli("issue", "node0")
    assert code == 1 and err.count("\n") == 1
    assert f"{cli.pki_dir / 'ca.key'}: not an unencrypted PEM private key" in err
    code, _, err = cli("issue", "bad name")
    assert code == 2 and "invalid certificate name" in err


def test_cli_sign_with_name_refuses_a_request_for_another_name(
    cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bootstrap signs a host's request only for that host's name: node1 cannot get node2's."""
    assert cli("init")[0] == 0
    node_dir = tmp_path / "node-pki"
    config = tmp_path / "config.yaml"
    assert (
        main(["--config-file", str(config), "pki", "--pki-dir", str(node_dir), "csr", "node2"]) == 0
    )
    csr = node_dir / "csr" / "node2.csr"
    capsys.readouterr()
    code, out, err = cli("sign", "--name", "node1", str(csr))
    assert code == 1 and out == ""
    assert err.strip() == (f"directord: {csr}: the request is for 'node2', not 'node1'; not signed")
    assert not (cli.pki_dir / "certs" / "node2.crt").exists()
    code, out, _ = cli("sign", "--name", "node2", str(csr))
    assert code == 0 and (cli.pki_dir / "certs" / "node2.crt").exists()
