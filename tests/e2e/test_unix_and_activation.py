"""The node listener on a Unix socket, and systemd socket activation (LISTEN_FDS).

Activation is tested the way systemd does it: the sockets are bound and
listening before the server exists, handed to it as fds 3 and 4 with
LISTEN_FDS=2, LISTEN_FDNAMES=nodes:api and LISTEN_PID set to the server's own
pid (a small wrapper moves the fds into place and execs the server, so the pid
it puts in LISTEN_PID is the server's).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directord.config import activation_sockets
from directord.security.pki import PKI
from tests.conftest import Cluster
from tests.e2e.helpers import raw_cli, read_lines, uid, wait_for

# Runs in the child: move the inherited sockets to fds 3, 4 ... and exec the server,
# keeping the pid (which is what LISTEN_PID must name).
EXEC_ACTIVATED = r"""
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()),
                  LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, "-m", "directord", *sys.argv[3:]])
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_server_and_clients_on_a_unix_socket(make_cluster: Any, short_dir: Path) -> None:
    sock = short_dir / "nodes.sock"
    c: Cluster = make_cluster(
        nodes=2,
        heartbeat=1.0,
        server_args=["--grpc-bind-address", f"unix:{sock}"],
        client_args=["--grpc-server-address", f"unix:{sock}"],
    )
    ready = json.loads((c.root / "server.ready").read_text())
    assert ready["address"] == f"unix:{sock}"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert any(f"grpc: listening on unix:{sock}" in line for line in read_lines(c.log("server")))
    for identity in ("node0", "node1"):
        assert any(
            f"registered with unix:{sock} as {identity}" in line
            for line in read_lines(c.log(identity))
        )
    token = uid()
    reply = c.json("exec", "--verb", "RUN", f"echo {token}", "--wait")
    assert sorted((r["node"], r["state"], r["stdout"].strip()) for r in reply["results"]) == [
        ("node0", "success", token),
        ("node1", "success", token),
    ]


def test_activation_ignores_sockets_meant_for_another_process() -> None:
    # LISTEN_PID names someone else (the fds are theirs): nothing is adopted.
    assert (
        activation_sockets(
            {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "nodes:api"}
        )
        == {}
    )
    assert activation_sockets({}) == {}


class Activated:
    """A server started with pre-bound sockets, the way systemd starts it."""

    def __init__(
        self, root: Path, sockets: list[socket.socket], names: str, extra: list[str]
    ) -> None:
        self.root = root
        self.config = root / "config.yaml"
        self.config.write_text("{}\n")
        self.log = root / "server.log"
        self.ready = root / "server.ready"
        fds = [s.fileno() for s in sockets]
        argv = [
            sys.executable,
            "-c",
            EXEC_ACTIVATED,
            ",".join(map(str, fds)),
            names,
            "--config-file",
            str(self.config),
            "--datastore",
            f"sqlite:///{root / 'db'}",
            "--socket-path",
            str(root / "unused.sock"),
            "--heartbeat-interval",
            "1",
            "--ready-file",
            str(self.ready),
            *extra,
            "server",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DIRECTORD_", "LISTEN_"))}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=fds,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        for s in sockets:
            s.close()  # the server holds them now, as with systemd
        self.clients: list[subprocess.Popen[bytes]] = []

    def wait_ready(self) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                data: dict[str, Any] = json.loads(self.ready.read_text())
            except (OSError, ValueError):
                return None
            return data

        return wait_for(probe, "the activated server to be ready")

    def client(self, identity: str, *args: str) -> Path:
        ready = self.root / f"{identity}.ready"
        with open(self.root / f"{identity}.log", "ab") as log:
            self.clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "directord",
                        "--config-file",
                        str(self.config),
                        "--identity",
                        identity,
                        "--cache-path",
                        str(self.root / "cache" / identity),
                        "--heartbeat-interval",
                        "1",
                        "--ready-file",
                        str(ready),
                        *args,
                        "client",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        return ready

    def stop(self) -> None:
        for proc in [*self.clients, self.proc]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def tcp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    return sock


@pytest.mark.parametrize(
    ("kind", "mtls"),
    [("tcp", False), ("tcp", True), ("unix", False)],
    ids=["tcp", "tcp-mtls", "unix"],
)
def test_socket_activation_nodes_and_api(short_dir: Path, kind: str, mtls: bool) -> None:
    if kind == "tcp":
        nodes = tcp_listener()
        dial = ["--grpc-server-address", "127.0.0.1", "--grpc-port", str(nodes.getsockname()[1])]
    else:
        # The double proxy's socket unit: a Unix socket the reverse proxy may write to.
        nodes_path = short_dir / "nodes.sock"
        nodes = unix_listener(nodes_path)
        nodes_path.chmod(0o660)
        dial = ["--grpc-server-address", f"unix:{nodes_path}"]
    api_path = short_dir / "api.sock"
    api = unix_listener(api_path)
    server_tls: list[str] = []
    client_tls: list[str] = []
    if mtls:
        # TLS is end to end: the activated socket only relays ciphertext to gRPC.
        pki = PKI(short_dir / "pki")
        pki.init()
        cert, key = pki.issue("server", ["127.0.0.1"], usage="server")
        node_cert, node_key = pki.issue("node0", usage="client")
        tls = ["--grpc-ssl", "--grpc-ssl-client-auth", "--grpc-ssl-ca", str(pki.ca_cert_path)]
        server_tls = [*tls, "--grpc-ssl-cert", str(cert), "--grpc-ssl-key", str(key)]
        client_tls = [*tls, "--grpc-ssl-cert", str(node_cert), "--grpc-ssl-key", str(node_key)]
    server = Activated(short_dir, [nodes, api], "nodes:api", server_tls)
    try:
        ready = server.wait_ready()
        assert ready["pid"] == server.proc.pid  # LISTEN_PID named the server itself
        assert "(socket activation)" in ready["address"]
        assert "(socket activation)" in ready["api"]
        assert str(api_path) in ready["api"]
        # It serves the sockets it was given and binds none of its own.
        assert not (short_dir / "unused.sock").exists()
        if kind == "unix":
            assert str(nodes_path) in ready["address"]
        node_ready = server.client("node0", *dial, *client_tls)
        wait_for(
            lambda: node_ready.exists() and json.loads(node_ready.read_text()),
            "node0 to register through the activated socket",
        )
        token = uid()
        proc = raw_cli(
            "--config-file",
            str(server.config),
            "--socket-path",
            str(api_path),
            "exec",
            "--verb",
            "RUN",
            f"echo {token}",
            "--wait",
            "--format",
            "json",
        )
        assert proc.returncode == 0, proc.stderr + server.log.read_text()
        results = json.loads(proc.stdout)["results"]
        assert [(r["node"], r["state"], r["stdout"].strip()) for r in results] == [
            ("node0", "success", token)
        ]
        proc = raw_cli(
            "--config-file",
            str(server.config),
            "--socket-path",
            str(api_path),
            "manage",
            "--list-nodes",
            "--format",
            "json",
        )
        assert proc.returncode == 0, proc.stderr
        assert [n["identity"] for n in json.loads(proc.stdout)] == ["node0"]
        assert any("node node0 joined" in line for line in read_lines(server.log))
    finally:
        server.stop()
    # Stopping does not remove the sockets that systemd owns.
    assert stat.S_ISSOCK(api_path.stat().st_mode)
    if kind == "unix":
        assert stat.S_IMODE(nodes_path.stat().st_mode) == 0o660
