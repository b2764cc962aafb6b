"""A real OpenSSH server for the bootstrap tests: one sshd listening on 127.0.0.2 to .7.

Six loopback addresses give six hosts. The server accepts one test key for
root; its host key is written to a known_hosts file for those six addresses.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
HOSTS = [f"127.0.0.{i}" for i in range(2, 8)]


@dataclass(frozen=True)
class Sshd:
    """Where the test sshd listens and what trusts it."""

    port: int
    key_file: Path  # the client's private key (root may log in with it)
    known_hosts: Path  # the six addresses with the server's host key
    host_key_pub: str
    log: Path


def _port_free_everywhere() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOSTS[0], 0))
            port = int(s.getsockname()[1])
        try:
            for host in HOSTS:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on 127.0.0.2-7")


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "directord-test", "-f", str(path)],
        check=True,
    )


@contextmanager
def running_sshd(folder: Path) -> Iterator[Sshd]:
    """Start sshd on the six addresses; stop it on exit."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        raise RuntimeError(
            "the bootstrap tests need OpenSSH's sshd (Debian: openssh-server); "
            ".ci/setup installs it"
        )
    folder.mkdir(parents=True, exist_ok=True)
    host_key, user_key = folder / "host_ed25519", folder / "id_ed25519"
    _keygen(host_key)
    _keygen(user_key)
    authorized = folder / "authorized_keys"
    authorized.write_text((folder / "id_ed25519.pub").read_text())
    port = _port_free_everywhere()
    config = folder / "sshd_config"
    listen = "".join(f"ListenAddress {h}:{port}\n" for h in HOSTS)
    config.write_text(
        f"{listen}HostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
        f"PidFile {folder / 'sshd.pid'}\n"
        # The test tree is under /tmp (world-writable): StrictModes would refuse it.
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nMaxStartups 64\nMaxSessions 64\nLogLevel VERBOSE\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation directory
    log = folder / "sshd.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                socket.create_connection((HOSTS[-1], port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("sshd did not listen within 20 s") from None
                time.sleep(0.1)
        public = (folder / "host_ed25519.pub").read_text().split()
        known = folder / "known_hosts"
        known.write_text("".join(f"[{h}]:{port} {public[0]} {public[1]}\n" for h in HOSTS))
        yield Sshd(port, user_key, known, f"{public[0]} {public[1]}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
