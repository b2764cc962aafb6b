"""Operators and nodes are different identities; revocation cuts off live peers; API limits.

Real processes, real certificates from `directord pki`, real sockets. One mTLS
cluster (server + node0, node1; allow-list; the user API over TCP) is shared by
the module; each test uses certificates of its own, so a revocation in one does
not touch another. The API limits run on a small cluster of their own.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directord.protocol import FrameDecoder, PlainBatches, frame
from directord.security.pki import load_certificate
from tests.conftest import Cluster
from tests.e2e.helpers import nodes, raw_cli, uid, wait_for
from tests.e2e.test_tls import Pki, api_url, log_lines, start_peer, wait_log

# Every name here may register, so a refusal below is never the allow-list's.
ALLOWED = ["node0", "node1", "victim", "opnode", "srvnode"]
NODES = ("node0", "node1", "victim")
OPERATORS = ("alice", "bob", "carol", "dave")
# Seconds within which a revoked peer must be gone (the CRL is checked every second).
CUT_WITHIN = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki") / "pki")
    pki.run("init")
    pki.run("issue", "server", "--server", "--san", "127.0.0.1")
    for name in NODES:
        pki.run("issue", name, "--client")
    for name in (*OPERATORS, "opnode"):
        pki.run("issue", name, "--operator")
    pki.run("issue", "srvnode", "--server", "--san", "127.0.0.1")
    return pki


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("operators"),
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
def as_user(pki: Pki, name: str) -> list[str]:
    """CLI options to reach the API over TCP with NAME's certificate."""
    return ["--ca", pki.ca, "--cert", pki.cert(name), "--key", pki.key(name)]


def api_cli(cluster: Cluster, pki: Pki, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI over TCP with NAME's certificate (no --socket-path: TCP is the only way in)."""
    return raw_cli(
        "--config-file",
        str(cluster.config),
        "--api-url",
        api_url(cluster),
        *as_user(pki, name),
        *args,
    )


def api_popen(cluster: Cluster, pki: Pki, name: str, *args: str) -> subprocess.Popen[str]:
    """Like api_cli, but running in the background."""
    argv = [sys.executable, "-m", "directord", "--config-file", str(cluster.config)]
    argv += ["--api-url", api_url(cluster), *as_user(pki, name), *args]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env
    )


def serial(pki: Pki, name: str) -> str:
    return f"{load_certificate(pki.cert(name)).serial_number:x}"


def one_error_line(stderr: str) -> str:
    """The one line the CLI printed for an error."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("directord: "), stderr
    assert "Traceback" not in stderr
    return str(lines[0])


def jobs_still_run(cluster: Cluster) -> None:
    """node0 and node1 are online and run a job."""
    listed = nodes(cluster)
    assert listed["node0"]["status"] == listed["node1"]["status"] == "online"
    token = uid()
    reply = cluster.json("exec", "--verb", "RUN", f"echo {token}", "--wait")
    assert sorted((r["node"], r["state"], r["stdout"].strip()) for r in reply["results"]) == [
        ("node0", "success", token),
        ("node1", "success", token),
    ]


# ---- operators and nodes ----------------------------------------------------------------------
def test_a_node_certificate_cannot_drive_the_api(mtls: Cluster, pki: Pki, tmp_path: Path) -> None:
    # The attack of the review: node0's own certificate as an API client, copying the
    # CA key to a node. The server refuses the connection before any request.
    stolen = tmp_path / "stolen-ca.key"
    mark = len(log_lines(mtls, "server"))
    proc = api_cli(
        mtls,
        pki,
        "node0",
        "exec",
        "--verb",
        "COPY",
        f"{pki.dir / 'ca.key'} {stolen}",
        "--target",
        "node0",
        "--wait",
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    line = one_error_line(proc.stderr)
    assert "(was this client's certificate refused?)" in line
    wait_log(
        mtls,
        "server",
        "API: refused 127.0.0.1:",
        f"certificate 'node0' (serial {serial(pki, 'node0')}) is not an operator's",
        after=mark,
    )
    assert not stolen.exists()
    proc = api_cli(mtls, pki, "node1", "manage", "--list-nodes")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    wait_log(mtls, "server", "API: refused", "certificate 'node1'", "is not an operator's")
    # A server's certificate is no operator either (TLS itself refuses it as a client).
    proc = api_cli(mtls, pki, "srvnode", "manage", "--list-nodes")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    one_error_line(proc.stderr)
    # An operator's certificate works, and the node that was "attacked" is fine.
    proc = api_cli(mtls, pki, "alice", "manage", "--list-nodes", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    jobs_still_run(mtls)


def test_an_operator_certificate_cannot_be_a_node(mtls: Cluster, pki: Pki) -> None:
    mark = len(log_lines(mtls, "server"))
    start_peer(mtls, "opnode", "opnode", pki.client_flags("opnode"))
    reason = f"certificate 'opnode' (serial {serial(pki, 'opnode')}) is an operator's, not a node's"
    wait_log(mtls, "server", "grpc: refused", reason, after=mark)
    wait_log(mtls, "opnode", "server unavailable", f"UNAUTHENTICATED: {reason}")
    assert mtls.clients["opnode"].poll() is None, "it keeps retrying, and keeps being refused"
    assert not (mtls.root / "opnode.ready").exists()
    mtls.stop_process("opnode")
    assert "opnode" not in nodes(mtls)
    jobs_still_run(mtls)


def test_a_server_certificate_cannot_be_a_node(mtls: Cluster, pki: Pki) -> None:
    mark = len(log_lines(mtls, "server"))
    start_peer(mtls, "srvnode", "srvnode", pki.client_flags("srvnode"))
    # gRPC's TLS checks the client certificate's purpose: serverAuth alone fails the
    # handshake, before directord's own check (which would refuse it too).
    wait_log(
        mtls,
        "server",
        "Handshake failed",
        "CERTIFICATE_VERIFY_FAILED",
        "unsupported certificate purpose",
        after=mark,
    )
    wait_log(mtls, "srvnode", "server unavailable (cannot reach server at 127.0.0.1:")
    assert not (mtls.root / "srvnode.ready").exists()
    mtls.stop_process("srvnode")
    assert "srvnode" not in nodes(mtls)
    jobs_still_run(mtls)


# ---- revocation cuts off live connections --------------------------------------------------------
def test_revoking_a_connected_node_cuts_it_off(mtls: Cluster, pki: Pki) -> None:
    start_peer(mtls, "victim", "victim", pki.client_flags("victim"))
    wait_for(lambda: (mtls.root / "victim.ready").exists(), "victim to register")
    assert nodes(mtls)["victim"]["status"] == "online"
    lost_before = [line for line in log_lines(mtls, "server") if " lost: " in line]
    mark = len(log_lines(mtls, "server"))
    revoked_at = time.monotonic()
    pki.run("revoke", "victim")
    reason = f"certificate 'victim' (serial {serial(pki, 'victim')}) is revoked"
    wait_log(mtls, "server", "grpc: cut off", reason, after=mark)
    wait_log(mtls, "server", "node victim lost", after=mark)
    assert time.monotonic() - revoked_at < CUT_WITHIN
    # It is told why, tries again, and is refused at connection from now on.
    wait_log(mtls, "victim", f"UNAUTHENTICATED: {reason}")
    wait_log(mtls, "server", "grpc: refused", reason, after=mark)
    assert mtls.clients["victim"].poll() is None
    mtls.stop_process("victim")
    assert nodes(mtls)["victim"]["status"] != "online"
    # The other nodes never noticed.
    lost_after = [line for line in log_lines(mtls, "server") if " lost: " in line]
    assert [line for line in lost_after if line not in lost_before and "victim" not in line] == []
    jobs_still_run(mtls)


def test_revoking_an_operator_cuts_off_their_watch(mtls: Cluster, pki: Pki) -> None:
    token = uid()
    flag = mtls.root / f"{token}.go"

    def job(who: str) -> list[str]:
        """A job of WHO's own on node0, running until the test lets it end."""
        started = mtls.root / f"{token}.{who}.started"
        command = f"touch {started}; while [ ! -e {flag} ]; do sleep 0.1; done; echo {token}-{who}"
        return ["exec", "--verb", "RUN", command, "--target", "node0", "--wait", "--format", "json"]

    # Bob watches his job over TCP and is revoked; dave, another operator, too and is not.
    bob = api_popen(mtls, pki, "bob", *job("bob"))
    dave = api_popen(mtls, pki, "dave", *job("dave"))
    try:
        # node0 runs one job at a time: the second waits behind the first.
        wait_for(lambda: list(mtls.root.glob(f"{token}.*.started")), "a job to start")
        time.sleep(0.5)  # both watches are surely under way
        assert bob.poll() is None and dave.poll() is None
        mark = len(log_lines(mtls, "server"))
        revoked_at = time.monotonic()
        pki.run("revoke", "bob")
        _, err = bob.communicate(timeout=CUT_WITHIN * 2)
        assert time.monotonic() - revoked_at < CUT_WITHIN, err
        assert bob.returncode == 3, err
        assert "(was this client's certificate refused?)" in one_error_line(err)
        wait_log(
            mtls,
            "server",
            "API: cut off 127.0.0.1:",
            f"certificate 'bob' (serial {serial(pki, 'bob')}) is revoked",
            after=mark,
        )
        assert dave.poll() is None, "dave's watch goes on"
        # Bob stays out; dave's watch sees his job end.
        proc = api_cli(mtls, pki, "bob", "manage", "--list-nodes")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        flag.touch()
        out, err = dave.communicate(timeout=60)
        assert dave.returncode == 0, err
        assert f"{token}-dave" in out
    finally:
        for proc in (bob, dave):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        flag.touch()


def test_revoking_an_operator_cuts_off_an_idle_connection(mtls: Cluster, pki: Pki) -> None:
    # A raw TLS connection that made one call and waits: cut too, not only watches.
    import ssl

    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(pki.cert("carol"), pki.key("carol"))
    host, port = api_url(mtls)[len("tls://") :].rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert ping(tls)["version"]
        revoked_at = time.monotonic()
        pki.run("revoke", "carol")
        tls.settimeout(CUT_WITHIN * 2)
        assert tls.recv(1024) == b""
        assert time.monotonic() - revoked_at < CUT_WITHIN
    wait_log(mtls, "server", "API: cut off", f"certificate 'carol' (serial {serial(pki, 'carol')})")


# ---- limits on the API socket -------------------------------------------------------------------
IDLE = 2.0
CAP = 3


def ping(sock: socket.socket, rid: int = 1) -> dict[str, Any]:
    """One raw API call on a connected socket; returns its result."""
    sock.sendall(frame([{"t": "req", "rid": rid, "m": "ping", "p": {}}]))
    decoder = FrameDecoder(PlainBatches())
    while True:
        data = sock.recv(65536)
        assert data, "the server closed the connection"
        for batch in decoder.feed(data):
            for reply in batch:
                if reply.get("rid") == rid:
                    assert reply["ok"], reply
                    result: dict[str, Any] = reply["r"]
                    return result


def unix(cluster: Cluster) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(cluster.socket_path)
    return sock


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("limits"),
        nodes=1,
        heartbeat=1.0,
        server_args=["--api-idle-timeout", str(IDLE), "--api-max-connections", str(CAP)],
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The connection cap alone: held connections must not time out while the test runs
    a CLI (which takes seconds on a loaded machine), so the idle timeout is long here."""
    c = Cluster(
        tmp_path_factory.mktemp("cap"),
        nodes=1,
        heartbeat=1.0,
        server_args=["--api-idle-timeout", "120", "--api-max-connections", str(CAP)],
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_an_idle_api_connection_is_closed(limited: Cluster) -> None:
    mark = len(log_lines(limited, "server"))
    with unix(limited) as idle:
        opened = time.monotonic()
        # The server closes the silent one, saying why first.
        said = b""
        while chunk := idle.recv(1024):
            said += chunk
        elapsed = time.monotonic() - opened
        assert FrameDecoder(PlainBatches()).feed(said) == [[{"t": "bye", "reason": "idle"}]]
    assert IDLE * 0.9 <= elapsed < IDLE + 5.0
    wait_log(limited, "server", "API: closed local pid", f"sent nothing for {IDLE:g}s", after=mark)
    # One that keeps asking stays open past the timeout.
    with unix(limited) as busy:
        opened = time.monotonic()
        while time.monotonic() - opened < IDLE * 2:
            assert ping(busy)["version"]
            time.sleep(IDLE / 4)


def test_a_watch_is_not_idle(limited: Cluster) -> None:
    # The job runs twice as long as the idle timeout; the CLI waits for it on one
    # connection that sends nothing meanwhile.
    token = uid()
    reply = limited.json(
        "exec", "--verb", "RUN", f"sleep {IDLE * 2:g}; echo {token}", "--wait", timeout=60
    )
    assert [(r["node"], r["state"], r["stdout"].strip()) for r in reply["results"]] == [
        ("node0", "success", token)
    ]


def test_connections_over_the_cap_are_refused(capped: Cluster) -> None:
    mark = len(log_lines(capped, "server"))
    held = [unix(capped) for _ in range(CAP)]
    try:
        for rid, sock in enumerate(held, 1):
            assert ping(sock, rid)["version"]
        extra = unix(capped)  # the kernel accepts it; the server closes it at once
        with extra:
            assert extra.recv(1024) == b""
        wait_log(
            capped,
            "server",
            "API: refused local pid",
            f"{CAP} connections are open already (api_max_connections)",
            after=mark,
        )
        # The CLI is refused the same way, with exit status 3.
        proc = capped.run("manage", "--list-nodes", rc=3)
        assert "the server closed" in proc.stderr
        for sock in held:  # the held ones were not disturbed
            assert ping(sock)["version"]
        held.pop().close()
        # Once one is gone, a new one gets in (the server notices the close first).
        wait_for(lambda: capped.run("manage", "--list-nodes", rc=None).returncode == 0, "a slot")
    finally:
        for sock in held:
            sock.close()
