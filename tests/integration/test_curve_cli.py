"""Curve keys on the command line: a bad key file or a reserved key name is a one-line
error, and nothing changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from directord.security import curve


def test_unreadable_key_file_is_a_clean_cli_error(tmp_path: Path) -> None:
    curve.generate(str(tmp_path), ["server", "client"])
    secret = tmp_path / "private_keys" / "server.key_secret"
    secret.write_text("not a key\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "directord",
            "--config-file",
            "/dev/null",
            "--driver",
            "zmq",
            "--zmq-key-dir",
            str(tmp_path),
            "--datastore",
            "memory",
            "--socket-path",
            str(tmp_path / "api.sock"),
            "--job-port",
            "0",
            "server",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("directord:")]
    assert lines == [f"directord: {secret}: no secret-key in key file"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", ["server", "client", "ca"])
def test_generate_keys_refuses_a_reserved_client_name(tmp_path: Path, name: str) -> None:
    """``--client server`` would replace the server's own key; ``--client ca`` names the CA."""
    curve.generate(str(tmp_path), ["server", "client"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "directord",
            "--config-file",
            "/dev/null",
            "--zmq-key-dir",
            str(tmp_path),
            "server",
            "--zmq-generate-keys",
            "--client",
            "node1",
            "--client",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"directord: cannot make a key for {name!r}: identity {name!r} is reserved "
        "(it names directord's own key files: ca, client, server)"
    ]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
