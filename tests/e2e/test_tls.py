"""TLS and mTLS on real processes with real certificates from `directord pki`.

One mTLS cluster (server + node0, node1; allow-list; API over TCP) is shared by
the module. Every refusal test starts a bad peer beside it, checks the log
lines, and then runs a job to show the server kept serving the good nodes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from directord.config import Settings
from directord.connect import APIClient, DirectordConnect
from directord.protocol import PROTOCOL_VERSION, decode_batch, encode_batch, to_builtins
from directord.security.pki import load_certificate, load_private_key
from directord.transports.grpc import GrpcOptions, GrpcTransport
from tests.conftest import Cluster
from tests.e2e.helpers import nodes, raw_cli, read_lines, uid, wait_for, wait_job

ALLOWED = ["node0", "node1", "spare", "mole", "revoked1", "expired", "stranger-ca"]


class Pki:
    """A PKI directory driven through `directord pki`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = raw_cli("--config-file", "/dev/null", "pki", "--pki-dir", str(self.dir), *args)
        assert proc.returncode == 0, proc.stderr
        return proc

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.crt")

    def cert(self, name: str) -> str:
        return str(self.dir / "certs" / f"{name}.crt")

    def key(self, name: str) -> str:
        return str(self.dir / "private" / f"{name}.key")

    def server_flags(self, name: str = "server") -> list[str]:
        """Server options for gRPC with mTLS, NAME's certificate presented."""
        return [
            "--grpc-ssl",
            "--grpc-ssl-client-auth",
            "--grpc-ssl-ca",
            self.ca,
            "--grpc-ssl-cert",
            self.cert(name),
            "--grpc-ssl-key",
            self.key(name),
        ]

    def api_flags(self, name: str = "server") -> list[str]:
        """Server options for the API over TCP on 127.0.0.1, on a free port."""
        return [
            "--api-bind",
            "127.0.0.1",
            "--api-port",
            "0",
            "--ca",
            self.ca,
            "--cert",
            self.cert(name),
            "--key",
            self.key(name),
        ]

    def client_flags(self, name: str, ca: str | None = None) -> list[str]:
        """Client options for mTLS with NAME's certificate."""
        return [
            "--grpc-ssl",
            "--grpc-ssl-client-auth",
            "--grpc-ssl-ca",
            ca or self.ca,
            "--grpc-ssl-cert",
            self.cert(name),
            "--grpc-ssl-key",
            self.key(name),
        ]


def issue_expired(pki: Pki, name: str) -> None:
    """A client certificate signed by the real CA key whose validity ended yesterday."""
    ca_key = load_private_key(pki.dir / "ca.key")
    ca = load_certificate(pki.ca)
    key = ec.generate_private_key(ec.SECP256R1())
    end = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(end - dt.timedelta(days=30))
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    Path(pki.cert(name)).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(pki.key(name)).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    Path(pki.key(name)).chmod(0o600)


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Pki]:
    """The cluster's PKI, and another CA nobody trusts."""
    root = tmp_path_factory.mktemp("pki")
    good, other = Pki(root / "pki"), Pki(root / "other")
    good.run("init")
    good.run("issue", "server", "--server", "--san", "127.0.0.1", "--san", "localhost")
    good.run("issue", "elsewhere", "--server", "--san", "10.9.9.9")
    for name in ("node0", "node1", "spare", "mole", "revoked1", "stranger"):
        good.run("issue", name, "--client")
    for name in ("operator", "operator-revoked"):
        good.run("issue", name, "--operator")
    issue_expired(good, "expired")
    other.run("init", "--ca-name", "impostor CA")
    other.run("issue", "stranger-ca", "--client")
    other.run("issue", "operator-other", "--operator")
    return good, other


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, pkis: tuple[Pki, Pki]) -> Iterator[Cluster]:
    pki, _ = pkis
    c = Cluster(
        tmp_path_factory.mktemp("mtls"),
        nodes=2,
        heartbeat=2.0,
        server_args=[
            *pki.server_flags(),
            *pki.api_flags(),
            "--allowed-node-names",
            ",".join(ALLOWED),
        ],
        client_args=pki.client_flags("{identity}"),
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()


# ---- helpers --------------------------------------------------------------------------------
def log_lines(cluster: Cluster, name: str) -> list[str]:
    return read_lines(cluster.log(name))


def wait_log(cluster: Cluster, name: str, *texts: str, after: int = 0) -> str:
    """Wait for a line containing every one of ``texts`` in a process log (past ``after``)."""
    return wait_for(
        lambda: next(
            (
                line
                for line in log_lines(cluster, name)[after:]
                if all(text in line for text in texts)
            ),
            None,
        ),
        f"{texts!r} in the {name} log",
    )


def start_peer(cluster: Cluster, name: str, identity: str, tls: list[str]) -> None:
    """Start one more client process beside the cluster (stopped with it)."""
    ready = cluster.root / f"{name}.ready"
    ready.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "directord",
        "--config-file",
        str(cluster.config),
        "--heartbeat-interval",
        "2",
        "--identity",
        identity,
        "--machine-id",
        f"m-{name}",
        "--cache-path",
        str(cluster.root / "cache" / name),
        "--grpc-server-address",
        "127.0.0.1",
        "--grpc-port",
        str(cluster.port),
        "--ready-file",
        str(ready),
        *tls,
        "client",
    ]
    with open(cluster.log(name), "ab") as log:
        cluster.clients[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True
        )


def assert_refused(cluster: Cluster, name: str, identity: str) -> None:
    """The peer never registered, and the good nodes still run jobs."""
    proc = cluster.clients[name]
    assert proc.poll() is None, f"{name} should keep retrying, not exit"
    assert not (cluster.root / f"{name}.ready").exists()
    assert not any("registered with" in line for line in log_lines(cluster, name))
    cluster.stop_process(name)
    listed = nodes(cluster)
    assert identity not in listed or identity in ("node0", "node1")
    assert listed["node0"]["status"] == listed["node1"]["status"] == "online"
    token = uid()
    reply = cluster.json("exec", "--verb", "RUN", f"echo {token}", "--wait")
    assert sorted((r["node"], r["state"], r["stdout"].strip()) for r in reply["results"]) == [
        ("node0", "success", token),
        ("node1", "success", token),
    ]


# ---- TLS without client certificates -------------------------------------------------------
def test_job_over_tls_and_the_client_checks_the_server_name(
    make_cluster: Any, pkis: tuple[Pki, Pki]
) -> None:
    pki, _ = pkis
    # First the server presents a certificate from the right CA for another name: the
    # client, which dials 127.0.0.1, refuses it.
    wrong = [
        "--grpc-ssl",
        "--grpc-ssl-cert",
        pki.cert("elsewhere"),
        "--grpc-ssl-key",
        pki.key("elsewhere"),
    ]
    c: Cluster = make_cluster(
        nodes=1,
        start=False,
        heartbeat=1.0,
        server_args=wrong,
        client_args=["--grpc-ssl", "--grpc-ssl-ca", pki.ca],
    )
    c.start_server()
    c.start_client("node0", wait=False)
    wait_log(
        c,
        "node0",
        "server unavailable (cannot reach server at 127.0.0.1:",
        "Hostname Verification Check failed",
    )
    assert not (c.root / "node0.ready").exists()
    # The same port with the right certificate (SAN 127.0.0.1): the client gets in.
    c.stop_process("server")
    c.server_args[:] = [
        "--grpc-ssl",
        "--grpc-ssl-cert",
        pki.cert("server"),
        "--grpc-ssl-key",
        pki.key("server"),
    ]
    c.start_server()
    c.wait_registered("node0", 1)
    token = uid()
    reply = c.json("exec", "--verb", "RUN", f"echo {token}", "--wait")
    assert [(r["node"], r["state"], r["stdout"].strip()) for r in reply["results"]] == [
        ("node0", "success", token)
    ]
    # A plaintext client cannot talk to the TLS listener.
    start_peer(c, "plain", "plain", [])
    wait_log(c, "plain", "server unavailable (cannot reach server at 127.0.0.1:")
    assert "plain" not in nodes(c)
    c.stop_process("plain")


def test_bad_tls_files_are_one_clear_error_naming_the_file(
    tmp_path: Path, pkis: tuple[Pki, Pki]
) -> None:
    pki, _ = pkis
    base = [
        "--config-file",
        "/dev/null",
        "--datastore",
        "memory",
        "--socket-path",
        str(tmp_path / "api.sock"),
        "--grpc-bind-address",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--grpc-ssl",
    ]
    missing = str(tmp_path / "missing.key")
    cases = [
        (
            [*base, "--grpc-ssl-cert", pki.cert("server"), "--grpc-ssl-key", missing, "server"],
            f"{missing}: cannot read gRPC server key",
        ),
        # A key that is not this certificate's (gRPC alone would only fail to bind).
        (
            [
                *base,
                "--grpc-ssl-cert",
                pki.cert("server"),
                "--grpc-ssl-key",
                pki.key("node0"),
                "server",
            ],
            f"{pki.cert('server')} / {pki.key('node0')}: certificate and key do not",
        ),
        (
            [
                "--config-file",
                "/dev/null",
                "--identity",
                "node0",
                "--cache-path",
                str(tmp_path / "cache"),
                "--grpc-ssl",
                "--grpc-ssl-ca",
                str(tmp_path / "no-ca.crt"),
                "client",
            ],
            f"{tmp_path / 'no-ca.crt'}: cannot read gRPC CA certificate",
        ),
        (
            [
                "--config-file",
                "/dev/null",
                "--identity",
                "node0",
                "--cache-path",
                str(tmp_path / "cache"),
                *pki.client_flags("node0")[:-1],
                missing,
                "client",
            ],
            f"{missing}: cannot read gRPC client key",
        ),
        (
            [
                "--config-file",
                "/dev/null",
                "--identity",
                "node0",
                "--cache-path",
                str(tmp_path / "cache"),
                *pki.client_flags("node0")[:-1],
                pki.key("node1"),
                "client",
            ],
            f"{pki.cert('node0')} / {pki.key('node1')}: certificate and key do not",
        ),
        (
            [
                *base,
                "--api-bind",
                "127.0.0.1",
                "--api-port",
                "0",
                "--ca",
                pki.ca,
                "--cert",
                pki.cert("server"),
                "--key",
                pki.cert("server"),
                "--grpc-ssl-cert",
                pki.cert("server"),
                "--grpc-ssl-key",
                pki.key("server"),
                "server",
            ],
            "certificate and key do not load",
        ),
    ]
    for argv, expected in cases:
        proc = raw_cli(*argv)
        assert proc.returncode == 1, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("directord: ")]
        assert len(errors) == 1 and expected in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


# ---- mTLS ----------------------------------------------------------------------------------
def test_job_over_mtls(mtls: Cluster) -> None:
    token = uid()
    reply = mtls.json("exec", "--verb", "RUN", f"echo {token}", "--wait")
    assert sorted((r["node"], r["state"], r["stdout"].strip()) for r in reply["results"]) == [
        ("node0", "success", token),
        ("node1", "success", token),
    ]
    server_log = "\n".join(log_lines(mtls, "server"))
    assert "node node0 joined" in server_log and "node node1 joined" in server_log


def test_client_without_a_certificate_is_refused(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, _ = pkis
    mark = len(log_lines(mtls, "server"))
    start_peer(mtls, "nocert", "spare", ["--grpc-ssl", "--grpc-ssl-ca", pki.ca])
    wait_log(mtls, "server", "Handshake failed", "PEER_DID_NOT_RETURN_A_CERTIFICATE", after=mark)
    wait_log(mtls, "nocert", "server unavailable (cannot reach server at 127.0.0.1:")
    assert not (mtls.root / "nocert.ready").exists()
    assert_refused(mtls, "nocert", "spare")


def test_certificate_from_another_ca_is_refused(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, other = pkis
    mark = len(log_lines(mtls, "server"))
    # It trusts the right CA (so it would accept the server), but its own certificate
    # comes from the impostor CA.
    start_peer(mtls, "otherca", "stranger-ca", other.client_flags("stranger-ca", ca=pki.ca))
    wait_log(
        mtls,
        "server",
        "Handshake failed",
        "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
        after=mark,
    )
    wait_log(mtls, "otherca", "server unavailable")
    assert_refused(mtls, "otherca", "stranger-ca")


def test_expired_certificate_is_refused(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, _ = pkis
    mark = len(log_lines(mtls, "server"))
    start_peer(mtls, "expired", "expired", pki.client_flags("expired"))
    wait_log(
        mtls,
        "server",
        "Handshake failed",
        "CERTIFICATE_VERIFY_FAILED: certificate has expired",
        after=mark,
    )
    wait_log(mtls, "expired", "server unavailable")
    assert_refused(mtls, "expired", "expired")


def test_revoked_certificate_is_refused_at_connection(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, _ = pkis
    # Revoked while the server runs: it reads the new CRL at the next connection.
    out = pki.run("revoke", "revoked1").stdout
    serial = out.split("serial ")[1].split(")")[0]
    start_peer(mtls, "revoked1", "revoked1", pki.client_flags("revoked1"))
    wait_log(
        mtls, "server", "grpc: refused", f"certificate 'revoked1' (serial {serial}) is revoked"
    )
    # The client is told why (the call's status), not just that the stream ended.
    wait_log(
        mtls,
        "revoked1",
        "server unavailable",
        f"UNAUTHENTICATED: certificate 'revoked1' (serial {serial}) is revoked",
    )
    assert_refused(mtls, "revoked1", "revoked1")
    assert "revoked1" not in nodes(mtls)


def test_certificate_name_must_match_the_identity(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, _ = pkis
    start_peer(mtls, "liar", "impostor", pki.client_flags("spare"))
    expected = "identity 'impostor' does not match the credential's 'spare'"
    wait_log(mtls, "server", "refused node from", expected)
    wait_log(mtls, "liar", f"server refused this client: {expected}")
    assert_refused(mtls, "liar", "impostor")
    # Claiming a connected node's name with one's own certificate fails the same way.
    start_peer(mtls, "liar2", "node0", pki.client_flags("spare"))
    wait_log(mtls, "liar2", "identity 'node0' does not match the credential's 'spare'")
    assert_refused(mtls, "liar2", "node0")


def test_second_connection_cannot_steal_a_connected_identity(
    mtls: Cluster, pkis: tuple[Pki, Pki]
) -> None:
    pki, _ = pkis
    before = json.loads((mtls.root / "node0.ready").read_text())["registered"]
    lost = sum("node node0 lost" in line for line in log_lines(mtls, "server"))
    # node0's own (stolen) key and certificate, so the name matches the credential.
    start_peer(mtls, "thief", "node0", pki.client_flags("node0"))
    wait_log(mtls, "server", "identity 'node0' is already connected")
    wait_log(mtls, "thief", "server refused this client: identity 'node0' is already connected")
    assert_refused(mtls, "thief", "node0")
    # The real node0 never lost its session.
    assert json.loads((mtls.root / "node0.ready").read_text())["registered"] == before
    assert sum("node node0 lost" in line for line in log_lines(mtls, "server")) == lost


def test_client_given_the_wrong_ca_does_not_trust_the_server(
    mtls: Cluster, pkis: tuple[Pki, Pki]
) -> None:
    pki, other = pkis
    # A valid client certificate, but the CA it checks the server against is the
    # impostor's: to this client the real server is an impersonator.
    start_peer(mtls, "wrongca", "spare", pki.client_flags("spare", ca=other.ca))
    wait_log(
        mtls,
        "wrongca",
        "server unavailable (cannot reach server at 127.0.0.1:",
        "CERTIFICATE_VERIFY_FAILED",
        "retrying",
    )
    assert_refused(mtls, "wrongca", "spare")
    assert "spare" not in nodes(mtls)


def test_identity_outside_the_allow_list_is_refused(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, _ = pkis
    start_peer(mtls, "stranger", "stranger", pki.client_flags("stranger"))
    wait_log(mtls, "server", "identity 'stranger' is not in allowed_node_names")
    wait_log(
        mtls,
        "stranger",
        "server refused this client: identity 'stranger' is not in allowed_node_names",
    )
    assert_refused(mtls, "stranger", "stranger")
    assert "stranger" not in nodes(mtls)


def test_result_for_another_nodes_job_is_ignored(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, _ = pkis
    token = uid()
    flag = mtls.root / f"{token}.go"
    # A job for node0 that waits for the test, so the forgery surely arrives mid-job.
    command = (
        f"--skip-cache echo started-{token}; "
        f"while [ ! -e {flag} ]; do sleep 0.1; done; echo {token}"
    )
    options = GrpcOptions(
        grpc_server_address="127.0.0.1",
        grpc_port=mtls.port,
        grpc_ssl=True,
        grpc_ssl_client_auth=True,
        grpc_ssl_ca=pki.ca,
        grpc_ssl_cert=pki.cert("mole"),
        grpc_ssl_key=pki.key("mole"),
    )
    events: list[dict[str, Any]] = []

    async def watch(job_id: str) -> None:
        async with APIClient(mtls.socket_path) as client:
            async for event in client.watch(jobs=[job_id], output=True):
                events.append(to_builtins(event))

    async def forge() -> str:
        async with APIClient(mtls.socket_path) as client:
            reply = await client.call(
                "submit",
                {
                    "orchestrations": [
                        {
                            "name": "exec RUN",
                            "targets": [],
                            "async": False,
                            "source": "<exec>",
                            "jobs": [
                                {
                                    "verb": "RUN",
                                    "args": command,
                                    "vars": {},
                                    "name": "",
                                    "assign": [],
                                    "line": None,
                                }
                            ],
                        }
                    ],
                    "targets": ["node0"],
                    "stream": True,
                    "cwd": str(mtls.root),
                },
            )
        job_id: str = reply["parents"][0]["jobs"][0]
        watcher = asyncio.create_task(watch(job_id))
        async with asyncio.timeout(30):
            while not any(e.get("ev") == "out" and f"started-{token}" in e["data"] for e in events):
                await asyncio.sleep(0.05)
        transport = GrpcTransport(Settings(), options)
        transport.connect_timeout = 30.0  # a loaded machine may be slow to shake hands
        conn = await transport.connect()
        try:
            await conn.send(
                encode_batch(
                    [
                        {
                            "t": "hello",
                            "proto": PROTOCOL_VERSION,
                            "identity": "mole",
                            "machine_id": "m-mole",
                            "version": "0",
                            "driver": "grpc",
                            "heartbeat_interval": 60.0,
                            "host_boot": 0.0,
                            "agent_start": time.time(),
                            "known": [],
                        }
                    ]
                )
            )
            async with asyncio.timeout(30):
                while not any(e["t"] == "welcome" for e in decode_batch(await conn.recv())):
                    pass
            # Name fields inside the messages are ignored: the session is bound to "mole".
            await conn.send(
                encode_batch(
                    [
                        {"t": "out", "id": job_id, "node": "node0", "s": "stdout", "d": "forged\n"},
                        {
                            "t": "result",
                            "id": job_id,
                            "node": "node0",
                            "identity": "node0",
                            "state": "failed",
                            "rc": 99,
                            "stdout": "forged",
                            "stderr": "forged",
                            "exec_time": 0.1,
                        },
                    ]
                )
            )
            await asyncio.to_thread(
                wait_log,
                mtls,
                "server",
                f"node mole reported on job {job_id}, which does not target it; ignored",
            )
            assert not watcher.done()
        finally:
            await conn.close()
            await transport.close()
        flag.touch()
        async with asyncio.timeout(30):
            await watcher
        return job_id

    job_id = asyncio.run(forge())
    assert [e["node"] for e in events if e["ev"] == "result"] == ["node0"]
    assert {e["node"] for e in events if e["ev"] == "out"} == {"node0"}
    assert "forged" not in json.dumps(events)
    assert any(
        f"node mole sent output for job {job_id}, which does not target it" in line
        for line in log_lines(mtls, "server")
    )
    info = wait_job(mtls, job_id)
    assert set(info["results"]) == {"node0"}
    result = info["results"]["node0"]
    assert (result["state"], result["rc"]) == ("success", 0)
    assert result["stdout"].split() == [f"started-{token}", token]
    assert "forged" not in json.dumps(info)
    assert nodes(mtls)["node0"]["status"] == "online"


# ---- the user API over TCP + TLS -----------------------------------------------------------
def api_url(cluster: Cluster) -> str:
    ready = json.loads((cluster.root / "server.ready").read_text())
    return ready["api"].split(" and ")[1]


def api_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    # No --socket-path: only --api-url can reach this server.
    return raw_cli("--config-file", str(cluster.config), "--api-url", api_url(cluster), *args)


def test_api_over_tcp_with_a_client_certificate(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, _ = pkis
    url = api_url(mtls)
    assert url.startswith("tls://127.0.0.1:")
    proc = api_cli(
        mtls,
        "--ca",
        pki.ca,
        "--cert",
        pki.cert("operator"),
        "--key",
        pki.key("operator"),
        "manage",
        "--list-nodes",
        "--format",
        "json",
    )
    assert proc.returncode == 0, proc.stderr
    listed = {n["identity"]: n["status"] for n in json.loads(proc.stdout)}
    assert listed["node0"] == listed["node1"] == "online"
    token = uid()
    proc = api_cli(
        mtls,
        "--ca",
        pki.ca,
        "--cert",
        pki.cert("operator"),
        "--key",
        pki.key("operator"),
        "exec",
        "--verb",
        "RUN",
        f"echo {token}",
        "--wait",
        "--target",
        "node1",
        "--format",
        "json",
    )
    assert proc.returncode == 0, proc.stderr
    assert [(r["node"], r["stdout"].strip()) for r in json.loads(proc.stdout)["results"]] == [
        ("node1", token)
    ]
    # The library the same way.
    with DirectordConnect(
        api_url=url, ca=pki.ca, cert=pki.cert("operator"), key=pki.key("operator")
    ) as conn:
        assert {"node0", "node1"} <= set(conn.list_nodes())


def test_api_over_tcp_refuses_a_client_without_a_certificate(
    mtls: Cluster, pkis: tuple[Pki, Pki]
) -> None:
    pki, _ = pkis
    proc = api_cli(mtls, "--ca", pki.ca, "manage", "--list-nodes")
    assert proc.returncode != 0
    assert "--api-url needs a certificate (--cert)" in proc.stderr
    # A raw TLS client that sends no certificate: the server ends the handshake.
    host, port = api_url(mtls)[len("tls://") :].rsplit(":", 1)
    context = ssl.create_default_context(cafile=pki.ca)
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        # TLS 1.3 finishes the client's side of the handshake before the server has
        # checked for a certificate: the refusal arrives as an alert or a close.
        tls.sendall(b"\x00\x00\x00\x10hello, anyone?..")
        if tls.recv(1024) == b"":
            raise ConnectionError("closed without a word")


def test_api_over_tcp_refuses_another_ca_and_revoked(mtls: Cluster, pkis: tuple[Pki, Pki]) -> None:
    pki, other = pkis
    proc = api_cli(
        mtls,
        "--ca",
        pki.ca,
        "--cert",
        other.cert("operator-other"),
        "--key",
        other.key("operator-other"),
        "manage",
        "--list-nodes",
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("directord: ") and proc.stderr.count("\n") == 1
    assert "was this client's certificate refused?" in proc.stderr
    # The user checks the server too: with the impostor CA it does not trust it.
    proc = api_cli(
        mtls,
        "--ca",
        other.ca,
        "--cert",
        pki.cert("operator"),
        "--key",
        pki.key("operator"),
        "manage",
        "--list-nodes",
    )
    assert proc.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in proc.stderr
    # Works, then revoked while the server runs, then refused.
    flags = [
        "--ca",
        pki.ca,
        "--cert",
        pki.cert("operator-revoked"),
        "--key",
        pki.key("operator-revoked"),
    ]
    assert api_cli(mtls, *flags, "manage", "--list-nodes").returncode == 0
    pki.run("revoke", "operator-revoked")
    proc = api_cli(mtls, *flags, "manage", "--list-nodes")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "was this client's certificate refused?" in proc.stderr
    wait_log(mtls, "server", "API: refused")
    assert any(
        "certificate 'operator-revoked'" in line and "is revoked" in line
        for line in log_lines(mtls, "server")
    )
