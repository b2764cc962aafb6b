"""ZeroMQ driver: shared key, Curve25519 with per-node keys, live key rotation, encryption."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from directord.orchestration import SHIPPED_DIR
from tests.conftest import Cluster


def _generate(key_dir: Path, *clients: str) -> None:
    argv = [
        sys.executable,
        "-m",
        "directord",
        "--config-file",
        "/dev/null",
        "--zmq-key-dir",
        str(key_dir),
        "server",
        "--zmq-generate-keys",
    ]
    for name in clients:
        argv += ["--client", name]
    subprocess.run(argv, check=True, capture_output=True)


def _node_keys(server_dir: Path, node_dir: Path, identity: str) -> None:
    """What an operator copies to a node: public keys, the shared secret, its own secret."""
    (node_dir / "public_keys").mkdir(parents=True, exist_ok=True)
    (node_dir / "private_keys").mkdir(parents=True, exist_ok=True)
    for pub in (server_dir / "public_keys").glob("*.key"):
        shutil.copy(pub, node_dir / "public_keys")
    for name in ("client", identity):
        secret = server_dir / "private_keys" / f"{name}.key_secret"
        if secret.exists():
            shutil.copy(secret, node_dir / "private_keys")


def _wait(predicate: Any, what: str, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _started(cluster: Cluster, identity: str) -> float:
    try:
        return float(json.loads((cluster.root / f"{identity}.ready").read_text())["started"])
    except (OSError, ValueError, KeyError):
        return 0.0


def test_shared_key_authenticates(make_cluster: Any) -> None:
    cluster = make_cluster(
        nodes=1,
        driver="zmq",
        server_args=["--zmq-shared-key", "tok3n"],
        client_args=["--zmq-shared-key", "tok3n"],
    )
    reply = cluster.json("exec", "--verb", "RUN", "--skip-cache echo shared-ok", "--wait")
    assert [r["stdout"].strip() for r in reply["results"]] == ["shared-ok"]
    # A client with the wrong key never registers, and the server says why.
    cluster.client_args = ["--zmq-shared-key", "wrong"]
    cluster.identities.append("intruder")
    cluster.start_client("intruder", wait=False)
    _wait(
        lambda: "wrong or missing shared key" in cluster.log("server").read_text(),
        "the server to log the refusal",
    )
    nodes = {n["identity"] for n in cluster.json("manage", "--list-nodes")}
    assert "intruder" not in nodes


def test_shared_key_from_a_file(make_cluster: Any, tmp_path: Path) -> None:
    key = tmp_path / "zmq.key"
    key.write_text("k3y-from-a-file\n")
    key.chmod(0o600)
    option = ["--zmq-shared-key-file", str(key)]
    cluster = make_cluster(nodes=1, driver="zmq", server_args=option, client_args=option)
    reply = cluster.json("exec", "--verb", "RUN", "--skip-cache echo file-key-ok", "--wait")
    assert [r["stdout"].strip() for r in reply["results"]] == ["file-key-ok"]
    # The key is on no command line (every local user can read those in /proc).
    assert cluster.server is not None
    for pid in (cluster.server.pid, cluster.clients["node0"].pid):
        assert b"k3y-from-a-file" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    # The same key given inline is the same key: that client registers too.
    cluster.client_args = ["--zmq-shared-key", "k3y-from-a-file"]
    cluster.identities.append("inline")
    cluster.start_client("inline")
    # A key file others may read is refused before anything starts, naming the file.
    key.chmod(0o640)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "directord",
            "--config-file",
            "/dev/null",
            "--driver",
            "zmq",
            "--zmq-shared-key-file",
            str(key),
            "server",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=cluster.env,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"directord: {key}: zmq_shared_key_file: group or others have rights on it "
        "(mode 0640); chmod 600 it\n"
    )


def test_curve_rotation_live(make_cluster: Any, tmp_path: Path) -> None:
    server_keys = tmp_path / "server-keys"
    _generate(server_keys, "node0")  # node0 gets its own key; node1 uses the shared one
    for identity in ("node0", "node1"):
        _node_keys(server_keys, tmp_path / "nk" / identity, identity)
    cluster = make_cluster(
        nodes=2,
        driver="zmq",
        server_args=["--zmq-key-dir", str(server_keys)],
        client_args=["--zmq-key-dir", str(tmp_path / "nk" / "{identity}")],
    )
    reply = cluster.json("exec", "--verb", "RUN", "--skip-cache echo curve-ok", "--wait")
    assert sorted(r["node"] for r in reply["results"]) == ["node0", "node1"]
    for identity in ("node0", "node1"):
        cluster.run(
            "exec",
            "--verb",
            "ARG",
            f"key_dir {tmp_path / 'nk' / identity}",
            "--target",
            identity,
            "--wait",
        )
    old = tmp_path / "old-keys"
    shutil.copytree(server_keys, old)
    before = {i: _started(cluster, i) for i in ("node0", "node1")}

    _generate(server_keys)  # full rotation: server, shared client and node0's key
    rotation = (SHIPPED_DIR / "key-rotation.yaml").read_text()
    # Sources live on the server host; destinations differ per node here because all
    # the "nodes" share one machine (each has its own --zmq-key-dir).
    for source in (
        "public_keys/*.key",
        "private_keys/client.key_secret",
        "private_keys/{identity}.key_secret",
    ):
        rotation = rotation.replace(f"/etc/directord/{source}", f"{server_keys}/{source}")
    rotation = rotation.replace("/etc/directord", "{{ key_dir }}")
    reply = cluster.orchestrate(rotation, name="rotation.yaml")
    assert {r["state"] for r in reply["results"]} == {"success"}, reply["results"]

    # Both clients re-executed themselves and came back on the new keys.
    _wait(lambda: all(_started(cluster, i) > before[i] for i in before), "clients to restart")
    for identity in ("node0", "node1"):
        assert (tmp_path / "nk" / identity / "public_keys" / "server.key").read_text() == (
            server_keys / "public_keys" / "server.key"
        ).read_text()
    assert (tmp_path / "nk" / "node0" / "private_keys" / "node0.key_secret").read_text() == (
        server_keys / "private_keys" / "node0.key_secret"
    ).read_text()
    # node1 never received node0's secret.
    assert not (tmp_path / "nk" / "node1" / "private_keys" / "node0.key_secret").exists()
    _wait(
        lambda: (
            {
                n["identity"]
                for n in cluster.json("manage", "--list-nodes")
                if n["status"] == "online"
            }
            >= {"node0", "node1"}
        ),
        "nodes back online",
    )
    reply = cluster.json("exec", "--verb", "RUN", "--skip-cache echo after-rotation", "--wait")
    assert sorted(r["node"] for r in reply["results"]) == ["node0", "node1"]

    # A client that knows the new server key but still holds the old shared client key
    # is refused by the server's key check (ZAP), which logs it.
    stale = tmp_path / "stale"
    _node_keys(old, stale, "stale")
    shutil.copy(server_keys / "public_keys" / "server.key", stale / "public_keys")
    cluster.client_args = ["--zmq-key-dir", str(stale)]
    cluster.identities.append("stale")
    cluster.start_client("stale", wait=False)
    _wait(
        lambda: "unknown curve key" in cluster.log("server").read_text(),
        "the server to refuse the old key",
    )
    assert "stale" not in {n["identity"] for n in cluster.json("manage", "--list-nodes")}


class _Tap:
    """A TCP relay on loopback that keeps a copy of every byte it forwards."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.closed = threading.Event()
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(0.1)
            upstream = socket.create_connection(("127.0.0.1", self.target))
            upstream.settimeout(0.1)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._start(self._pump, a, b)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            with self.lock:
                self.seen += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for thread in self.threads:
            thread.join(5)
        self.listener.close()
        for s in self.sockets:
            s.close()


def _through_tap(make_cluster: Any, tmp_path: Path, secure: bool) -> bytes:
    server_args: list[str] = []
    client_args: list[str] = []
    if secure:
        keys = tmp_path / "keys"
        _generate(keys)
        server_args = client_args = ["--zmq-key-dir", str(keys)]
    cluster = make_cluster(
        nodes=1, driver="zmq", start=False, server_args=server_args, client_args=client_args
    )
    cluster.identities = []
    cluster.start()
    tap = _Tap(cluster.port)
    real_port, cluster.port = cluster.port, tap.port
    try:
        cluster.identities.append("node0")
        cluster.start_client("node0")
        cluster.port = real_port
        token = "SECRET-OUTPUT-7f3a9c"
        reply = cluster.json("exec", "--verb", "RUN", f"--skip-cache echo {token}", "--wait")
        assert reply["results"][0]["stdout"].strip() == token
        with tap.lock:
            return bytes(tap.seen)
    finally:
        tap.close()


def test_curve_encrypts_and_plain_does_not(make_cluster: Any, tmp_path: Path) -> None:
    token = b"SECRET-OUTPUT-7f3a9c"
    plain = _through_tap(make_cluster, tmp_path / "plain", secure=False)
    assert token in plain  # the control: without curve, job output crosses in clear
    curve = _through_tap(make_cluster, tmp_path / "curve", secure=True)
    assert len(curve) > 1000  # the job really went through the tap
    assert token not in curve


def test_rotated_server_key_waits_for_old_key_clients(make_cluster: Any, tmp_path: Path) -> None:
    """A server key rotation must not cut off clients that have not got their new keys."""
    server_keys = tmp_path / "server-keys"
    _generate(server_keys)
    _node_keys(server_keys, tmp_path / "nk" / "node0", "node0")
    cluster = make_cluster(
        nodes=1,
        driver="zmq",
        server_args=["--zmq-key-dir", str(server_keys), "--zmq-rotation-grace", "4"],
        client_args=["--zmq-key-dir", str(tmp_path / "nk" / "{identity}")],
    )
    _generate(server_keys)  # the node keeps its old keys: nobody ships it the new ones
    _wait(lambda: "new server key" in cluster.log("server").read_text(), "the key change")
    # Still served over its old-key connection, within the grace period.
    reply = cluster.json("exec", "--verb", "RUN", "--skip-cache echo still-here", "--wait")
    assert [r["stdout"].strip() for r in reply["results"]] == ["still-here"]
    # Once the grace is over, the listener switches and the old-key client is cut off:
    # it cannot come back with the old server key, so the node goes offline.
    _wait(
        lambda: "1 old-key clients cut off" in cluster.log("server").read_text(),
        "the switch to the new key",
    )
    _wait(
        lambda: all(n["status"] != "online" for n in cluster.json("manage", "--list-nodes")),
        "the old-key node to go offline",
        timeout=30,
    )
