"""Private message brokers for tests: nats-server and a RabbitMQ node, as our own processes.

Tests never use a broker the machine may already run: each broker here listens on
free loopback ports, keeps its files in a throwaway directory and is stopped by its
fixture. A missing binary fails the test that needs it (Debian: ``apt-get install
nats-server rabbitmq-server``); it is never skipped.

* :class:`NatsServer`: ``nats-server -c FILE``, optionally with JetStream, TLS (and
  ``verify`` for mTLS) and an ``authorization`` block (user/password, NKEY users).
* :class:`RabbitNode`: a RabbitMQ node of its own (own node name, epmd port,
  distribution port, mnesia and log directories, config and definitions files, no
  plugins), with an AMQP listener and, given certificates, an AMQPS listener.
* :class:`TestPKI`: a CA from directord's own PKI module and the certificates the
  brokers and clients present.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from directord.security.pki import PKI

START_TIMEOUT = 90.0  # a RabbitMQ node boots in seconds, but the machine may be loaded


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary(path: str, package: str) -> str:
    found = path if os.access(path, os.X_OK) else shutil.which(os.path.basename(path))
    if found is None:
        pytest.fail(
            f"{path} is not installed (Debian: apt-get install {package}); the broker "
            "tests need a real broker"
        )
    return found


def _stop(
    proc: subprocess.Popen[bytes] | None, timeout: float = 30.0, sig: int = signal.SIGTERM
) -> None:
    """Stop a process we started and its process group; escalate to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its key (PEM files)."""

    cert: Path
    key: Path


class TestPKI:
    """A throwaway CA (directord's own PKI) with a server certificate for 127.0.0.1."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, directory: Path) -> None:
        self.pki = PKI(directory)
        self.pki.init("directord test CA")
        cert, key = self.pki.issue("localhost", ["127.0.0.1"], usage="server")
        self.server = CertFiles(cert, key)

    @property
    def ca(self) -> Path:
        return self.pki.ca_cert_path

    def client(self, name: str) -> CertFiles:
        """A client certificate for NAME (issued once, then reused)."""
        if self.pki.cert_path(name).exists():
            return CertFiles(self.pki.cert_path(name), self.pki.key_path(name))
        cert, key = self.pki.issue(name, usage="client")
        return CertFiles(cert, key)


# ---- NATS ----------------------------------------------------------------------------------


def nkey_user(directory: Path, name: str) -> tuple[str, Path]:
    """A new NKEY user: (public key for the server config, seed file for the client)."""
    import nkeys  # nats-py's own NKEY dependency

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path = directory / f"{name}.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return public, path


class NatsServer:
    """One ``nats-server`` on 127.0.0.1.

    Args:
        directory: config file, log and JetStream store.
        jetstream: turn JetStream on.
        tls: server certificate; clients then need TLS.
        ca / verify: with ``verify``, clients must present a certificate signed by ``ca``.
        users: ``authorization.users`` entries (``{"user": .., "password": ..}`` or
            ``{"nkey": ..}``); none means no authentication.
    """

    def __init__(
        self,
        directory: Path,
        *,
        jetstream: bool = False,
        tls: CertFiles | None = None,
        ca: Path | None = None,
        verify: bool = False,
        users: list[dict[str, str]] | None = None,
    ) -> None:
        self.binary = _binary("/usr/sbin/nats-server", "nats-server")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jetstream = jetstream
        self.tls = tls
        self.ca = ca
        self.verify = verify
        self.users = users or []
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "nats.log"

    @property
    def url(self) -> str:
        """The URL clients use (``tls://`` when the server requires TLS)."""
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return self.url.replace("://", f"://{user}:{password}@", 1)

    def _config(self, port: int) -> str:
        lines = [
            f'listen: "127.0.0.1:{port}"',
            f'log_file: "{self.log}"',
            f'pid_file: "{self.dir / "nats.pid"}"',
        ]
        if self.jetstream:
            lines.append(f'jetstream {{ store_dir: "{self.dir / "jetstream"}" }}')
        if self.tls is not None:
            tls = [f'cert_file: "{self.tls.cert}"', f'key_file: "{self.tls.key}"', "timeout: 5"]
            if self.ca is not None:
                tls.append(f'ca_file: "{self.ca}"')
            if self.verify:
                tls.append("verify: true")
            lines.append("tls { " + ", ".join(tls) + " }")
        if self.users:
            entries = ", ".join(json.dumps(u) for u in self.users)
            lines.append(f"authorization {{ users: [{entries}] }}")
        return "\n".join(lines) + "\n"

    def start(self) -> NatsServer:
        """Start on a free port, or on the port it had before (a restart)."""
        for _attempt in range(5):
            port = self.port or free_port()
            conf = self.dir / "nats.conf"
            conf.write_text(self._config(port))
            with open(self.dir / "stdout.log", "ab") as out:
                self.proc = subprocess.Popen(
                    [self.binary, "-c", str(conf)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready(port):
                self.port = port
                return self
            _stop(self.proc)
            # A port from free_port() may have been taken meanwhile; a restart's port may
            # still be held for a moment: try again.
            time.sleep(0.5)
        pytest.fail(f"nats-server did not start; see {self.log} and {self.dir / 'stdout.log'}")

    def _wait_ready(self, port: int) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=2) as s,
            ):
                # The server greets every client with INFO (in clear, also before TLS).
                if s.makefile("rb").readline().startswith(b"INFO "):
                    return True
            time.sleep(0.05)
        return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (JetStream data, if any, stays in its directory)."""
        proc, self.proc = self.proc, None
        _stop(proc, sig=sig)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop and start again on the same port."""
        self.stop(sig)
        self.start()


# ---- RabbitMQ -------------------------------------------------------------------------------


def _password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` form, for a definitions file."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class RabbitNode:
    """A private RabbitMQ node on loopback (never the machine's own ``rabbit@localhost``).

    Args:
        directory: mnesia, logs, config, cookie (``HOME``).
        users: ``{name: password}`` defined at boot; ``guest``/``guest`` is always there.
        permissions: ``{name: (configure, write, read)}`` regular expressions on ``/``;
            a user not named here may do anything.
        tls: server certificate for an AMQPS listener (``ssl_port``), verified with ``ca``;
            a client certificate is checked when given, not required.
    """

    def __init__(
        self,
        directory: Path,
        *,
        users: dict[str, str] | None = None,
        tls: CertFiles | None = None,
        ca: Path | None = None,
        permissions: dict[str, tuple[str, str, str]] | None = None,
    ) -> None:
        self.server_bin = _binary("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server")
        self.ctl_bin = _binary("/usr/lib/rabbitmq/bin/rabbitmqctl", "rabbitmq-server")
        self.epmd_bin = _binary("/usr/bin/epmd", "erlang-base")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.users = {"guest": "guest", **(users or {})}
        self.permissions = permissions or {}
        self.tls = tls
        self.ca = ca
        self.node = f"directord-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = self.ssl_port = self.dist_port = self.epmd_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "log" / f"{self.node}.log"

    def url(self, user: str = "guest", password: str | None = None, tls: bool = False) -> str:
        """An AMQP URL for a user (its password unless another is given)."""
        password = self.users[user] if password is None else password
        scheme, port = ("amqps", self.ssl_port) if tls else ("amqp", self.port)
        return f"{scheme}://{user}:{password}@127.0.0.1:{port}/"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(self.dir),  # the Erlang cookie lives here, for server and rabbitmqctl
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
                "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
                "RABBITMQ_SERVER_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def _write_config(self) -> None:
        definitions = {
            "vhosts": [{"name": "/"}],
            "users": [
                {
                    "name": name,
                    "password_hash": _password_hash(password),
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": [],
                }
                for name, password in self.users.items()
            ],
            "permissions": [
                dict(
                    zip(
                        ("configure", "write", "read"),
                        self.permissions.get(name, (".*", ".*", ".*")),
                        strict=True,
                    ),
                    user=name,
                    vhost="/",
                )
                for name in self.users
            ],
        }
        (self.dir / "definitions.json").write_text(json.dumps(definitions))
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
            "disk_free_limit.absolute = 1MB",
            f"load_definitions = {self.dir / 'definitions.json'}",
        ]
        if self.tls is not None:
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.ssl_port}",
                f"ssl_options.certfile = {self.tls.cert}",
                f"ssl_options.keyfile = {self.tls.key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
            if self.ca is not None:
                lines.append(f"ssl_options.cacertfile = {self.ca}")
        (self.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")

    def start(self) -> RabbitNode:
        """Boot the node (and its own epmd); a restart keeps ports, queues and messages."""
        if not self.port:
            self.port, self.ssl_port, self.dist_port, self.epmd_port = (
                free_port() for _ in range(4)
            )
            self._write_config()
        env = self._env()
        if self.epmd is None or self.epmd.poll() is not None:
            with open(self.dir / "epmd.log", "ab") as out:
                self.epmd = subprocess.Popen(
                    [self.epmd_bin, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        with open(self.dir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [self.server_bin],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
                start_new_session=True,
            )
        if not self._wait_ready():
            self.stop()
            pytest.fail(
                f"RabbitMQ node {self.node} did not start; see {self.dir}/stdout.log and {self.log}"
            )
        return self

    def _wait_ready(self) -> bool:
        """True once the AMQP listener answers a protocol header with Connection.Start."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=2) as s,
            ):
                s.sendall(b"AMQP\x00\x00\x09\x01")
                # A method frame (type 1) on channel 0: Connection.Start.
                if s.recv(7)[:3] == b"\x01\x00\x00":
                    return True
            time.sleep(0.2)
        return False

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ARGS`` against this node."""
        return subprocess.run(
            [self.ctl_bin, "-n", self.node, *args],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=timeout,
            cwd=self.dir,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the node (SIGTERM: the script runs ``rabbitmqctl stop``); epmd stays."""
        proc, self.proc = self.proc, None
        _stop(proc, timeout=60.0, sig=sig)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop and boot again: durable queues and (stored) persistent messages come back."""
        self.stop(sig)
        self.start()

    def close(self) -> None:
        """Stop the node and its epmd."""
        self.stop()
        epmd, self.epmd = self.epmd, None
        _stop(epmd)
