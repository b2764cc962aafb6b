"""mTLS in a double proxy (seed 002): two real HAProxy processes between client and server.

    client --unix--> forward HAProxy --TCP+mTLS--> reverse HAProxy --unix--> server

directord itself only listens on, and dials, local Unix sockets; the
certificates come from `directord pki`. HAProxy is the Debian package
`haproxy` (installed by .ci/run): without it this test fails, it never skips.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.e2e.helpers import raw_cli, read_lines, uid, wait_for

PROXY_NAME = "directord-proxy"  # the reverse proxy's certificate name, checked by the forward

REVERSE = """\
global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend nodes
    bind 127.0.0.1:{port} ssl crt {pem} verify required ca-file {ca} crl-file {crl}
    default_backend directord
backend directord
    server directord unix@{server_sock}
"""

FORWARD = """\
global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend local
    bind unix@{client_sock}
    default_backend manager
backend manager
    server manager 127.0.0.1:{port} ssl crt {pem} verify required ca-file {ca} verifyhost {name}
"""


def haproxy_binary() -> str:
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    assert path, "haproxy is not installed: apt-get install -y haproxy (see .ci/run)"
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Proxies:
    """Both HAProxy processes, in the foreground (-db), logging to files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, config: str) -> Path:
        cfg = self.root / f"{name}.cfg"
        cfg.write_text(config)
        check = subprocess.run(
            [haproxy_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            self.procs.append(
                subprocess.Popen(
                    [haproxy_binary(), "-db", "-f", str(cfg)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        return log

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def pki(directory: Path, *args: str) -> None:
    proc = raw_cli("--config-file", "/dev/null", "pki", "--pki-dir", str(directory), *args)
    assert proc.returncode == 0, proc.stderr


def haproxy_pem(directory: Path, name: str) -> Path:
    """HAProxy wants the certificate and its key in one file."""
    pem = directory / f"{name}.pem"
    pem.write_bytes(
        (directory / "certs" / f"{name}.crt").read_bytes()
        + (directory / "private" / f"{name}.key").read_bytes()
    )
    pem.chmod(0o600)
    return pem


def wait_log(path: Path, text: str) -> str:
    return wait_for(
        lambda: next((line for line in read_lines(path) if text in line), None),
        f"{text!r} in {path.name}",
    )


@pytest.fixture
def sockets_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dd-proxy-", dir="/tmp"))  # short Unix socket paths
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_job_through_a_double_mtls_proxy(
    make_cluster: Any, tmp_path: Path, sockets_dir: Path
) -> None:
    haproxy_binary()  # fail at once, with the package to install, if it is missing
    ca_dir, other_dir = tmp_path / "pki", tmp_path / "other"
    pki(ca_dir, "init")
    pki(ca_dir, "issue", PROXY_NAME, "--server", "--san", "127.0.0.1")
    pki(ca_dir, "issue", "node0-proxy", "--client")
    pki(other_dir, "init")
    pki(other_dir, "issue", "intruder", "--client")
    ca = ca_dir / "ca.crt"
    server_sock = sockets_dir / "server.sock"
    client_sock = sockets_dir / "forward.sock"
    port = free_port()

    c: Cluster = make_cluster(
        nodes=1,
        start=False,
        heartbeat=1.0,
        server_args=["--grpc-bind-address", f"unix:{server_sock}"],
        client_args=["--grpc-server-address", f"unix:{client_sock}"],
    )
    proxies = Proxies(tmp_path)
    try:
        c.start_server()
        reverse_log = proxies.start(
            "reverse",
            REVERSE.format(
                port=port,
                pem=haproxy_pem(ca_dir, PROXY_NAME),
                ca=ca,
                crl=ca_dir / "crl.pem",
                server_sock=server_sock,
            ),
        )
        forward_log = proxies.start(
            "forward",
            FORWARD.format(
                client_sock=client_sock,
                port=port,
                pem=haproxy_pem(ca_dir, "node0-proxy"),
                ca=ca,
                name=PROXY_NAME,
            ),
        )

        def listening() -> bool:
            assert proxies.alive(), "haproxy exited; see its log in " + str(tmp_path)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except OSError:
                return False
            return client_sock.exists()

        wait_for(listening, "both proxies to listen")

        # The client knows nothing of TLS or TCP: it dials its local Unix socket.
        c.start_client("node0")
        assert any(
            f"registered with unix:{client_sock} as node0" in line
            for line in read_lines(c.log("node0"))
        )
        token = uid()
        reply = c.json("exec", "--verb", "RUN", f"echo {token}", "--wait")
        assert [(r["node"], r["state"], r["stdout"].strip()) for r in reply["results"]] == [
            ("node0", "success", token)
        ]
        ready = json.loads((c.root / "server.ready").read_text())
        assert ready["address"] == f"unix:{server_sock}"  # the server has no TCP listener

        # A peer without a certificate, or with one from another CA, is refused by the
        # reverse proxy: the handshake fails and nothing reaches the server.
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False
        other = ssl.create_default_context(cafile=str(ca))
        other.check_hostname = False
        other.load_cert_chain(
            other_dir / "certs" / "intruder.crt", other_dir / "private" / "intruder.key"
        )
        for ctx in (context, other):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
                pytest.raises((ssl.SSLError, ConnectionError)),
                ctx.wrap_socket(raw) as tls,
            ):
                # TLS 1.3: the refusal arrives after the client's side of the handshake.
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                if tls.recv(1024) == b"":
                    raise ConnectionError("closed by the proxy")
        for reason in ("SSL handshake failure", "SSL client certificate not trusted"):
            wait_log(reverse_log, f"nodes/1: {reason}")
        # The refused peers never got to directord; the real node is still served.
        assert sum("joined" in line for line in read_lines(c.log("server"))) == 1
        token = uid()
        reply = c.json("exec", "--verb", "RUN", f"echo {token}", "--wait")
        assert [(r["node"], r["stdout"].strip()) for r in reply["results"]] == [("node0", token)]
        # HAProxy logs a session when it ends: the node's went through both proxies, over
        # TLS between them ("nodes~" is the TLS frontend).
        c.stop_process("node0")
        wait_log(reverse_log, "nodes~ directord/directord")
        wait_log(forward_log, "local manager/manager")
    finally:
        c.stop()
        proxies.stop()
