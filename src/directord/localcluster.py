"""A throwaway local cluster: one server and N clients as real processes in one directory.

Used by ``directord demo``, by the end-to-end tests and by the benchmarks, so
all three exercise exactly what a user runs. Nothing is written outside the
directory; every process is stopped by :meth:`LocalCluster.stop` (also from
``with``), including on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from directord.errors import ClusterError

START_TIMEOUT = 20.0
BROKERS = ("messaging", "nats")


class LocalCluster:
    """Server and clients on loopback, each a ``python -m directord`` process.

    Args:
        root: working directory for sockets, caches, datastore and logs.
        nodes: number of clients (``node0`` ... ``nodeN-1``).
        server_args / client_args: extra global options for every server / client;
            ``{identity}`` in a client argument is replaced by that client's identity
            (per-node certificates).
        datastore: server datastore URL (default: sqlite in ``root``).
        heartbeat: heartbeat interval for server and clients.
    """

    def __init__(
        self,
        root: str | Path,
        nodes: int = 3,
        *,
        server_args: Sequence[str] = (),
        client_args: Sequence[str] = (),
        datastore: str | None = None,
        heartbeat: float = 2.0,
        env: dict[str, str] | None = None,
        driver: str = "grpc",
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.config = self.root / "config.yaml"
        self.config.write_text("{}\n")
        self.socket_path = str(self.root / "directord.sock")
        self.datastore = datastore or f"sqlite:///{self.root / 'directord.db'}"
        self.server_args = list(server_args)
        self.client_args = list(client_args)
        self.heartbeat = heartbeat
        self.driver = driver
        # Each cluster gets its own queue/subject names on a shared broker.
        self.namespace = f"directord-{uuid.uuid4().hex[:12]}"
        self.identities = [f"node{i}" for i in range(nodes)]
        self.port = 0
        self.server: subprocess.Popen[bytes] | None = None
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, **(env or {})}
        for key in [k for k in self.env if k.startswith("DIRECTORD_")]:
            del self.env[key]
        # Where running jobs keep their files: on tmpfs when there is one, as
        # systemd's RuntimeDirectory gives the packaged client.
        shm = Path("/dev/shm")
        self.run_root = Path(
            tempfile.mkdtemp(prefix="directord-run-", dir=shm if shm.is_dir() else self.root)
        )

    # ---- processes ------------------------------------------------------------------------
    def _base(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "directord",
            "--config-file",
            str(self.config),
            "--socket-path",
            self.socket_path,
            "--heartbeat-interval",
            str(self.heartbeat),
        ]

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by child
        try:
            return subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        finally:
            log.close()

    def _wait_file(
        self, path: Path, proc: subprocess.Popen[bytes], name: str, check: Any = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with {proc.returncode}; see {self.log(name)}")
            if path.exists():
                try:
                    data: dict[str, Any] = json.loads(path.read_text())
                except ValueError:
                    data = {}
                if data and (check is None or check(data)):
                    return data
            time.sleep(0.02)
        raise ClusterError(f"{name} not ready after {START_TIMEOUT:.0f}s; see {self.log(name)}")

    def log(self, name: str) -> Path:
        """Path of a process's log file."""
        return self.root / "logs" / f"{name}.log"

    def _endpoint(self, side: str) -> list[str]:
        """Driver options on loopback: ``side`` is ``bind`` (server) or ``server`` (client)."""
        if self.driver in BROKERS:
            return ["--driver", self.driver, "--broker-namespace", self.namespace]
        if self.driver == "zmq":
            return [
                "--driver",
                "zmq",
                f"--zmq-{side}-address",
                "127.0.0.1",
                "--job-port",
                str(self.port),
            ]
        return [f"--grpc-{side}-address", "127.0.0.1", "--grpc-port", str(self.port)]

    def start_server(self) -> None:
        """Start (or restart) the server, on the same port as before if it had one."""
        ready = self.root / "server.ready"
        ready.unlink(missing_ok=True)
        listen = self._endpoint("bind")
        argv = [
            *self._base(),
            "--datastore",
            self.datastore,
            *listen,
            "--ready-file",
            str(ready),
            *self.server_args,
            "server",
        ]
        self.server = self._spawn("server", argv)
        data = self._wait_file(ready, self.server, "server")
        if (
            not self.port
            and self.driver not in BROKERS
            and ":" in data["address"]
            and not data["address"].startswith("unix:")
        ):
            self.port = int(data["address"].rsplit(":", 1)[1])

    def start_client(self, identity: str, wait: bool = True) -> None:
        """Start one client; with ``wait``, return once it registered."""
        ready = self.root / f"{identity}.ready"
        ready.unlink(missing_ok=True)
        dial = self._endpoint("server")
        argv = [
            *self._base(),
            "--identity",
            identity,
            "--machine-id",
            f"machine-{identity}",
            "--cache-path",
            str(self.root / "cache" / identity),
            "--run-path",
            str(self.run_root / identity),
            *dial,
            "--ready-file",
            str(ready),
            *(a.replace("{identity}", identity) for a in self.client_args),
            "client",
        ]
        self.clients[identity] = self._spawn(identity, argv)
        if wait:
            self._wait_file(ready, self.clients[identity], identity)

    def wait_registered(self, identity: str, count: int) -> None:
        """Wait until a client has registered ``count`` times (reconnects)."""
        self._wait_file(
            self.root / f"{identity}.ready",
            self.clients[identity],
            identity,
            lambda d: d.get("registered", 0) >= count,
        )

    def start(self) -> LocalCluster:
        """Start the server and every client; on failure stop whatever did start."""
        try:
            self.start_server()
            for identity in self.identities:
                self.start_client(identity, wait=False)
            for identity in self.identities:
                self._wait_file(self.root / f"{identity}.ready", self.clients[identity], identity)
        except BaseException:
            self.stop()
            raise
        return self

    def send_signal(self, name: str, sig: int) -> None:
        """Send a signal to the server (``server``) or a client by identity."""
        proc = self.server if name == "server" else self.clients.get(name)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop one process (and its process group), escalating to SIGKILL."""
        _stop(self.server if name == "server" else self.clients.get(name), sig, timeout)

    def stop(self) -> None:
        """Stop everything this cluster started (a client may be named ``server``)."""
        for proc in list(self.clients.values()):
            _stop(proc, signal.SIGTERM, 10.0)
        _stop(self.server, signal.SIGTERM, 10.0)
        shutil.rmtree(self.run_root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- driving it -------------------------------------------------------------------------
    def cli(
        self,
        *args: str,
        timeout: float = 120.0,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``directord ARGS`` against this cluster; returns the finished process."""
        argv = [
            sys.executable,
            "-m",
            "directord",
            "--config-file",
            str(self.config),
            "--socket-path",
            self.socket_path,
            "--cache-path",
            str(self.root / "cache" / (self.identities[0] if self.identities else "none")),
            *args,
        ]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=cwd
        )


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Signal a process's group, wait, escalate to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
