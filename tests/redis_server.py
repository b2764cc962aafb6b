"""A private redis-server process for tests: free loopback port, no persistence to disk.

Tests never touch a Redis the machine may already run. A missing ``redis-server``
binary fails the test (``apt-get install redis-server``); it is never skipped.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

START_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _command(port: int, line: bytes, password: str | None = None) -> bytes:
    """Send one inline command (after AUTH, if a password is given); return the reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s, s.makefile("rb") as stream:
        if password is not None:
            s.sendall(b"AUTH " + password.encode() + b"\r\n")
            stream.readline()
        s.sendall(line + b"\r\n")
        return stream.readline().strip()


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 with a throwaway directory.

    Args:
        directory: working directory (``--dir``) and log file location.
        args: extra ``redis-server`` options (``--requirepass X``, TLS settings ...).
        password: the ``requirepass`` in ``args``, used by the readiness check and
            :meth:`command`. A TLS server (``--tls-port``) keeps its plain port too,
            for those.
    """

    def __init__(
        self, directory: Path, args: list[str] | None = None, password: str | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed (Debian: apt-get install redis-server); "
                "the Redis datastore tests need a real server"
            )
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = list(args or [])
        self.password = password
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def _argv(self, port: int) -> list[str]:
        return [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log),
            "--daemonize", "no",
            *self.args,
        ]  # fmt: skip

    def start(self) -> RedisServer:
        """Start on a free port (or on the port it had before: a restart)."""
        for _attempt in range(5):
            port = self.port or _free_port()
            self.proc = subprocess.Popen(
                self._argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready(port):
                self.port = port
                return self
            self.stop()
            # A port picked by _free_port may have been taken by someone else meanwhile.
        raise RuntimeError(f"redis-server did not start; see {self.log}")

    def _wait_ready(self, port: int) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                if _command(port, b"PING", self.password) == b"+PONG":
                    return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL); its data is gone (no persistence)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def command(self, line: str) -> bytes:
        """One inline command (``DBSIZE``, ``TYPE k`` ...) and its raw reply line."""
        return _command(self.port, line.encode(), self.password)

    def url(
        self, db: int = 0, prefix: str | None = None, scheme: str = "redis", userinfo: str = ""
    ) -> str:
        """A datastore URL on this server; a fresh key prefix unless one is given."""
        prefix = prefix or f"test-{uuid.uuid4().hex[:12]}"
        at = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{at}127.0.0.1:{self.port}/{db}?prefix={prefix}"
